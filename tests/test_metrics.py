"""Tests of pipeline/metrics.py against hand-computed confusion matrices."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from weclip.pipeline.metrics import ConfusionMatrix


def test_hand_computed_confusion_iou_and_miou():
    gt = np.array([[0, 0, 1, 1], [1, 255, 0, 255]])
    pred = np.array([[0, 2, 1, 0], [1, 1, 0, 2]])  # the two 255 pixels must not count
    cm = ConfusionMatrix(4)
    cm.update(pred, gt)
    # rows = GT, cols = pred: gt0 -> pred 0,2,0 ; gt1 -> pred 1,0,1
    assert cm.matrix.tolist() == [[2, 0, 1, 0], [1, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert cm.pixel_count == 6
    iou = cm.iou()
    assert iou[0] == pytest.approx(2 / 4)  # TP 2, FP 1 (gt1 -> 0), FN 1 (-> 2)
    assert iou[1] == pytest.approx(2 / 3)  # TP 2, FN 1
    assert iou[2] == 0.0  # predicted but absent from GT: IoU 0, excluded from the mean
    assert math.isnan(iou[3])  # absent from GT and prediction
    assert cm.miou() == pytest.approx((2 / 4 + 2 / 3) / 2)
    assert cm.pixel_accuracy() == pytest.approx(4 / 6)


def test_merge_equals_single_accumulator_and_state_is_json():
    rng = np.random.default_rng(0)
    gts = [rng.integers(0, 5, size=(7, 9)) for _ in range(4)]
    preds = [rng.integers(0, 5, size=(7, 9)) for _ in range(4)]
    for g in gts:
        g[rng.random(g.shape) < 0.1] = 255
    whole, first, second = ConfusionMatrix(5), ConfusionMatrix(5), ConfusionMatrix(5)
    for i, (p, g) in enumerate(zip(preds, gts)):
        whole.update(p, g)
        (first if i < 2 else second).update(torch.from_numpy(p), torch.from_numpy(g))
    shipped = ConfusionMatrix.from_state_dict(json.loads(json.dumps(second.state_dict())))
    merged = first.merge(shipped)
    np.testing.assert_array_equal(merged.matrix, whole.matrix)
    assert merged.miou() == whole.miou()
    assert whole.pixel_count == sum(int((g != 255).sum()) for g in gts)


def test_errors_and_empty():
    cm = ConfusionMatrix(3)
    assert math.isnan(cm.miou())
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="ground truth label 7"):
        cm.update(np.zeros(3), np.array([0, 7, 255]))
    with pytest.raises(ValueError, match="prediction label 3"):
        cm.update(np.array([0, 3, 3]), np.array([0, 1, 255]))
    cm.update(np.array([0, 0, 9]), np.array([0, 1, 255]))  # a prediction under an ignored GT pixel is fine
    with pytest.raises(ValueError, match="cannot merge"):
        cm.merge(ConfusionMatrix(4))


def test_to_dict_is_json_with_none_for_nan():
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 1, 1]), np.array([0, 1, 0]))
    report = json.loads(json.dumps(cm.to_dict(["background", "cat", "dog"])))
    assert report["iou"] == {"background": 0.5, "cat": 0.5, "dog": None}
    assert report["miou"] == 0.5 and report["pixels"] == 3
