"""stages/evaluate.py on a tiny fake VOC tree: a random decoder on the tiny ViT, with and without DenseCRF, crashing
CRF workers, and checkpoints that do not fit the manifest."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.stages import eval_fakes as ef

from weclip.pipeline.model.text import class_set
from weclip.pipeline.data.augment import normalise
from weclip.pipeline.training.checkpoint import build_decoder_from_checkpoint, load_checkpoint
from weclip.pipeline.config import WECLIP_CRF
from weclip.pipeline.refinement.crf import dense_crf
from weclip.pipeline.data.images import load_mask, load_rgb
from weclip.pipeline.data.manifest import read_manifest, write_manifest
from weclip.pipeline.model.backbone import load_backbone
from weclip.pipeline.inference.segment import msc_flip_logits, segment_fn
from weclip.pipeline.palette import VOC_COLORMAP
from weclip.pipeline.inference import crf_pool
from weclip.stages import evaluate


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    cfg = ef.tiny_config()
    manifest = ef.make_world(root)
    checkpoint = ef.make_checkpoint(root / "checkpoint.pt", cfg, manifest)
    return {"root": root, "cfg": cfg, "manifest": manifest, "checkpoint": checkpoint}


def run(world, out: str, **kwargs) -> evaluate.EvalReport:
    return evaluate.run(world["checkpoint"], world["manifest"], world["root"] / out, progress=False,
                        model_configs=[ef.TINY_CONFIG], **kwargs)


@pytest.fixture(scope="module")
def plain(world):
    return run(world, "plain", crf=False, save_predictions=True, visualize=2)


@pytest.fixture(scope="module")
def with_crf(world):
    return run(world, "crf", crf=True, save_predictions=True, workers=2)


def predictions(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.array(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def independent_confusion(manifest: Path, preds: dict[str, np.ndarray], classes: int) -> np.ndarray:
    data = read_manifest(manifest)
    matrix = np.zeros((classes, classes), dtype=np.int64)
    for row in data.rows:
        gt = load_mask(data.mask_abspath(row)).astype(np.int64)
        pred = preds[row.image_id].astype(np.int64)
        for g, p in zip(gt[gt != 255], pred[gt != 255]):
            matrix[g, p] += 1
    return matrix


def test_report_counts_every_image_and_recomputes_from_the_pngs(world, plain):
    data = read_manifest(world["manifest"])
    assert plain.images == len(data) == len(ef.IMAGES)
    preds = predictions(Path(plain.predictions))
    assert sorted(preds) == sorted(ef.IMAGES)
    matrix = independent_confusion(world["manifest"], preds, 21)
    assert plain.confusion == matrix.tolist()
    rows = matrix.sum(axis=1)
    tp = np.diag(matrix)
    iou = tp[rows > 0] / (rows + matrix.sum(axis=0) - tp)[rows > 0]
    assert plain.miou == pytest.approx(iou.mean())
    saved = json.loads(Path(plain.report_json).read_text())
    assert saved["images"] == len(data) and saved["miou"] == pytest.approx(plain.miou)
    table = [line for line in Path(plain.report_md).read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 21 and table[1].startswith("| background |")


def test_predictions_are_the_msc_flip_argmax_in_voc_palette_pngs(world, plain):
    ckpt = load_checkpoint(world["checkpoint"])
    backbone = load_backbone(ckpt.config.model, "cpu", (ef.TINY_CONFIG,))
    seg = segment_fn(backbone, build_decoder_from_checkpoint(ckpt), ckpt.config.extract.feature_layers)
    data = read_manifest(world["manifest"])
    row = data.rows[2]
    rgb = torch.from_numpy(load_rgb(data.image_abspath(row))).permute(2, 0, 1)[None]
    want = msc_flip_logits(seg, normalise(rgb, "imagenet"), ckpt.config.eval).argmax(dim=0).numpy()
    with Image.open(Path(plain.predictions) / f"{row.image_id}.png") as im:
        assert im.mode == "P"
        np.testing.assert_array_equal(np.array(im.getpalette()[:768]).reshape(256, 3), VOC_COLORMAP)
        np.testing.assert_array_equal(np.array(im), want)


def test_visualisation_grid_has_a_row_per_sample(plain):
    with Image.open(plain.visualization) as im:
        assert im.size == (6 * 192, 16 + 2 * (16 + 144))


def test_crf_in_the_pool_is_densecrf_of_the_softmax(world, plain, with_crf):
    assert with_crf.images == len(ef.IMAGES) and with_crf.crf
    ckpt = load_checkpoint(world["checkpoint"])
    backbone = load_backbone(ckpt.config.model, "cpu", (ef.TINY_CONFIG,))
    seg = segment_fn(backbone, build_decoder_from_checkpoint(ckpt), ckpt.config.extract.feature_layers)
    data = read_manifest(world["manifest"])
    row = data.rows[0]
    rgb = load_rgb(data.image_abspath(row))
    logits = msc_flip_logits(seg, normalise(torch.from_numpy(rgb).permute(2, 0, 1)[None], "imagenet"),
                             ckpt.config.eval)
    want = dense_crf(rgb, torch.softmax(logits, dim=0).numpy(), WECLIP_CRF).argmax(axis=0)
    np.testing.assert_array_equal(predictions(Path(with_crf.predictions))[row.image_id], want)
    assert with_crf.confusion == independent_confusion(world["manifest"], predictions(Path(with_crf.predictions)),
                                                       21).tolist()


def test_crf_inline_equals_the_pool(world, with_crf):
    inline = run(world, "crf-inline", crf=True, save_predictions=True, workers=0)
    assert inline.confusion == with_crf.confusion
    for name, labels in predictions(Path(inline.predictions)).items():
        np.testing.assert_array_equal(labels, predictions(Path(with_crf.predictions))[name])


def test_a_crashing_crf_worker_fails_the_run_naming_the_image(world, monkeypatch):
    monkeypatch.setenv(crf_pool.CRF_FAULT_ENV, "exit:0:c")  # the worker dies on every attempt at image c
    assert world["cfg"].eval.crf_retries == 1
    with pytest.raises(crf_pool.CrfError, match=r"image c on all 2 attempt\(s\): its worker process died"):
        run(world, "crash", crf=True, workers=2)
    assert not (world["root"] / "crash" / "report.json").exists()  # never a shorter report


def test_a_worker_that_dies_once_is_retried_and_nothing_is_lost(world, with_crf, monkeypatch):
    monkeypatch.setenv(crf_pool.CRF_FAULT_ENV, "exit:1:b")  # dies on the first attempt only
    report = run(world, "retried", crf=True, save_predictions=True, workers=2)
    assert report.images == len(ef.IMAGES)
    assert report.confusion == with_crf.confusion


def test_a_raising_crf_fails_after_its_retries(world, monkeypatch):
    monkeypatch.setenv(crf_pool.CRF_FAULT_ENV, "raise:0:d")
    with pytest.raises(crf_pool.CrfError, match=r"image d on all 2 attempt\(s\): RuntimeError: injected"):
        run(world, "raising", crf=True, workers=0)


def test_refuses_a_checkpoint_of_other_classes(world):
    other = ef.make_checkpoint(world["root"] / "shapes.pt", world["cfg"], world["manifest"],
                               classes=class_set("shapes"))
    with pytest.raises(evaluate.EvalError, match="does not have the classes of checkpoint"):
        evaluate.run(other, world["manifest"], world["root"] / "x", progress=False, model_configs=[ef.TINY_CONFIG])


def test_refuses_a_checkpoint_whose_backbone_differs(world):
    """The backbone the config loads is not the one whose features the decoder was trained on."""
    other = ef.make_checkpoint(world["root"] / "other-backbone.pt", world["cfg"], world["manifest"])
    payload = torch.load(other, weights_only=True)
    payload["fingerprint"]["checkpoint"] = "tiny-vit@sha256:" + "0" * 64
    torch.save(payload, other)
    with pytest.raises(evaluate.EvalError, match="trained on features of backbone 'tiny-vit@sha256:000"):
        evaluate.run(other, world["manifest"], world["root"] / "y", progress=False, model_configs=[ef.TINY_CONFIG])


def test_refuses_a_manifest_without_masks(world, tmp_path):
    data = read_manifest(world["manifest"])
    rows = [dataclasses.replace(row, mask_path=None) for row in data.rows]
    path = write_manifest(tmp_path / "nomask.parquet", rows, dataset="voc", class_names=data.class_names,
                          root=data.root, command="test")
    with pytest.raises(evaluate.EvalError, match="without a mask"):
        evaluate.run(world["checkpoint"], path, tmp_path / "z", progress=False, model_configs=[ef.TINY_CONFIG])


def small_jobs(keys: str) -> list[crf_pool.CrfJob]:
    rng = np.random.default_rng(0)
    return [crf_pool.CrfJob(k, rng.integers(0, 256, (6, 7, 3), dtype=np.uint8),
                            rng.dirichlet(np.ones(3), size=(6, 7)).transpose(2, 0, 1).astype(np.float32),
                            np.array([0, 4, 9]), WECLIP_CRF) for k in keys]


def test_pool_charges_a_crash_to_its_image_only(monkeypatch):
    """With no retries, an image in flight with the crasher must not be blamed: the crash is isolated first."""
    monkeypatch.setenv(crf_pool.CRF_FAULT_ENV, "exit:0:e")
    with pytest.raises(crf_pool.CrfError, match="image e on all 1 attempt"):
        list(crf_pool.CrfPool(workers=2, retries=0).imap(small_jobs("abcdefgh")))


def test_pool_returns_one_result_per_job_in_any_order(monkeypatch):
    jobs = small_jobs("abcdefgh")
    monkeypatch.setenv(crf_pool.CRF_FAULT_ENV, "exit:1:c")
    results = dict(crf_pool.CrfPool(workers=3, retries=1).imap(jobs))
    assert sorted(results) == list("abcdefgh")
    for job in jobs:
        want = np.array([0, 4, 9])[dense_crf(job.image, job.probs, WECLIP_CRF).argmax(axis=0)]
        np.testing.assert_array_equal(results[job.key], want)
