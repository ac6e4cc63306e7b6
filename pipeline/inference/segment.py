"""Inference maths: WeCLIP's multi-scale + flip logits, and the CAM maps of CLIP-ES pseudo masks and visualisations.

Tensors in, tensors out; no files, no processes (the stages do that). Section numbers refer to
`docs/algorithm.md`.

Sizes that are not multiples of the patch size: the released model's patch embedding is a stride-16 conv without
padding, which never reads the last H mod 16 rows and W mod 16 columns, and its positional table is resized to
(H//16, W//16) (§1, §3.2 step 1). `segment_fn` does exactly that, explicitly: it drops those rows and columns before
the backbone (the same numbers as the released conv) and returns logits on the floored grid. `msc_flip_logits` then
stretches them over the whole image by its bilinear resizes, as the released test script does; the consequence, an
offset of at most 15 input pixels at the bottom / right edge, is kept deliberately so that scores stay comparable
with the released numbers. (At the default long side 512 a 500×375 VOC image becomes 512×384, a multiple of 16.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from weclip.pipeline.model.protocol import Backbone, CLIPBackbone
from weclip.pipeline.model.cam import softmax_gradcam
from weclip.pipeline.config import Config, EvalConfig, RefineConfig
from weclip.pipeline.model.decoder import WeCLIPDecoder
from weclip.pipeline.refinement.par import PAR
from weclip.pipeline.refinement.pseudo_label import online_pseudo_label
from weclip.pipeline.refinement.refine import cam_scores, refine_cams, rfm_affinity, static_affinity, upsample_cams
from weclip.pipeline.model.text import TextEmbeddings
from weclip.pipeline.errors import ConfigError, DataError

# A normalised batch B×3×H×W → B×C×h×w segmentation logits at patch resolution.
SegFn = Callable[[torch.Tensor], torch.Tensor]


class ImageTooSmall(DataError):
    """At some inference scale the image has fewer pixels than one patch on a side (e.g. a 4×3000 strip)."""
    reason = "too_small"


def long_side_size(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(int(H·ratio), int(W·ratio)), ratio = long_side / max(H, W), at least 1 pixel (§8.1 step 2)."""
    ratio = long_side / max(height, width)
    return max(1, int(height * ratio)), max(1, int(width * ratio))


def msc_sizes(height: int, width: int, cfg: EvalConfig) -> list[tuple[int, int]]:
    """The input size of every scale of `msc_flip_logits` for an H×W image: the long-side size, times each scale
    with floor (what `F.interpolate(scale_factor=s)` gives)."""
    base = long_side_size(height, width, cfg.long_side)
    return [base if s == 1.0 else (math.floor(base[0] * s), math.floor(base[1] * s)) for s in cfg.scales]


def check_msc_size(height: int, width: int, cfg: EvalConfig, patch: int) -> None:
    """Raise ImageTooSmall before any work when a scale of the multi-scale inference leaves less than one patch."""
    for scale, (h, w) in zip(cfg.scales, msc_sizes(height, width, cfg)):
        if h < patch or w < patch:
            raise ImageTooSmall(f"a {height}×{width} image is {h}×{w} pixels at long side {cfg.long_side} and scale "
                                f"{scale}, smaller than one {patch}×{patch} patch; crop or pad it, or change "
                                "eval.long_side / eval.scales")


def resize_long_side(image: torch.Tensor, long_side: int) -> torch.Tensor:
    """Resize B×3×H×W so that its long side is `long_side` (§8.1 step 2): ratio = long_side / max(H, W),
    size (int(H·ratio), int(W·ratio)) with int() truncation, bilinear, align_corners=False, on the normalised
    tensor. Applied to small images too (they are upscaled), as the released script does."""
    height, width = image.shape[-2:]
    size = long_side_size(height, width, long_side)
    if size == (height, width):
        return image
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False)


