"""Training-view augmentation (docs/algorithm.md §7.1): deterministic draws, exact replay, padding, flip, ranges."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from weclip.pipeline.data.augment import ViewParams, apply_view, draw_view, normalise, valid_mask
from weclip.pipeline.config import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, AugConfig

CFG = AugConfig(crop=32, scale_range=(0.5, 2.0), flip_prob=0.5)


def image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 256, (h, w, 3), dtype=np.uint8)  # no zero: padding is visible


def reference_view(arr: np.ndarray, p: ViewParams, resample, fill: int) -> np.ndarray:
    """WeCLIP's steps written out with np.pad: resize, flip, pad (offset + remainder), slice."""
    out = np.asarray(Image.fromarray(arr).resize((p.resized_w, p.resized_h), resample))
    if p.flip:
        out = np.fliplr(out)
    bottom = max(p.crop, p.resized_h) - p.resized_h - p.pad_top
    right = max(p.crop, p.resized_w) - p.resized_w - p.pad_left
    pad = [(p.pad_top, bottom), (p.pad_left, right)] + [(0, 0)] * (arr.ndim - 2)
    out = np.pad(out, pad, constant_values=fill)
    return out[p.crop_top:p.crop_top + p.crop, p.crop_left:p.crop_left + p.crop]


def test_same_key_same_params_other_view_other_params():
    a = draw_view(1, "2007_000032", 0, 50, 70, CFG)
    assert a == draw_view(1, "2007_000032", 0, 50, 70, CFG)
    others = [draw_view(1, "2007_000032", v, 50, 70, CFG) for v in range(1, 8)]
    assert all(o != a for o in others) and len({o.scale for o in others}) == 7
    assert draw_view(2, "2007_000032", 0, 50, 70, CFG) != a
    assert draw_view(1, "2007_000033", 0, 50, 70, CFG) != a


@pytest.mark.parametrize("size", [(50, 70), (10, 12), (90, 17)])
def test_apply_matches_reference_and_replays_from_record(size):
    h, w = size
    arr = image(h, w, seed=h)
    mask = np.random.default_rng(w).integers(0, 21, (h, w), dtype=np.uint8)
    for view in range(6):
        p = draw_view(7, f"img{h}", view, h, w, CFG)
        replayed = ViewParams.from_dict(json.loads(json.dumps(p.to_dict())))
        assert replayed == p
        out = apply_view(arr, replayed)
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
        assert np.array_equal(out, reference_view(arr, p, Image.Resampling.BILINEAR, 0))
        assert np.array_equal(apply_view(arr, p), out)
        m = apply_view(mask, p, nearest=True, fill=255)
        assert np.array_equal(m, reference_view(mask, p, Image.Resampling.NEAREST, 255))
        assert set(np.unique(m)) <= set(np.unique(mask)) | {255}


def test_valid_mask_is_exactly_the_non_padding():
    for view in range(20):
        p = draw_view(3, "small", view, 12, 40, CFG)  # height always < crop: padding on top/bottom
        valid = valid_mask(p)
        ones = apply_view(np.full((12, 40), 200, np.uint8), p, nearest=True, fill=0)
        assert np.array_equal(valid, ones == 200)
        rows = np.clip(np.arange(p.crop) + p.crop_top - p.pad_top, -1, p.resized_h)
        cols = np.clip(np.arange(p.crop) + p.crop_left - p.pad_left, -1, p.resized_w)
        expected = ((rows >= 0) & (rows < p.resized_h))[:, None] & ((cols >= 0) & (cols < p.resized_w))[None]
        assert np.array_equal(valid, expected)
        assert not valid.all()  # a 12-pixel side scaled by at most 2 cannot fill 32


def test_flip_reverses_columns():
    arr = np.repeat(np.repeat(np.arange(32, dtype=np.uint8)[None, :, None], 32, 0), 3, 2)
    base = dict(scale=1.0, resized_h=32, resized_w=32, pad_top=0, pad_left=0, crop_top=0, crop_left=0, crop=32)
    plain = apply_view(arr, ViewParams(flip=False, **base))
    flipped = apply_view(arr, ViewParams(flip=True, **base))
    assert np.array_equal(plain, arr) and np.array_equal(flipped, arr[:, ::-1])


def test_padding_offset_places_image():
    arr = image(10, 20)
    p = ViewParams(scale=1.0, resized_h=10, resized_w=20, flip=False, pad_top=5, pad_left=3, crop_top=0,
                   crop_left=0, crop=32)
    out = apply_view(arr, p)
    assert np.array_equal(out[5:15, 3:23], arr)
    assert out.sum() == arr.astype(np.int64).sum()  # everything else is zero padding


def test_ranges_over_many_draws():
    draws = [draw_view(0, f"id{i}", i % 3, 40, 60, CFG) for i in range(3000)]
    scales = np.array([d.scale for d in draws])
    assert scales.min() >= 0.5 and scales.max() < 2.0
    assert scales.min() < 0.51 and scales.max() > 1.99  # the whole range is reached
    assert abs(scales.mean() - 1.25) < 0.03  # uniform mean, ~5 standard errors
    assert 0.45 < np.mean([d.flip for d in draws]) < 0.55
    for d in draws:
        assert (d.resized_h, d.resized_w) == (int(40 * d.scale), int(60 * d.scale))


def test_inconsistent_params_are_refused():
    with pytest.raises(ValueError, match="inconsistent"):
        ViewParams(scale=1.0, resized_h=10, resized_w=10, flip=False, pad_top=30, pad_left=0, crop_top=0,
                   crop_left=0, crop=32)
    with pytest.raises(ValueError, match="lack"):
        ViewParams.from_dict({"scale": 1.0})


@pytest.mark.parametrize("mode,mean,std", [("imagenet", IMAGENET_MEAN, IMAGENET_STD), ("clip", CLIP_MEAN, CLIP_STD)])
def test_normalise(mode, mean, std):
    x = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    out = normalise(x, mode)
    assert out.dtype == torch.float32
    for c in range(3):
        assert torch.allclose(out[:, c], (x[:, c].double() - mean[c]).div(std[c]).float(), atol=1e-5)
    with pytest.raises(ValueError, match="unknown normalisation"):
        normalise(x, "foo")
