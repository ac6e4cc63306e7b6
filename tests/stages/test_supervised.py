"""The fully supervised mode (docs/algorithm.md §8.2): GT mask crops in the cache (`extract.store_masks`) and
`weclip train --supervised` on them, then evaluate / infer on its checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.conftest import TINY_CONFIG
from tests.stages.extract_fakes import tiny_config as extract_config
from tests.stages.test_train import tiny_config as train_config
from tests.test_cli import user_error

from weclip.pipeline.cache.store import CacheReader
from weclip.pipeline.data.augment import ViewParams
from weclip.pipeline.data.manifest import ManifestRow, mask_labels, read_manifest, write_manifest
from weclip.pipeline.data.shapes import generate
from weclip.pipeline.errors import DataError, TrainError
from weclip.pipeline.model.decoder import WeCLIPDecoder
from weclip.pipeline.model.text import SHAPES_CLASSES
from weclip.pipeline.training import schedule
from weclip.pipeline.training.checkpoint import load_checkpoint
from weclip.stages import evaluate, export, extract, infer, manifest, train

# label -> the colour that encodes it in the generated images; 255 is the GT's own ignore region
PALETTE = {0: (40, 200, 10), 1: (90, 160, 40), 2: (140, 120, 70), 3: (190, 80, 100), 255: (250, 250, 0)}
SIZE = (40, 56)  # H × W; crop 48 then needs padding whenever the random scale is below 1.2


def label_map(seed: int) -> np.ndarray:
    """Random 8×8 blocks of labels 0..3 (left-right asymmetric, so a flip shows) with a 6×6 ignore square."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 4, size=(SIZE[0] // 8, SIZE[1] // 8), dtype=np.uint8)
    blocks[0, 0], blocks[-1, -1] = 1, 3  # every image has foreground
    mask = np.kron(blocks, np.ones((8, 8), np.uint8))
    mask[20:26, 30:36] = 255
    return mask


def write_coded_world(root: Path, ids: list[str], with_masks: bool = True) -> Path:
    """PNG images whose colours encode the label map of their PNG masks, and the manifest of them."""
    rows = []
    for n, image_id in enumerate(ids):
        mask = label_map(n)
        rgb = np.zeros((*SIZE, 3), np.uint8)
        for label, colour in PALETTE.items():
            rgb[mask == label] = colour
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(root / "images" / f"{image_id}.png")
        Image.fromarray(mask, mode="L").save(root / "images" / f"{image_id}_mask.png")
        rows.append(ManifestRow(image_id, f"images/{image_id}.png", f"images/{image_id}_mask.png" if with_masks else None,
                                mask_labels(mask), *SIZE, "train"))
    return write_manifest(root / ("m.parquet" if with_masks else "no-masks.parquet"), rows, dataset="folder",
                          class_names=["one", "two", "three"], root=root, command="test")


def decode_colours(image: np.ndarray) -> np.ndarray:
    """3×H×W crop -> H×W label of the nearest palette colour."""
    labels = np.array(list(PALETTE), np.uint8)
    colours = np.array(list(PALETTE.values()), np.float32)
    dist = ((image.transpose(1, 2, 0)[..., None, :].astype(np.float32) - colours) ** 2).sum(-1)
    return labels[dist.argmin(-1)]