def msc_flip_logits(seg_fn: SegFn, image_norm: torch.Tensor, cfg: EvalConfig = EvalConfig()) -> torch.Tensor:
    """Multi-scale + flip logits of one normalised image 1×3×H×W → C×H×W (§8.1 steps 2–4).

    The image's long side is resized to `cfg.long_side`. For each scale s of `cfg.scales` (released: 1.0, 0.75) the
    resized image is interpolated with scale_factor s (bilinear, align_corners=False; skipped for 1.0), batched with
    its h-flip into one `seg_fn` call, both logits are resized bilinearly to the logit size of the first scale (the
    reference, 1.0 in the released order), and the flip's logits are flipped back and averaged with the image's.
    The per-scale logits are averaged, then upsampled bilinearly to the original H×W. `cfg.flip=False` drops the
    flipped copies.
    """
    if image_norm.ndim != 4 or image_norm.shape[:2] != (1, 3):
        raise ValueError(f"msc_flip_logits takes one normalised image 1×3×H×W, got {tuple(image_norm.shape)}")
    if not cfg.scales or min(cfg.scales) <= 0:
        raise ConfigError(f"eval.scales must be positive scale factors, got {cfg.scales}")
    height, width = image_norm.shape[-2:]
    base = resize_long_side(image_norm, cfg.long_side)
    reference: tuple[int, int] | None = None
    merged = []
    for scale in cfg.scales:
        x = base if scale == 1.0 else F.interpolate(base, scale_factor=scale, mode="bilinear", align_corners=False)
        logits = seg_fn(torch.cat([x, x.flip(-1)]) if cfg.flip else x)
        if reference is None:
            reference = tuple(logits.shape[-2:])
        if tuple(logits.shape[-2:]) != reference:
            logits = F.interpolate(logits, size=reference, mode="bilinear", align_corners=False)
        merged.append((logits[0] + logits[1].flip(-1)) / 2 if cfg.flip else logits[0])
    mean = torch.stack(merged).mean(dim=0)
    return F.interpolate(mean[None], size=(height, width), mode="bilinear", align_corners=False)[0]


def floor_to_patches(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Drop the last H mod p rows and W mod p columns: what the released stride-p patch conv ignores (module doc)."""
    height, width = (images.shape[-2] // patch) * patch, (images.shape[-1] // patch) * patch
    if height == 0 or width == 0:
        raise ImageTooSmall(f"an input of {images.shape[-2]}×{images.shape[-1]} pixels is smaller than one "
                         f"{patch}×{patch} patch; lower eval.scales or raise eval.long_side")
    return images[..., :height, :width]


def patch_tokens(backbone: Backbone, images: torch.Tensor, layers: Sequence[int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """The decoder's input for normalised images B×3×H×W (multiples of the patch size): patch tokens of the 1-based
    blocks `layers` (CLS dropped), B×L×N×D, and the grid. Block n (paper variant, §9 row 6) needs the last block."""
    n = backbone.num_blocks
    frozen = backbone.forward_frozen(images, token_layers=sorted({i for i in layers if i < n}), attn_layers=())
    tokens = dict(zip(frozen.token_layers, frozen.tokens))
    if n in layers:
        tokens[n] = backbone.last_block(frozen.last)[1].detach()
    return torch.stack([tokens[i][:, 1:] for i in layers], dim=1), frozen.grid


def segment_fn(backbone: Backbone, decoder: WeCLIPDecoder, layers: Sequence[int]) -> SegFn:
    """seg_fn for `msc_flip_logits`: frozen backbone tokens of blocks `layers` → decoder logits, one batched
    backbone call per input batch, without grad. Inputs of any size are floored to the patch grid (module doc).
    The decoder must be on the backbone's device and in eval mode (dropout off, §8.1 step 5)."""
    layers = tuple(int(i) for i in layers)
    if not layers or list(layers) != sorted(set(layers)) or not 1 <= layers[0] <= layers[-1] <= backbone.num_blocks:
        raise ConfigError(f"decoder layers must be distinct ascending blocks in 1..{backbone.num_blocks}, got {layers}")
    if decoder.in_layers != len(layers) or decoder.in_dim != backbone.width:
        raise ConfigError(f"the decoder takes {decoder.in_layers} layers of width {decoder.in_dim}, but blocks "
                         f"{layers} of {backbone.name!r} (width {backbone.width}) were asked for; use the feature "
                         "layers and backbone the decoder was trained with")

    @torch.no_grad()
    def seg(images: torch.Tensor) -> torch.Tensor:
        images = floor_to_patches(images, backbone.patch_size).to(backbone.device)
        features, grid = patch_tokens(backbone, images, layers)
        return decoder(features, grid).logits

    return seg


def clipes_input(rgb: np.ndarray, patch: int) -> np.ndarray:
    """CLIP-ES's input size (§5.1, §9 row 22): PIL bicubic resize of H×W×3 uint8 to ceil(H/p)·p × ceil(W/p)·p
    (unchanged when already multiples). Normalisation is separate (`pipeline.data.augment.normalise`)."""
    height, width = rgb.shape[:2]
    size = (math.ceil(height / patch) * patch, math.ceil(width / patch) * patch)
    if size == (height, width):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.Resampling.BICUBIC))


