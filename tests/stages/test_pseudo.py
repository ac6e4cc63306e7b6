"""stages/pseudo.py on a tiny fake VOC tree: CLIP-ES masks (CAM → CAA → CRF → CGL 255) and WeCLIP predictions."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.stages import eval_fakes as ef

from weclip.pipeline.data.augment import normalise
from weclip.pipeline.refinement.crf import clipes_crf_image, dense_crf
from weclip.pipeline.data.images import load_mask, load_rgb
from weclip.pipeline.data.manifest import read_manifest
from weclip.pipeline.model.backbone import load_backbone
from weclip.pipeline.inference.segment import clipes_cam_scores, clipes_input
from weclip.pipeline.palette import VOC_COLORMAP
from weclip.pipeline.model.text import class_set, text_embeddings
from weclip.pipeline.inference import crf_pool
from weclip.stages import evaluate, pseudo


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pseudo")
    cfg = ef.tiny_config()
    manifest = ef.make_world(root)
    return {"root": root, "cfg": cfg, "manifest": manifest}


def run(world, out: str, **kwargs) -> pseudo.PseudoReport:
    kwargs.setdefault("cfg", world["cfg"])
    return pseudo.run(world["manifest"], world["root"] / out, progress=False, model_configs=[ef.TINY_CONFIG],
                      **kwargs)


@pytest.fixture(scope="module")
def clipes(world):
    return run(world, "clipes", visualize=1)


def masks(report: pseudo.PseudoReport) -> dict[str, np.ndarray]:
    out = {}
    for path in sorted(Path(report.masks).glob("*.png")):
        with Image.open(path) as im:
            assert im.mode == "P"
            np.testing.assert_array_equal(np.array(im.getpalette()[:768]).reshape(256, 3), VOC_COLORMAP)
            out[path.stem] = np.array(im)
    return out


def test_clipes_masks_are_255_exactly_where_the_crf_is_unconfident(world, clipes):
    """Recomputed here from the pieces: CLIP-normalised bicubic input, CAM + CAA scores, DenseCRF posterior."""
    cfg = world["cfg"]
    written = masks(clipes)
    assert clipes.images == len(written) == len(ef.IMAGES)
    data = read_manifest(world["manifest"])
    backbone = load_backbone(cfg.model, "cpu", (ef.TINY_CONFIG,))
    text = text_embeddings(backbone, class_set("voc"), cfg.text.template)
    unconfident_somewhere = False
    for row in data.rows[:2]:
        rgb = load_rgb(data.image_abspath(row))
        x = normalise(torch.from_numpy(np.array(clipes_input(rgb, 16))).permute(2, 0, 1)[None], "clip")
        maps = clipes_cam_scores(backbone, text, x, row.labels, rgb.shape[:2], cfg.refine)
        q = dense_crf(rgb, maps.scores.numpy(), cfg.eval.clipes_crf_params)
        labels = maps.keys.numpy()[q.argmax(axis=0)]
        labels[q.max(axis=0) < 0.95] = 255
        np.testing.assert_array_equal(written[row.image_id], labels)
        unconfident_somewhere |= bool((labels == 255).any())
        assert set(np.unique(labels)) <= {0, 255, *(c + 1 for c in row.labels)}
    assert unconfident_somewhere  # the test would not see the CGL otherwise


def test_clipes_report_excludes_255_and_reports_the_ignored_fraction(world, clipes):
    written = masks(clipes)
    data = read_manifest(world["manifest"])
    total = sum(m.size for m in written.values())
    assert clipes.ignored_fraction == pytest.approx(sum(int((m == 255).sum()) for m in written.values()) / total)
    matrix = np.zeros((21, 21), dtype=np.int64)
    for row in data.rows:
        gt, pred = load_mask(data.mask_abspath(row)).astype(np.int64), written[row.image_id].astype(np.int64)
        keep = (gt != 255) & (pred != 255)
        np.add.at(matrix, (gt[keep], pred[keep]), 1)
    assert clipes.confusion == matrix.tolist()
    assert clipes.scored_images == len(ef.IMAGES) and clipes.pixels == int(matrix.sum())
    assert "ignored (255)" in Path(clipes.report_md).read_text()
    with Image.open(clipes.visualization) as im:
        assert im.size == (6 * 192, 16 + 16 + 144)


def test_confidence_threshold_bounds(world):
    none = run(world, "conf0", cfg=world["cfg"].replace(eval={"clipes_confidence": 0.0}), workers=0)
    assert none.ignored_fraction == 0.0
    everything = run(world, "conf2", cfg=world["cfg"].replace(eval={"clipes_confidence": 1.01}), workers=0)
    assert everything.ignored_fraction == 1.0 and everything.pixels == 0 and everything.miou is None
    assert all((m == 255).all() for m in masks(everything).values())


def test_weclip_source_writes_the_checkpoints_predictions(world):
    checkpoint = ef.make_checkpoint(world["root"] / "checkpoint.pt", world["cfg"], world["manifest"])
    report = run(world, "weclip", cfg=None, source="weclip", checkpoint=checkpoint)
    evaluated = evaluate.run(checkpoint, world["manifest"], world["root"] / "eval", save_predictions=True,
                             progress=False, model_configs=[ef.TINY_CONFIG])
    got = masks(report)
    for path in Path(evaluated.predictions).glob("*.png"):
        np.testing.assert_array_equal(got[path.stem], np.array(Image.open(path)))
    assert report.ignored_fraction == 0.0 and report.miou == pytest.approx(evaluated.miou)


def test_argument_errors(world):
    with pytest.raises(ValueError, match="needs a config"):
        run(world, "e1", cfg=None)
    with pytest.raises(ValueError, match="needs the trained checkpoint"):
        run(world, "e2", cfg=None, source="weclip")
    with pytest.raises(ValueError, match="unknown pseudo-mask source"):
        run(world, "e3", source="deeplab")
    with pytest.raises(evaluate.EvalError, match="class set 'shapes'"):
        run(world, "e4", cfg=world["cfg"].replace(text={"classes": "shapes"}))


def test_preset_normalisation_means_the_models(world):
    """eval.clipes_normalisation 'preset' uses model.normalisation (ImageNet here), not CLIP's (docs/algorithm.md §5.1)."""
    preset = run(world, "norm-preset", cfg=world["cfg"].replace(eval={"clipes_normalisation": "preset"}), workers=0)
    imagenet = run(world, "norm-imagenet", cfg=world["cfg"].replace(eval={"clipes_normalisation": "imagenet"}),
                   workers=0)
    assert preset.confusion == imagenet.confusion
    for name, labels in masks(preset).items():
        np.testing.assert_array_equal(labels, masks(imagenet)[name])