def reference_mask_crops(mask: np.ndarray, p: ViewParams, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """The view written out from its parameters: nearest source pixel floor((i + 0.5)·H / h'), mirror, pad with 255
    at (pad_top, pad_left), cut the crop box. PIL computes the source position in fixed point, so where it lies within
    `eps` of a pixel edge either side may be taken: the crops with the lower and with the upper choice."""
    def crop(side: int) -> np.ndarray:
        def source(n: int, size: int) -> np.ndarray:
            return np.clip(np.floor((np.arange(n) + 0.5) * size / n + side * eps).astype(int), 0, size - 1)
        resized = mask[source(p.resized_h, mask.shape[0])][:, source(p.resized_w, mask.shape[1])]
        resized = resized[:, ::-1] if p.flip else resized
        canvas = np.full((max(p.crop, p.resized_h), max(p.crop, p.resized_w)), 255, np.uint8)
        canvas[p.pad_top:p.pad_top + p.resized_h, p.pad_left:p.pad_left + p.resized_w] = resized
        return canvas[p.crop_top:p.crop_top + p.crop, p.crop_left:p.crop_left + p.crop]
    return crop(-1), crop(+1)


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    root = tmp_path_factory.mktemp("coded")
    manifest_path = write_coded_world(root, ["p", "q", "r"])
    extract.run(extract_config(views=6, store_masks=True), manifest_path, root / "cache", executor="inline",
                progress=False, model_configs=[TINY_CONFIG])
    return {"root": root, "manifest": manifest_path, "cache": root / "cache"}


def test_mask_crop_is_the_image_crop_pixel_for_pixel(coded):
    reader = CacheReader(coded["cache"])
    index = reader.index.to_pylist()
    arrays = reader.read([r["row"] for r in index])
    masks = {row.image_id: label_map(n) for n, row in enumerate(read_manifest(coded["manifest"]).rows)}
    params = [ViewParams.from_dict(r) for r in index]
    assert any(p.flip for p in params) and not all(p.flip for p in params)
    padded = [not v.all() for v in arrays["valid"]]
    assert any(padded)
    compared = 0
    for r, p, image, valid, mask in zip(index, params, arrays["image"], arrays["valid"], arrays["gt_mask"]):
        assert mask.dtype == np.uint8
        lower, upper = reference_mask_crops(masks[r["image_id"]], p, eps=1e-2)
        assert ((mask == lower) | (mask == upper)).all() and (lower == upper).mean() > 0.95
        assert (mask[~valid] == 255).all() and (image[:, ~valid] == 0).all()  # padding: ignored, not background
        # inside uniform 5×5 patches (wider than the bilinear support at scale ≥ 0.5), the image's colour is the label
        windows = np.lib.stride_tricks.sliding_window_view(np.pad(mask, 2, constant_values=254), (5, 5))
        uniform = (windows == mask[..., None, None]).all(axis=(-1, -2)) & valid
        np.testing.assert_array_equal(decode_colours(image)[uniform], mask[uniform])
        compared += int(uniform.sum())
    assert compared > 0.2 * len(index) * 48 * 48  # the check is not vacuous (about 30 % of all pixels here)


def test_store_masks_is_in_the_fingerprint_and_spec(coded, tmp_path):
    reader = CacheReader(coded["cache"])
    assert reader.fingerprint["gt_masks"] is True and reader.spec.masks
    assert reader.schemas["gt_mask"].fill == 255
    plain = extract.run(extract_config(views=6), coded["manifest"], tmp_path / "plain", executor="inline",
                        progress=False, model_configs=[TINY_CONFIG])
    other = CacheReader(plain.out)
    assert "gt_masks" not in other.fingerprint and "gt_mask" not in other.schemas
    assert other.fingerprint["digest"] != reader.fingerprint["digest"]
    np.testing.assert_array_equal(other.read([0, 5])["features"], reader.read([0, 5])["features"])


def test_store_masks_refuses_a_manifest_without_masks(coded, tmp_path, capsys):
    no_masks = write_coded_world(tmp_path, ["p", "q"], with_masks=False)
    with pytest.raises(DataError, match=r"store_masks.*none for 2 of 2 images \(p, q\)"):
        extract.run(extract_config(store_masks=True), no_masks, tmp_path / "cache", executor="inline",
                    progress=False, model_configs=[TINY_CONFIG])
    err = user_error(["extract", str(no_masks), "-o", str(tmp_path / "cli"), "--store-masks", "--executor", "inline",
                      "--set", "model.name=tiny-vit", "--set", "model.pretrained=null"], capsys)
    assert err.startswith("error: extract.store_masks (--store-masks) needs a mask") and err.count("\n") == 1
    assert not (tmp_path / "cache").exists() and not (tmp_path / "cli").exists()


def test_a_broken_mask_file_skips_its_image(tmp_path):
    manifest_path = write_coded_world(tmp_path, ["p", "q"])
    (tmp_path / "images" / "q_mask.png").write_bytes(b"not a png")
    summary = extract.run(extract_config(store_masks=True), manifest_path, tmp_path / "cache", executor="inline",
                          progress=False, model_configs=[TINY_CONFIG])
    assert {(s["image_id"], s["reason"]) for s in summary.skipped} == {("q", "mask_corrupt")}
    assert summary.views_in_cache == 2


def test_hflip_sample_mirrors_the_mask_with_the_image():
    rng = np.random.default_rng(1)
    sample = {"features": rng.normal(size=(1, 4, 2)), "attn": rng.random((1, 4, 4)), "cams": rng.random((1, 2, 2)),
              "image": rng.integers(0, 255, (3, 32, 32)).astype(np.uint8), "valid": rng.random((32, 32)) > 0.5,
              "gt_mask": rng.integers(0, 4, (32, 32)).astype(np.uint8)}
    flipped = schedule.hflip_sample(sample, (2, 2))
    np.testing.assert_array_equal(flipped["gt_mask"], sample["gt_mask"][:, ::-1])
    np.testing.assert_array_equal(flipped["image"], sample["image"][:, :, ::-1])


# --- training on the masks -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shapes_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("supervised")
    generate(root / "data", "train", 8, seed=5, size=64)
    manifest_path = manifest.run("shapes", root / "data", root / "m.parquet", progress=False).manifest_path
    cfg = train_config(extract={"store_masks": True}, decoder={"dropout": 0.0}, eval={"long_side": 64})
    extract.run(cfg, manifest_path, root / "cache", executor="inline", progress=False, model_configs=[TINY_CONFIG])
    out = root / "run"
    summary = train.run(cfg.replace(train={"supervised": True}), root / "cache", out, max_steps=4, progress=False)
    return {"root": root, "manifest": manifest_path, "cache": root / "cache", "cfg": cfg, "out": out,
            "summary": summary}


def test_supervised_loss_is_plain_ce_on_the_mask_crops(shapes_world):
    """Step 0's loss equals CE (ignore 255) of a freshly seeded decoder on the step's cached samples."""
    cfg = shapes_world["cfg"]
    lines = [json.loads(x) for x in (shapes_world["out"] / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2, 3]
    assert all("aff" not in m and m["rfm"] is False and m["loss"] == m["seg"] for m in lines)
    reader = CacheReader(shapes_world["cache"])
    rows = np.sort(reader.index.column("row").to_numpy())
    _, positions = schedule.batch_positions(0, len(rows), cfg.train.batch_size, cfg.train.seed)
    batch = reader.read(rows[positions])
    torch.manual_seed(cfg.train.seed)
    decoder = WeCLIPDecoder(reader.spec.feature_layers, reader.spec.dim, len(SHAPES_CLASSES) + 1, cfg.decoder).train()
    logits = decoder(torch.from_numpy(batch["features"]), reader.spec.grid).logits
    mask = torch.from_numpy(batch["gt_mask"]).long()
    assert (mask == 255).any()  # padding is there, and ignored
    expected = F.cross_entropy(F.interpolate(logits, size=mask.shape[-2:], mode="bilinear", align_corners=False),
                               mask, ignore_index=255)
    assert lines[0]["loss"] == pytest.approx(float(expected.detach()), rel=1e-5)
    assert lines[0]["fg_fraction"] == pytest.approx(float(((mask > 0) & (mask != 255)).float().mean()))


def test_the_checkpoint_says_supervised_and_evaluate_and_infer_use_it(shapes_world, tmp_path):
    summary = shapes_world["summary"]
    assert summary.supervised and not summary.rfm_on and "fully supervised" in summary.format()
    ckpt = load_checkpoint(summary.checkpoint)
    assert ckpt.config.train.supervised and ckpt.fingerprint["gt_masks"] is True
    exported = export.run(summary.checkpoint, tmp_path / "weights.safetensors")
    assert load_checkpoint(exported.out).config.train.supervised
    report = evaluate.run(summary.checkpoint, shapes_world["manifest"], tmp_path / "eval", crf=False, progress=False,
                          model_configs=[TINY_CONFIG])
    assert report.images == 8 and 0 <= report.miou <= 1
    image = sorted((shapes_world["root"] / "data" / "JPEGImages").glob("*.jpg"))[0]
    written = infer.run(summary.checkpoint, image, tmp_path / "infer", crf=False, progress=False,
                        model_configs=[TINY_CONFIG])
    assert written.written == 1 and not written.failed
    (png,) = (tmp_path / "infer").rglob("*.png")
    assert Image.open(png).size == Image.open(image).size


def test_resume_keeps_the_supervision(shapes_world, tmp_path):
    out = tmp_path / "run"
    cfg = shapes_world["cfg"].replace(train={"supervised": True})
    train.run(cfg, shapes_world["cache"], out, max_steps=2, progress=False)
    with pytest.raises(TrainError, match="train.supervised"):
        train.run(shapes_world["cfg"], shapes_world["cache"], out, resume=True, max_steps=4, progress=False)
    train.run(cfg, shapes_world["cache"], out, resume=True, max_steps=4, progress=False)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(x) for x in (shapes_world["out"] / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in lines] == [m["loss"] for m in reference]


def test_weak_training_ignores_the_mask_crops(shapes_world, tmp_path):
    """A weakly supervised run on a cache with masks has the losses of one on the same cache without them."""
    cfg = shapes_world["cfg"]
    plain = cfg.replace(extract={"store_masks": False})
    extract.run(plain, shapes_world["manifest"], tmp_path / "plain", executor="inline", progress=False,
                model_configs=[TINY_CONFIG])
    with_masks = train.run(cfg, shapes_world["cache"], tmp_path / "a", max_steps=3, progress=False)
    without = train.run(plain, tmp_path / "plain", tmp_path / "b", max_steps=3, progress=False)
    losses = [[json.loads(x)["loss"] for x in Path(s.metrics).read_text().splitlines()] for s in (with_masks, without)]
    assert losses[0] == losses[1] and not with_masks.supervised


def test_supervised_refuses_a_cache_without_masks_and_online(shapes_world, tmp_path, capsys):
    plain = shapes_world["cfg"].replace(extract={"store_masks": False})
    extract.run(plain, shapes_world["manifest"], tmp_path / "plain", executor="inline", progress=False,
                model_configs=[TINY_CONFIG])
    supervised = plain.replace(train={"supervised": True})
    with pytest.raises(TrainError, match=r"stores none; extract it with --store-masks"):
        train.run(supervised, tmp_path / "plain", tmp_path / "run", progress=False)
    with pytest.raises(TrainError, match="online training has none"):
        train.run(supervised, None, tmp_path / "run", online_manifest=shapes_world["manifest"], progress=False,
                  model_configs=[TINY_CONFIG])
    err = user_error(["train", "--supervised", "--cache", str(tmp_path / "plain"), "-o", str(tmp_path / "cli")],
                     capsys)
    assert err.startswith("error: train.supervised (--supervised) learns from ground-truth mask crops")
    assert err.count("\n") == 1 and not (tmp_path / "run" / "checkpoint.pt").exists()