@dataclass
class CamMaps:
    """CAMs of one image: `cams` the initial Softmax-Grad-CAMs and `refined` the CAA / RFM-refined ones, K×h×w in
    [0, 1] at patch resolution (slot k = class `cam_classes[k]`); for CLIP-ES `scores` (1+K)×H×W = [bg, refined
    CAMs upsampled] and `keys` (1+K) their labels; for WeCLIP `pseudo` the online pseudo label H'×W'."""
    cams: torch.Tensor
    refined: torch.Tensor
    cam_classes: torch.Tensor
    scores: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    pseudo: torch.Tensor | None = None


def last_blocks(backbone: Backbone, count: int) -> tuple[int, ...]:
    """The 1-based indices of the backbone's last `count` blocks (attention maps CAA / RFM average over)."""
    n = backbone.num_blocks
    if not 1 <= count <= n:
        raise ConfigError(f"asked for the attention of the last {count} blocks, but {backbone.name!r} has {n}; "
                         "lower refine.static_layers / refine.rfm_layers for this model")
    return tuple(range(n - count + 1, n + 1))


def clipes_cam_scores(backbone: CLIPBackbone, text: TextEmbeddings, image_norm: torch.Tensor, labels: Sequence[int],
                      size: tuple[int, int], refine: RefineConfig = RefineConfig()) -> CamMaps:
    """CLIP-ES pseudo-mask scores of one image (§5.1–5.3) before the DenseCRF.

    image_norm: 1×3×H'×W' (H', W' multiples of the patch size, `clipes_input`); labels: its ascending class ids.
    Softmax-Grad-CAM on the whole image (§4) → CAA: mean attention of the last `refine.static_layers` blocks,
    Sinkhorn, box masks at `refine.box_threshold` (§5.2) → min-max → bilinear to `size` (the original H×W, §5.2 step
    7) → [bg = (1 − max)^p, CAMs] with p = `refine.bg_power` (1, as CLIP-ES's CRF script, §5.3).
    """
    batch = softmax_gradcam(backbone, image_norm, [list(labels)], text, feature_layers=(),
                            attn_layers=last_blocks(backbone, refine.static_layers))
    refined = refine_cams(batch.cams, batch.cam_classes, static_affinity(batch.attn, refine.static_layers), refine)
    scores, keys = cam_scores(upsample_cams(refined, size), batch.cam_classes, refine.bg_power)
    return CamMaps(cams=batch.cams[0], refined=refined[0], cam_classes=batch.cam_classes[0], scores=scores[0],
                   keys=keys[0])


def weclip_cam_maps(backbone: CLIPBackbone, decoder: WeCLIPDecoder, text: TextEmbeddings, image_norm: torch.Tensor,
                    labels: Sequence[int], layers: Sequence[int], cfg: Config) -> CamMaps:
    """WeCLIP's CAM branch in 'val' mode (§8.1 step 4, §6.4: RFM always on) for one image 1×3×H×W (multiples of the
    patch size): Softmax-Grad-CAM, RFM with the decoder's A_f, and the online pseudo label after PAR (§6.5). Used
    for visualisations; needs the image's labels, as the released script does (it reads the GT PNG)."""
    n_attn = max(cfg.refine.rfm_layers, cfg.refine.static_layers)
    batch = softmax_gradcam(backbone, image_norm, [list(labels)], text, feature_layers=layers,
                            attn_layers=last_blocks(backbone, n_attn))
    with torch.no_grad():
        out = decoder(batch.features, batch.grid)
    affinity = rfm_affinity(batch.attn, out.affinity, cfg.refine.rfm_layers, cfg.refine.rfm_filter)
    refined = refine_cams(batch.cams, batch.cam_classes, affinity, cfg.refine)
    pseudo = online_pseudo_label(batch.cams, batch.cam_classes, batch.attn, out.affinity, image_norm, use_rfm=True,
                                 refine=cfg.refine, par=PAR(cfg.par))
    return CamMaps(cams=batch.cams[0], refined=refined[0], cam_classes=batch.cam_classes[0], pseudo=pseudo[0])