def test_released_crf_image_quirk_is_an_option(world, clipes):
    """eval.clipes_crf_image 'released': the bilateral term sees the mean-subtracted BGR image wrapped to uint8."""
    cfg = world["cfg"].replace(eval={"clipes_crf_image": "released"})
    report = run(world, "released-image", cfg=cfg, workers=0)
    data = read_manifest(world["manifest"])
    row = data.rows[0]
    rgb = load_rgb(data.image_abspath(row))
    backbone = load_backbone(cfg.model, "cpu", (ef.TINY_CONFIG,))
    x = normalise(torch.from_numpy(np.array(clipes_input(rgb, 16))).permute(2, 0, 1)[None], "clip")
    maps = clipes_cam_scores(backbone, text_embeddings(backbone, class_set("voc"), cfg.text.template), x,
                             row.labels, rgb.shape[:2], cfg.refine)
    q = dense_crf(clipes_crf_image(rgb[..., ::-1].astype(np.float32)), maps.scores.numpy(), cfg.eval.clipes_crf_params)
    labels = maps.keys.numpy()[q.argmax(axis=0)]
    labels[q.max(axis=0) < cfg.eval.clipes_confidence] = 255
    np.testing.assert_array_equal(masks(report)[row.image_id], labels)
    assert (labels != masks(clipes)[row.image_id]).any()  # the RGB image (default) gives another mask here
