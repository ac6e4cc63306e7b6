"""WeCLIP's online pseudo label M_p (docs/algorithm.md §6.4–6.6), one pure function for every caller.

Used by cached training, online training and the CAM evaluation, so the three can never drift apart:

    affinity = rfm_affinity(last `rfm_layers` maps, A_f)   if use_rfm       (§6.4)
               static_affinity(last `static_layers` maps)  otherwise         (CLIP-ES CAA, §5.2)
    refined  = refine_cams(cams, cam_classes, affinity)                      (h×w, min-max per class)
    hi       = upsample_cams(refined, H×W)                                   (bilinear, §6.5 step 1)
    scores   = [bg = (1 − max fg)^p, cams]                                   (§6.5 step 2)
    scores   = PAR(normalised image, scores)                                 (§6.5 step 3, §6.6)
    M_p      = keys[argmax]   (0 = background, class_id + 1)                 (§6.5 step 4)

There is no ignore region: no thresholds, no CRF, and the zero-padded part of the crop is labelled like any
other pixel (§0.1 item 8, §9 row 20), exactly as the released code does.
"""
from __future__ import annotations

import torch

from weclip.pipeline.config import RefineConfig
from weclip.pipeline.refinement.par import PAR
from weclip.pipeline.refinement.refine import cam_scores, refine_cams, rfm_affinity, scores_to_labels, static_affinity, upsample_cams


def rfm_active(step: int, refine: RefineConfig) -> bool:
    """Whether RFM replaces the static CAA at 0-based training iteration `step` (§6.4, §9 row 5).

    The released code switches on `iter_num > rfm_start_iter` with `iter_num` incremented at the start of every
    model forward (1-based), i.e. from the (rfm_start_iter + 1)-th forward: 0-based step ≥ rfm_start_iter.
    Quirk not copied: on VOC that counter also counts the 1,464 validation forwards run every 2,000 iterations,
    so the released VOC run really switches at training iteration ≈ 9,145. Here only training iterations count;
    to reproduce the released VOC timing set `refine.rfm_start_iter = 9145`.
    """
    return step >= refine.rfm_start_iter


@torch.no_grad()
def online_pseudo_label(cams: torch.Tensor, cam_classes: torch.Tensor, attn: torch.Tensor, a_f: torch.Tensor | None,
                        image_norm: torch.Tensor, *, use_rfm: bool, refine: RefineConfig, par: PAR) -> torch.Tensor:
    """Pseudo labels B×H×W int64 (0 = background, class_id + 1) for a batch (see the module docstring).

    cams: B×K×h×w Grad-CAMs in [0, 1]; cam_classes: B×K class id per slot (−1 = empty); attn: B×L×N×N
    head-averaged patch attention of the stored blocks in order (the last is the backbone's last block,
    CLS dropped, N = h·w); a_f: B×N×N decoder affinity (used detached; needed only when `use_rfm`); image_norm:
    B×3×H×W the normalised network input, which sets the output size and guides PAR. Runs without grad.
    """
    b, k, h, w = cams.shape
    n = h * w
    if attn.dim() != 4 or attn.shape[0] != b or attn.shape[-2:] != (n, n):
        raise ValueError(f"attn must be B×L×N×N = {b}×L×{n}×{n} for CAMs of shape {tuple(cams.shape)}, "
                         f"got {tuple(attn.shape)}")
    if image_norm.dim() != 4 or image_norm.shape[:2] != (b, 3):
        raise ValueError(f"image_norm must be B×3×H×W with B = {b}, got {tuple(image_norm.shape)}")
    if use_rfm:
        if a_f is None:
            raise ValueError("RFM (use_rfm=True) needs the decoder affinity a_f")
        affinity = rfm_affinity(attn, a_f.detach(), refine.rfm_layers, refine.rfm_filter)
    else:
        affinity = static_affinity(attn, refine.static_layers)
    refined = refine_cams(cams, cam_classes, affinity, refine)
    hi = upsample_cams(refined, tuple(image_norm.shape[-2:]))
    scores, keys = cam_scores(hi, cam_classes, refine.bg_power)
    return scores_to_labels(par(image_norm, scores), keys)
