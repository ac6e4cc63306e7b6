"""CAM refinement: CLIP-ES's static CAA and WeCLIP's dynamic RFM, and CAM -> pseudo label.

Pure functions on tensors, batched over leading dimensions. Section numbers refer to
`docs/algorithm.md`. The pipeline for one batch is

    affinity = static_affinity(attn) or rfm_affinity(attn, a_f, ...)      (B x N x N, N = h*w)
    refined  = refine_cams(cams, cam_classes, affinity, cfg)              (B x K x h x w, min-max per class)
    hi       = upsample_cams(refined, (H, W))
    scores, keys = cam_scores(hi, cam_classes, cfg.bg_power)             ([bg, cams] stack, PAR/CRF input)
    labels   = scores_to_labels(scores, keys)                             (B x H x W, 0 = bg, c+1 = class c)
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from weclip.pipeline.config import RefineConfig
from weclip.pipeline.errors import ConfigError

# Epsilons of the released code, not settings.
RFM_EPS = 1e-5  # Σ G^l + 1e-5 in the RFM layer average (§6.4, §9 row 4)
MINMAX_EPS = 1e-7  # pytorch_grad_cam `scale_cam_image`: x -= min; x /= (max + 1e-7) (§4 step 4, §6.5 step 1)
EMPTY_KEY = -1  # key of an empty CAM slot (cam class -1); such a slot can never be the argmax


def sinkhorn(a: torch.Tensor, rounds: int = RefineConfig.sinkhorn_rounds) -> torch.Tensor:
    """`rounds` x (column-normalise, then row-normalise) of the last two dims; no epsilon (§5.2 step 2).

    The result is row-stochastic exactly (the last step is a row normalisation) and, for a
    well-conditioned positive matrix, close to column-stochastic.
    """
    d = a
    for _ in range(rounds):
        d = d / d.sum(dim=-2, keepdim=True)
        d = d / d.sum(dim=-1, keepdim=True)
    return d


def transition(a: torch.Tensor, rounds: int = RefineConfig.sinkhorn_rounds) -> torch.Tensor:
    """CAA/RFM transition matrix: Sinkhorn -> (D + Dᵀ)/2 -> one squaring D @ D (§5.2 steps 2-3, §9 row 23)."""
    d = sinkhorn(a, rounds)
    d = (d + d.transpose(-1, -2)) / 2
    return d @ d


def box_masks(cams: torch.Tensor, threshold: float = RefineConfig.box_threshold,
              mode: Literal["released", "fixed"] = RefineConfig.box_mode) -> torch.Tensor:
    """Union of the bounding boxes of the thresholded CAM's regions, per map (`scoremap2bbox`, §5.2 step 4).

    cams: ... x h x w in [0, 1]. Per map: u8 = floor(cam * 255) (the uint8 cast; values are clipped to
    [0, 255] first, a no-op for valid CAMs), foreground = u8 > int(threshold * max(u8)) (cv2
    THRESH_BINARY is strict), one box per region. `released` fills the box as the code's slice
    [y0:min(y1, h-1), x0:min(x1, w-1)] with exclusive y1/x1, so the last row and column are never inside
    (§10); `fixed` fills the inclusive box. An all-zero CAM has no region and gives an all-False mask.

    Why connected components instead of cv2.findContours(RETR_TREE) + boundingRect: OpenCV traces
    foreground with 8-connectivity (holes with 4-connectivity), so each *outer* contour is the border
    of exactly one 8-connected foreground component and contains its extreme pixels; its bounding rect
    is the component's bounding box (CHAIN_APPROX_SIMPLE keeps segment end points, so the rect is
    unchanged). Every other contour RETR_TREE returns is a hole border, made of pixels of the same
    component, so its box lies inside the outer box and adds nothing to the union. Components nested
    inside holes are separate 8-connected components with their own outer contour. OpenCV >= 3.2 pads
    the image with a zero border internally, so regions touching the image edge are not clipped.
    Hence the union of 8-connected component boxes equals the union of all contour boxes.
    """
    if mode not in ("released", "fixed"):
        raise ValueError(f"box mode must be 'released' or 'fixed', got {mode!r}")
    if cams.dim() < 2:
        raise ValueError(f"box_masks expects ... x h x w CAMs, got shape {tuple(cams.shape)}")
    h, w = cams.shape[-2:]
    maps = cams.detach().to("cpu", torch.float32).reshape(-1, h, w).numpy()
    u8 = np.clip(maps * np.float32(255), 0, 255).astype(np.uint8)
    thresh = np.floor(threshold * u8.max(axis=(1, 2)).astype(np.float64)).astype(np.int64)  # int(λ·max)
    fg = u8 > thresh[:, None, None]
    # 3-D labelling whose structure only links pixels within one map: one scipy call for all maps.
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 8-connectivity inside a map
    labels, _ = ndimage.label(fg, structure=structure)
    out = np.zeros_like(fg)
    row_end, col_end = (h - 1, w - 1) if mode == "released" else (h, w)
    for maps_slice, rows, cols in ndimage.find_objects(labels):
        out[maps_slice, rows.start:min(rows.stop, row_end), cols.start:min(cols.stop, col_end)] = True
    return torch.from_numpy(out).reshape(cams.shape).to(cams.device)


def static_affinity(attn: torch.Tensor, layers: int = RefineConfig.static_layers) -> torch.Tensor:
    """CLIP-ES CAA affinity: mean of the last `layers` patch-to-patch attention maps (§5.2 step 1).

    attn: ... x L x N x N, blocks in order (the last is block 12), CLS already dropped.
    """
    return _last_maps(attn, layers).mean(dim=-3)


def rfm_layer_mask(attn: torch.Tensor, a_f: torch.Tensor, layers: int = RefineConfig.rfm_layers,
                   filter: Literal["signed", "abs"] = RefineConfig.rfm_filter) -> torch.Tensor:
    """RFM layer selection G^l (§6.4): 1 where S^l <= mean_l S^l over the last `layers` maps.

    `signed` (released code): S^l = Σ(A_f - A_s^l) = ΣA_f - ΣA_s^l, computed as the difference of the two
    sums (the same number, with less rounding); ΣA_f is common to every layer, so G does not depend
    on A_f at all (§0.1 item 1). `abs` (paper Eq. 5): S^l = Σ|A_f - A_s^l|. Returns ... x layers.
    """
    sel = _last_maps(attn, layers)
    a_f = _at_least_float32(a_f.detach()).unsqueeze(-3)
    if filter == "signed":
        s = a_f.sum(dim=(-1, -2)) - sel.sum(dim=(-1, -2))
    elif filter == "abs":
        s = (a_f - sel).abs().sum(dim=(-1, -2))
    else:
        raise ValueError(f"RFM filter must be 'signed' or 'abs', got {filter!r}")
    return (s <= s.mean(dim=-1, keepdim=True)).to(sel.dtype)


def rfm_affinity(attn: torch.Tensor, a_f: torch.Tensor, layers: int = RefineConfig.rfm_layers,
                 filter: Literal["signed", "abs"] = RefineConfig.rfm_filter) -> torch.Tensor:
    """WeCLIP RFM affinity R = A_f ⊙ Σ_l G^l A_s^l / (Σ_l G^l + 1e-5) (§6.4, [PW] Eq. 7).

    attn: ... x L x N x N (CLS dropped, last = block 12); a_f: ... x N x N, the decoder's
    sigmoid(F_uᵀF_u), used detached. Returns ... x N x N (no grad).
    """
    g = rfm_layer_mask(attn, a_f, layers, filter)
    sel = _last_maps(attn, layers)
    mean = (g[..., None, None] * sel).sum(dim=-3) / (g.sum(dim=-1)[..., None, None] + RFM_EPS)
    return _at_least_float32(a_f.detach()) * mean


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Per-map `scale_cam_image` over the last two dims: x -= min; x /= (max + 1e-7) (§6.5 step 1). No ReLU."""
    x = x - x.amin(dim=(-1, -2), keepdim=True)
    return x / (x.amax(dim=(-1, -2), keepdim=True) + MINMAX_EPS)


