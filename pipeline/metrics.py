"""Streaming confusion matrix and mIoU (docs/algorithm.md §5.3, §8.1 step 7); image-level presence mAP.

Rows are ground truth, columns predictions. Pixels whose GT is `ignore_index` (255) are skipped.
IoU_c = TP / (TP + FP + FN); mIoU is the mean over the classes that have GT pixels (the released
`scores`: nanmean over rows with a nonzero sum). States are plain ints, so accumulators built in
worker processes can be shipped as JSON and summed with `merge`.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from weclip.pipeline.config import IGNORE_INDEX


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class ConfusionMatrix:
    """Accumulates a num_classes x num_classes pixel confusion matrix with `np.bincount`."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor) -> None:
        """Add one prediction / ground-truth pair of any (equal) shape. Labels must be in [0, C)
        except GT pixels equal to `ignore_index`; anything else is an error, not silently dropped."""
        pred, gt = _as_numpy(pred), _as_numpy(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
        gt = gt.reshape(-1).astype(np.int64)
        pred = pred.reshape(-1).astype(np.int64)
        keep = gt != self.ignore_index
        gt, pred = gt[keep], pred[keep]
        c = self.num_classes
        for name, values in (("ground truth", gt), ("prediction", pred)):
            bad = values[(values < 0) | (values >= c)]
            if bad.size:
                raise ValueError(f"{name} label {int(bad[0])} outside [0, {c}) (ignore index {self.ignore_index}); "
                                 "check the dataset's class count and label mapping")
        self.matrix += np.bincount(c * gt + pred, minlength=c * c).reshape(c, c)

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another accumulator's counts into this one (in place); returns self."""
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(f"cannot merge a {other.num_classes}-class matrix (ignore {other.ignore_index}) "
                             f"into a {self.num_classes}-class one (ignore {self.ignore_index})")
        self.matrix += other.matrix
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "ignore_index": self.ignore_index,
                "matrix": self.matrix.tolist()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "ConfusionMatrix":
        cm = cls(int(state["num_classes"]), int(state["ignore_index"]))
        matrix = np.asarray(state["matrix"], dtype=np.int64)
        if matrix.shape != cm.matrix.shape:
            raise ValueError(f"state matrix has shape {matrix.shape}, expected {cm.matrix.shape}")
        cm.matrix = matrix
        return cm

    @property
    def pixel_count(self) -> int:
        return int(self.matrix.sum())

    def iou(self) -> np.ndarray:
        """Per-class IoU (float64); nan for classes absent from both GT and prediction."""
        tp = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(axis=0) + self.matrix.sum(axis=1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def miou(self) -> float:
        """Mean IoU over the classes with GT pixels; nan when nothing was counted."""
        present = self.matrix.sum(axis=1) > 0
        return float(self.iou()[present].mean()) if present.any() else float("nan")

    def pixel_accuracy(self) -> float:
        total = self.pixel_count
        return float(np.trace(self.matrix) / total) if total else float("nan")

    def to_dict(self, class_names: list[str] | tuple[str, ...]) -> dict[str, Any]:
        """JSON-able report: mIoU, pixel accuracy, pixel count and per-class IoU (None where nan)."""
        if len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names given for {self.num_classes} classes")

        def clean(v: float) -> float | None:
            return None if np.isnan(v) else float(v)

        return {"miou": clean(self.miou()), "pixel_accuracy": clean(self.pixel_accuracy()),
                "pixels": self.pixel_count,
                "iou": {name: clean(v) for name, v in zip(class_names, self.iou())}}


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """AP of one class: mean over the positives of the precision at their rank (scores descending, stable); nan
    without positives."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hits = np.asarray(positives, dtype=bool)[order]
    if not hits.any():
        return float("nan")
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def presence_map(scores: np.ndarray, labels: np.ndarray) -> float:
    """Presence mAP: the mean over classes (with at least one positive) of the per-class AP. scores, labels: N×C."""
    aps = [average_precision(scores[:, c], labels[:, c]) for c in range(scores.shape[1])]
    return float(np.nanmean(aps))


def multi_hot(label_lists: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    """N×C bool from per-image class lists: the `labels` of `presence_map`."""
    out = np.zeros((len(label_lists), num_classes), dtype=bool)
    for row, labels in enumerate(label_lists):
        out[row, list(labels)] = True
    return out
