"""WeCLIP's training losses (docs/algorithm.md §7.2 step 3): segmentation CE and the affinity loss.

Total = L_seg + λ·L_aff with λ = `LossConfig.aff_weight` (0.1, [PW] Tab. 11). Defaults follow the released
code: bg/fg-balanced CE and the AFA-style linear affinity loss on a radius-8 window; the paper's plain CE and
cross-entropy affinity loss are the `plain` and `bce` options (§9 rows 9–10). The fully supervised mode
(`supervised_loss`, docs/algorithm.md §8.2) is plain CE against the GT mask alone.

None of the terms is a mean per image: each is a sum over the batch's pixels (or pixel pairs) divided by a count
taken over the whole batch. `count` maps a count of the images given to the count over the global batch: the
identity on one process; on several (`pipeline.training.distributed`) the sum over the processes, so that each
process's value is its share of the global batch's loss and the shares add up to it exactly (docs/design.md §3.5).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from weclip.pipeline.config import IGNORE_INDEX, LossConfig

SEG_MODES = ("balanced", "plain")
AFF_MODES = ("linear", "bce")
Count = Callable[[Tensor], Tensor]  # a count over the images given -> the count over the global batch


def local_count(n: Tensor) -> Tensor:
    """The `count` of a batch that is the whole global batch (one process)."""
    return n


def _masked_mean(values: Tensor, mask: Tensor, count: Count = local_count) -> Tensor:
    """Mean of `values` over `mask` (its count over the global batch); 0 (with a graph) when the mask is empty, where
    the released code gives NaN."""
    return (values * mask).sum() / count(mask.sum()).clamp(min=1)


def upsample_logits(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear, align_corners=False, as the released training and test code (§1, §7.2); no-op at equal size."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def seg_loss(logits: Tensor, label: Tensor, mode: str = "balanced", ignore_index: int = IGNORE_INDEX,
             count: Count = local_count) -> Tensor:
    """Segmentation loss of B×C×h×w logits against a B×H×W label map (values 0..C−1 or ignore_index).

    The logits are upsampled to the label size inside this function (so callers pass the decoder output as is).
    balanced (code, `get_seg_loss`): 0.5·(CE over label==0 + CE over label∉{0, ignore}), each term a mean over its
    pixels across the whole batch; a term without pixels contributes 0 instead of NaN (§7.2).
    plain (paper): CE averaged over all non-ignored pixels (0 if there are none).
    """
    if mode not in SEG_MODES:
        raise ValueError(f"unknown seg loss mode {mode!r}; choose one of {SEG_MODES}")
    label = label.long()
    ce = F.cross_entropy(upsample_logits(logits, tuple(label.shape[-2:])), label,
                         ignore_index=ignore_index, reduction="none")
    valid = label != ignore_index
    if mode == "plain":
        return _masked_mean(ce, valid, count)
    background = label == 0
    return 0.5 * (_masked_mean(ce, background, count) + _masked_mean(ce, valid & ~background, count))


def radius_mask(grid: tuple[int, int], radius: int, device: torch.device | None = None) -> Tensor:
    """N×N bool, True for pixel pairs of the row-major h×w grid within Chebyshev distance `radius`
    (the square, symmetric window of `get_mask_by_radius`, §7.2)."""
    h, w = grid
    idx = torch.arange(h * w, device=device)
    rows, cols = idx // w, idx % w
    dist = torch.maximum((rows[:, None] - rows[None, :]).abs(), (cols[:, None] - cols[None, :]).abs())
    return dist <= radius


def affinity_label(label: Tensor, grid: tuple[int, int], radius: int = 8, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Pairwise affinity target Â (B×N×N uint8: 1 same label, 0 different, ignore_index excluded), §7.2.

    The B×H×W label is downsampled to the grid with `F.interpolate(mode="nearest")`, exactly as
    `cams_to_affinity_label`: source index floor(i·H/h), i.e. the top-left pixel of each cell when H = 16h.
    Pairs farther apart than `radius` (Chebyshev, grid cells) and pairs touching an ignored pixel get ignore_index.
    The diagonal is positive.
    """
    if not 0 <= ignore_index <= 255:
        raise ValueError(f"ignore_index must fit in uint8, got {ignore_index}")
    small = F.interpolate(label[:, None].float(), size=tuple(grid), mode="nearest")[:, 0].long().flatten(1)
    target = (small[:, :, None] == small[:, None, :]).to(torch.uint8)
    ignored = small == ignore_index
    excluded = ~radius_mask(grid, radius, label.device)[None] | ignored[:, :, None] | ignored[:, None, :]
    return target.masked_fill_(excluded, ignore_index)


