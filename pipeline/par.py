"""Pixel-adaptive refinement (PAR, from AFA; WeCLIP `WeCLIP_model/PAR.py`), ALGORITHM.md §6.6.

Each pixel's score vector is replaced, `num_iter` times, by a weighted sum of its 8 x len(dilations)
dilated neighbours (centre excluded, replicate padding). The weights mix an image term (softmax over
neighbours of -(|I_n - I_centre| / (std_n(I_n) + 1e-8) / w1)², averaged over the guide's channels)
and a position term (the same transform of the neighbour distances), weighted by w2. The weights sum
to 1 + w2 per pixel, so PAR scales every map by (1 + w2)^num_iter; argmax labels are unaffected.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from pipeline.config import ParConfig

PAR_EPS = 1e-8  # added to the neighbour std in both terms (AFA/WeCLIP PAR.py, §6.6)
DIRECTIONS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))  # 3x3 minus centre


def neighbour_offsets(dilations: tuple[int, ...]) -> list[tuple[int, int]]:
    """(dy, dx) of the 8 neighbours at each dilation, in dilation order: 8 * len(dilations) offsets."""
    return [(dy * d, dx * d) for d in dilations for dy, dx in DIRECTIONS]


def shifted(x: torch.Tensor, offsets: list[tuple[int, int]]) -> Iterator[torch.Tensor]:
    """Yield x sampled at (i + dy, j + dx) for each offset, with coordinates clamped to the image.

    Clamping is replicate padding: one pad by the largest offset serves every dilation.
    """
    h, w = x.shape[-2:]
    p = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    padded = F.pad(x, [p, p, p, p], mode="replicate")
    for dy, dx in offsets:
        yield padded[..., p + dy:p + dy + h, p + dx:p + dx + w]


def par_affinity(guide: torch.Tensor, dilations: tuple[int, ...], w1: float, w2: float) -> torch.Tensor:
    """PAR weights B x n x H x W (n = 8 * len(dilations)) from a guide image B x C x H x W (§6.6).

    Image term: per channel, |I_n - I| / (unbiased std over the n neighbours + 1e-8) / w1, squared,
    negated, averaged over channels, softmax over n. Position term: distances d (axial) and √2·d
    (diagonal), the same transform with the std over the n distances, softmax over n. Sum: img + w2·pos.
    """
    offsets = neighbour_offsets(dilations)
    logits = torch.zeros((guide.shape[0], len(offsets)) + guide.shape[-2:], dtype=guide.dtype, device=guide.device)
    for c in range(guide.shape[1]):  # one channel at a time keeps memory at B x n x H x W
        channel = guide[:, c]
        nb = torch.stack(list(shifted(channel, offsets)), dim=1)
        std = nb.std(dim=1, keepdim=True)
        logits -= ((nb - channel[:, None]).abs() / (std + PAR_EPS) / w1) ** 2
    img = torch.softmax(logits / guide.shape[1], dim=1)
    dist = torch.tensor([math.hypot(dy, dx) for dy, dx in offsets], dtype=guide.dtype, device=guide.device)
    pos = torch.softmax(-(dist / (dist.std() + PAR_EPS) / w1) ** 2, dim=0)
    return img + w2 * pos[None, :, None, None]


def par_propagate(masks: torch.Tensor, aff: torch.Tensor, dilations: tuple[int, ...], num_iter: int) -> torch.Tensor:
    """`num_iter` rounds of masks <- Σ_n aff_n · masks(neighbour n), all channels at once (§6.6).

    masks: B x K x H x W; aff: B x n x H x W from `par_affinity` with the same dilations.
    """
    offsets = neighbour_offsets(dilations)
    weights = aff.unsqueeze(2)  # B x n x 1 x H x W, broadcast over the K channels
    for _ in range(num_iter):
        out = torch.zeros_like(masks)
        for n, neighbour in enumerate(shifted(masks, offsets)):
            out += weights[:, n] * neighbour
        masks = out
    return masks


class PAR(torch.nn.Module):
    """PAR(cfg)(image B x C x H x W, masks B x K x H x W) -> refined masks B x K x H x W, no grad (§6.6).

    The guide image is resized to the mask size (bilinear, align_corners=True), as WeCLIP does; in
    training both are at crop resolution, so this is a no-op.
    """

    def __init__(self, cfg: ParConfig = ParConfig()):
        super().__init__()
        if not cfg.dilations or min(cfg.dilations) < 1:
            raise ValueError(f"PAR dilations must be positive integers, got {cfg.dilations}")
        self.cfg = cfg

    @torch.no_grad()
    def forward(self, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        if image.dim() != 4 or masks.dim() != 4 or image.shape[0] != masks.shape[0]:
            raise ValueError(f"PAR expects image B x C x H x W and masks B x K x H x W with the same B, "
                             f"got {tuple(image.shape)} and {tuple(masks.shape)}")
        dtype = torch.promote_types(masks.dtype, torch.float32)
        guide = image.to(dtype)
        if guide.shape[-2:] != masks.shape[-2:]:
            guide = F.interpolate(guide, size=masks.shape[-2:], mode="bilinear", align_corners=True)
        aff = par_affinity(guide, self.cfg.dilations, self.cfg.w1, self.cfg.w2)
        return par_propagate(masks.to(dtype), aff, self.cfg.dilations, self.cfg.num_iter)