def refine_cams(cams: torch.Tensor, cam_classes: torch.Tensor, affinity: torch.Tensor,
                cfg: RefineConfig = RefineConfig()) -> torch.Tensor:
    """CAA / RFM refinement of patch-level CAMs (§5.2 steps 2-6, §6.4, §6.5 step 1).

    cams: B x K x h x w in [0, 1]; cam_classes: B x K (class id, -1 = empty slot); affinity: B x N x N
    with N = h*w (static or RFM). Per class c: T_c = transition(affinity) ⊙ B_c on columns, refined =
    T_c · vec(cam_c), then min-max. Masking the columns of T is the same as masking the vector, so
    all classes go through one batched matmul: T @ (B_c ⊙ cam_c). Empty slots come out as zeros, and so
    does a class whose box mask is empty. Computed in (at least) float32, as the released code does.
    """
    b, k, h, w = cams.shape
    n = h * w
    if affinity.shape != (b, n, n):
        raise ValueError(f"affinity must be B x N x N = {(b, n, n)} for CAMs of shape {tuple(cams.shape)}, "
                         f"got {tuple(affinity.shape)}")
    if cam_classes.shape != (b, k):
        raise ValueError(f"cam_classes must be B x K = {(b, k)}, got {tuple(cam_classes.shape)}")
    cams = _at_least_float32(cams.detach())
    t = transition(affinity.detach().to(cams.dtype), cfg.sinkhorn_rounds)
    sources = cams * box_masks(cams, cfg.box_threshold, cfg.box_mode)
    refined = torch.einsum("bij,bkj->bki", t, sources.reshape(b, k, n)).reshape(b, k, h, w)
    valid = (cam_classes >= 0).to(cams.device)[..., None, None]
    return torch.where(valid, minmax(refined), torch.zeros_like(refined))