def affinity_loss(a_f: Tensor, aff_label: Tensor, mode: str = "linear", count: Count = local_count) -> Tensor:
    """Loss between the affinity map A_f (B×N×N, in (0,1)) and Â from `affinity_label`.

    linear (code, AFA's `get_aff_loss`): 0.5·Σ_{Â=1}(1−A_f)/(n_pos+1) + 0.5·Σ_{Â=0}A_f/(n_neg+1), counts over the batch.
    bce ([PW] Eq. 10): binary cross-entropy averaged over the same pairs (Â ∈ {0,1}), computed in fp32 with the
    log clamped at log(float32 tiny) as PyTorch's BCE clamps it, so saturated sigmoids give finite values and grads.
    """
    if mode not in AFF_MODES:
        raise ValueError(f"unknown affinity loss mode {mode!r}; choose one of {AFF_MODES}")
    pos = aff_label == 1
    neg = aff_label == 0
    if mode == "linear":
        pos_term = ((1 - a_f) * pos).sum() / (count(pos.sum()) + 1)
        neg_term = (a_f * neg).sum() / (count(neg.sum()) + 1)
        return 0.5 * pos_term + 0.5 * neg_term
    a = a_f.float()
    tiny = torch.finfo(torch.float32).tiny
    nll = -(pos * torch.log(a.clamp_min(tiny)) + neg * torch.log((1 - a).clamp_min(tiny)))
    return _masked_mean(nll, pos | neg, count)


def total_loss(logits: Tensor, affinity: Tensor, label: Tensor, cfg: LossConfig = LossConfig(),
               ignore_index: int = IGNORE_INDEX, count: Count = local_count) -> dict[str, Tensor]:
    """L = L_seg + λ·L_aff (§7.2). logits B×C×h×w, affinity B×N×N (N = h·w), label B×H×W (the pseudo label M_p).

    The affinity target is built on the logits' grid. Returns {"loss", "seg", "aff"}; with a `count` over several
    processes, this process's shares of them (see the module docstring).
    """
    grid = (logits.shape[-2], logits.shape[-1])
    if affinity.shape[-1] != grid[0] * grid[1]:
        raise ValueError(f"affinity is {tuple(affinity.shape)} but the logits grid is {grid[0]}×{grid[1]}; "
                         "pass the decoder's logits and affinity from the same forward")
    seg = seg_loss(logits, label, cfg.seg, ignore_index, count)
    aff = affinity_loss(affinity, affinity_label(label, grid, cfg.aff_radius, ignore_index), cfg.aff, count)
    return {"loss": seg + cfg.aff_weight * aff, "seg": seg, "aff": aff}


def supervised_loss(logits: Tensor, mask: Tensor, ignore_index: int = IGNORE_INDEX,
                    count: Count = local_count) -> dict[str, Tensor]:
    """The fully supervised objective (§8.2, [PW] Tab. 7): plain CE of the upsampled logits against the B×H×W GT
    mask, `ignore_index` (the mask's ignore label and the crop's padding) left out; no affinity term.
    Returns {"loss", "seg"}."""
    seg = seg_loss(logits, mask, "plain", ignore_index, count)
    return {"loss": seg, "seg": seg}
