"""One training view of an image, as WeCLIP's training loader makes it (docs/algorithm.md §7.1).

1. random rescale: one ratio r ~ U(0.5, 2.0) for both sides, PIL bilinear, size int(r·W) × int(r·H);
2. horizontal flip with p = 0.5;
3. random crop `crop`×`crop`: a side smaller than the crop is first zero-padded at a uniform random
   offset (WeCLIP `random_crop`: canvas = max(crop, side)), then a uniform crop box is taken;
4. no colour jitter (commented out in the released code); normalisation is separate (`normalise`).

The parameters are drawn deterministically from (seed, image_id, view) through sha256, recorded as
a `ViewParams`, and `apply_view` reproduces the crop exactly from the record, for images (bilinear,
fill 0) and masks (nearest, fill 255). `valid_mask` marks the non-padding pixels (WeCLIP's unused
`img_box`).
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from weclip.pipeline.config import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, AugConfig

_STATS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "clip": (CLIP_MEAN, CLIP_STD)}


@dataclass(frozen=True)
class ViewParams:
    """Everything needed to rebuild one view. Offsets are in resized-image pixels; the padded canvas
    is max(crop, resized) per side, the image sits at (pad_top, pad_left) in it and the crop box
    starts at (crop_top, crop_left)."""
    scale: float
    resized_h: int
    resized_w: int
    flip: bool
    pad_top: int
    pad_left: int
    crop_top: int
    crop_left: int
    crop: int

    def __post_init__(self) -> None:
        canvas_h, canvas_w = max(self.crop, self.resized_h), max(self.crop, self.resized_w)
        ok = (self.resized_h >= 1 and self.resized_w >= 1 and self.crop >= 1
              and 0 <= self.pad_top <= canvas_h - self.resized_h and 0 <= self.pad_left <= canvas_w - self.resized_w
              and 0 <= self.crop_top <= canvas_h - self.crop and 0 <= self.crop_left <= canvas_w - self.crop)
        if not ok:
            raise ValueError(f"inconsistent view parameters: {self}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ViewParams":
        names = {f.name for f in fields(cls)}
        missing = names - set(data)
        if missing:
            raise ValueError(f"view parameters lack {sorted(missing)}; got {sorted(data)}")
        return cls(scale=float(data["scale"]), flip=bool(data["flip"]),
                   **{n: int(data[n]) for n in names - {"scale", "flip"}})


def view_rng(seed: int, image_id: str, view: int) -> np.random.Generator:
    """A generator that depends only on (seed, image_id, view), stable across processes and machines."""
    digest = hashlib.sha256(f"{seed}\x1f{image_id}\x1f{view}".encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))


def draw_view(seed: int, image_id: str, view: int, height: int, width: int, cfg: AugConfig) -> ViewParams:
    """Draw the parameters of view `view` of an image of size height×width (docs/algorithm.md §7.1)."""
    rng = view_rng(seed, image_id, view)
    lo, hi = cfg.scale_range
    scale = float(rng.uniform(lo, hi))
    # int() truncation as WeCLIP's random_scaling; at least one pixel so tiny images stay valid
    resized_h, resized_w = max(1, int(height * scale)), max(1, int(width * scale))
    flip = bool(rng.random() < cfg.flip_prob)
    canvas_h, canvas_w = max(cfg.crop, resized_h), max(cfg.crop, resized_w)
    pad_top = int(rng.integers(0, canvas_h - resized_h + 1))
    pad_left = int(rng.integers(0, canvas_w - resized_w + 1))
    crop_top = int(rng.integers(0, canvas_h - cfg.crop + 1))
    crop_left = int(rng.integers(0, canvas_w - cfg.crop + 1))
    return ViewParams(scale, resized_h, resized_w, flip, pad_top, pad_left, crop_top, crop_left, cfg.crop)


def apply_view(array: np.ndarray, params: ViewParams, *, nearest: bool = False, fill: int = 0) -> np.ndarray:
    """Rescale, flip, pad and crop an H×W×C or H×W uint8 array; returns crop×crop(×C).

    Images: bilinear, fill 0 (black before normalisation). Masks: `nearest=True, fill=255` (ignore).
    """
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"apply_view expects an H×W or H×W×C uint8 array, got {array.dtype} {array.shape}")
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    resized = np.asarray(Image.fromarray(array).resize((params.resized_w, params.resized_h), resample))
    if params.flip:
        resized = resized[:, ::-1]
    return _pad_and_crop(resized, params, fill)


def valid_mask(params: ViewParams) -> np.ndarray:
    """crop×crop bool array, True where the view shows image pixels rather than padding."""
    return _pad_and_crop(np.ones((params.resized_h, params.resized_w), dtype=bool), params, False)


def _pad_and_crop(resized: np.ndarray, params: ViewParams, fill: int | bool) -> np.ndarray:
    """Place the resized (and flipped) array on the padded canvas and cut the crop box out of it."""
    canvas_h, canvas_w = max(params.crop, params.resized_h), max(params.crop, params.resized_w)
    canvas = np.full((canvas_h, canvas_w) + resized.shape[2:], fill, dtype=resized.dtype)
    canvas[params.pad_top:params.pad_top + params.resized_h, params.pad_left:params.pad_left + params.resized_w] = resized
    return canvas[params.crop_top:params.crop_top + params.crop, params.crop_left:params.crop_left + params.crop].copy()


def normalise(images: torch.Tensor, mode: Literal["imagenet", "clip"]) -> torch.Tensor:
    """uint8 (…)×3×H×W in 0..255 -> float32 (x − mean)/std with the 0..255-scale statistics.

    WeCLIP uses ImageNet statistics, CLIP-ES CLIP's (docs/algorithm.md §0.1 item 5).
    """
    try:
        mean, std = _STATS[mode]
    except KeyError:
        raise ValueError(f"unknown normalisation {mode!r}; choose one of {sorted(_STATS)}") from None
    if images.shape[-3] != 3:
        raise ValueError(f"normalise expects channels at dim -3 (…×3×H×W), got shape {tuple(images.shape)}")
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(3, 1, 1)
    return (images.float() - m) / s