def upsample_cams(cams: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of B x K x h x w maps to `size` = (H, W), align_corners=False, no antialias:
    the same sampling as cv2.resize INTER_LINEAR used by the released code (§5.2 step 7, §6.5 step 1)."""
    return F.interpolate(_at_least_float32(cams), size=tuple(size), mode="bilinear", align_corners=False)


def cam_keys(cam_classes: torch.Tensor) -> torch.Tensor:
    """Label of each channel of the [bg, cams] stack: B x (1+K) int64, 0 for bg, class_id + 1 for a
    slot, EMPTY_KEY (-1) for an empty slot (§5.3, §6.5 step 4)."""
    cls = cam_classes.to(torch.int64)
    fg = torch.where(cls >= 0, cls + 1, torch.full_like(cls, EMPTY_KEY))
    return torch.cat([torch.zeros_like(fg[:, :1]), fg], dim=1)


def cam_scores(cams_hi: torch.Tensor, cam_classes: torch.Tensor,
               bg_power: float = RefineConfig.bg_power) -> tuple[torch.Tensor, torch.Tensor]:
    """[bg, cams] score stack and its keys (§5.3, §6.5 step 2): bg = (1 - max over present classes)^p.

    cams_hi: B x K x H x W in [0, 1]. Empty slots are zeroed and excluded from the max (with no present
    class, bg = 1). No softmax: PAR and CLIP-ES's CRF take this stack as is. Returns
    (B x (1+K) x H x W scores, B x (1+K) keys).
    """
    if cam_classes.shape != cams_hi.shape[:2]:
        raise ValueError(f"cam_classes must be B x K = {tuple(cams_hi.shape[:2])}, got {tuple(cam_classes.shape)}")
    valid = (cam_classes >= 0).to(cams_hi.device)[..., None, None]
    cams = torch.where(valid, cams_hi, torch.zeros_like(cams_hi))
    bg = (1 - cams.amax(dim=1, keepdim=True)).pow(bg_power)
    return torch.cat([bg, cams], dim=1), cam_keys(cam_classes).to(cams_hi.device)


def scores_to_labels(scores: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """labels = keys[argmax over channels], with empty channels (key < 0) never chosen.

    scores: B x C x H x W, keys: B x C -> B x H x W int64 (0 = bg, class_id + 1 otherwise).
    """
    keys = keys.to(scores.device)
    masked = scores.masked_fill((keys < 0)[..., None, None], float("-inf"))
    idx = masked.argmax(dim=1)
    return torch.gather(keys, 1, idx.flatten(1)).reshape(idx.shape)


def cams_to_labels(cams_hi: torch.Tensor, cam_classes: torch.Tensor,
                   bg_power: float = RefineConfig.bg_power) -> torch.Tensor:
    """Pseudo labels without PAR: scores_to_labels(*cam_scores(...)) (§5.3). B x H x W int64."""
    return scores_to_labels(*cam_scores(cams_hi, cam_classes, bg_power))


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 cache arrays are computed on in float32 (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _last_maps(attn: torch.Tensor, layers: int) -> torch.Tensor:
    """The last `layers` maps of ... x L x N x N attention, detached, at least float32."""
    if attn.dim() < 3 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attention must be ... x L x N x N, got shape {tuple(attn.shape)}")
    if not 1 <= layers <= attn.shape[-3]:
        raise ConfigError(f"asked for the last {layers} attention maps but only {attn.shape[-3]} are stored; "
                         "store more blocks (ExtractConfig.attn_layers) or lower the layer count")
    return _at_least_float32(attn.detach()[..., -layers:, :, :])
