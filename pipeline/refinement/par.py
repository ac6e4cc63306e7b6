"""Pixel-adaptive refinement (PAR, from AFA; WeCLIP `WeCLIP_model/PAR.py`), docs/algorithm.md §6.6.

Each pixel's score vector is replaced, `num_iter` times, by a weighted sum of its 8 x len(dilations)
dilated neighbours (centre excluded, replicate padding). The weights mix an image term (softmax over
neighbours of -(|I_n - I_centre| / (std_n(I_n) + 1e-8) / w1)², averaged over the guide's channels)
and a position term (the same transform of the neighbour distances), weighted by w2. The weights sum
to 1 + w2 per pixel, so PAR scales every map by (1 + w2)^num_iter; argmax labels are unaffected.

Implementation. One PAR round is a sparse linear map of the H·W pixels with n = 8·len(dilations) entries
per row (row = pixel, columns = its clamped neighbours, values = its weights). The weights are computed
pixel-major (B x N x n, N = H·W) by gathering the neighbours through one precomputed index, and the
`num_iter` rounds are `num_iter` CSR sparse-dense products over all images (block-diagonal) and all K
channels at once. Replicate padding is the clamping of the neighbour coordinates; a clamped neighbour that
coincides with another one is a duplicate column, which the product sums, as the padded convolution does.
The shape-only parts (neighbour index, CSR structure) and the two B x N x n work buffers are kept by the
PAR module between calls of the same shape: on a CPU, first-touch page faults of fresh 80 MB buffers cost
about as much as the arithmetic. A loop of 48 shifted multiply-adds per round was several times slower;
`benchmarks/train_step.py` reports the current figures.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from weclip.pipeline.config import ParConfig

PAR_EPS = 1e-8  # added to the neighbour std in both terms (AFA/WeCLIP PAR.py, §6.6)
DIRECTIONS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))  # 3x3 minus centre
_INT32_MAX = 2**31 - 1


def neighbour_offsets(dilations: tuple[int, ...]) -> list[tuple[int, int]]:
    """(dy, dx) of the 8 neighbours at each dilation, in dilation order: 8 * len(dilations) offsets."""
    return [(dy * d, dx * d) for d in dilations for dy, dx in DIRECTIONS]


def neighbour_index(size: tuple[int, int], offsets: list[tuple[int, int]],
                    device: torch.device | None = None) -> torch.Tensor:
    """N x n int64 (N = H·W, n = len(offsets)): row-major index of pixel i's neighbour (i + offset),
    with the coordinates clamped to the image, i.e. replicate padding."""
    h, w = size
    dy = torch.tensor([o[0] for o in offsets], device=device)
    dx = torch.tensor([o[1] for o in offsets], device=device)
    rows = (torch.arange(h, device=device)[:, None, None] + dy).clamp_(0, h - 1)
    cols = (torch.arange(w, device=device)[None, :, None] + dx).clamp_(0, w - 1)
    return (rows * w + cols).reshape(h * w, len(offsets))


@dataclass(frozen=True)
class NeighbourPattern:
    """The shape-only part of PAR for `batch` images: the N x n neighbour index and the CSR row pointers
    and column indices of the block-diagonal B·N x B·N operator (int32 whenever they fit, MKL's fast path)."""
    batch: int
    index: torch.Tensor
    crow: torch.Tensor
    cols: torch.Tensor


def neighbour_pattern(batch: int, size: tuple[int, int], offsets: list[tuple[int, int]],
                      device: torch.device | None = None) -> NeighbourPattern:
    index = neighbour_index(size, offsets, device)
    n_pix, n = index.shape
    itype = torch.int32 if batch * n_pix * n <= _INT32_MAX else torch.int64
    starts = torch.arange(batch, dtype=itype, device=device)[:, None, None] * n_pix
    cols = (index.to(itype)[None] + starts).reshape(-1)
    crow = torch.arange(0, batch * n_pix * n + 1, n, dtype=itype, device=device)
    return NeighbourPattern(batch, index, crow, cols)


def par_affinity(guide: torch.Tensor, index: torch.Tensor, offsets: list[tuple[int, int]], w1: float, w2: float,
                 out: torch.Tensor | None = None, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """PAR weights B x N x n, pixel-major, from a guide image B x C x H x W (§6.6).

    `index` is `neighbour_index(guide size, offsets)`. Image term: per channel, |I_n - I| / (unbiased std
    over the n neighbours + 1e-8) / w1, squared, negated, averaged over channels, softmax over n. Position
    term: distances d (axial) and √2·d (diagonal), the same transform with the std over the n distances,
    softmax over n. Sum: img + w2·pos. `out` / `scratch`: optional B x N x n buffers to reuse (the result
    is written to `out`).

    The std is taken of the differences d = I_n - I (the same number: std is shift-invariant) as
    sqrt((Σd² - (Σd)²/n) / (n - 1)): two plain sums instead of torch.std's slower pass, and centring on
    the pixel keeps the cancellation relative to the local contrast, not to the image level.
    """
    b, c = guide.shape[:2]
    n_pix, n = index.shape
    flat_index = index.reshape(-1)
    flat = guide.reshape(b, c, -1)
    logits = guide.new_empty((b, n_pix, n)) if out is None else out
    d = guide.new_empty((b, n_pix, n)) if scratch is None else scratch
    for ch in range(c):  # one channel at a time keeps memory at two B x N x n buffers
        centre = flat[:, ch]
        torch.index_select(centre, 1, flat_index, out=d.view(b, -1))
        d.sub_(centre[..., None])
        total = d.sum(dim=-1, keepdim=True)
        sq = d.square_().sum(dim=-1, keepdim=True)  # d now holds d²
        std = sq.sub_(total.square_().div_(n)).div_(n - 1).clamp_min_(0).sqrt_()
        weight = std.add_(PAR_EPS).mul_(w1).square_().mul_(c).reciprocal_().neg_()  # -1 / (C·((std+eps)·w1)²)
        if ch == 0:
            torch.mul(d, weight, out=logits)
        else:
            logits.addcmul_(d, weight)
    logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()  # softmax over the n neighbours, in place
    logits.div_(logits.sum(dim=-1, keepdim=True))
    dist = torch.tensor([math.hypot(dy, dx) for dy, dx in offsets], dtype=guide.dtype, device=guide.device)
    pos = torch.softmax(-(dist / (dist.std() + PAR_EPS) / w1) ** 2, dim=0)
    return logits.add_(pos, alpha=w2)


def par_operator(aff: torch.Tensor, pattern: NeighbourPattern) -> torch.Tensor:
    """One PAR round as a block-diagonal CSR matrix (B·N x B·N): the weights `aff` (B x N x n) at the
    neighbour columns of `pattern`."""
    size = aff.shape[0] * aff.shape[1]
    with warnings.catch_warnings():  # "sparse CSR support is in beta": we use only construction and matmul
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(pattern.crow, pattern.cols, aff.reshape(-1), size=(size, size),
                                       check_invariants=False)


def par_propagate(masks: torch.Tensor, operator: torch.Tensor, num_iter: int) -> torch.Tensor:
    """`num_iter` rounds of masks <- Σ_n aff_n · masks(neighbour n), all images and channels at once (§6.6).

    masks: B x K x H x W; operator: `par_operator` of the same B, H, W. The result is B x K x H x W in
    channels-last memory (the product's own layout, no copy): the per-pixel argmax over K that follows PAR
    is ~10x faster on it than on a contiguous B x K x H x W tensor (measured on the 2-core test machine).
    """
    b, k, h, w = masks.shape
    x = masks.permute(0, 2, 3, 1).reshape(b * h * w, k)  # (B·N) x K, row-major: MKL's faster layout
    for _ in range(num_iter):
        x = operator @ x
    return x.reshape(b, h, w, k).permute(0, 3, 1, 2)


class PAR(torch.nn.Module):
    """PAR(cfg)(image B x C x H x W, masks B x K x H x W) -> refined masks B x K x H x W, no grad (§6.6).

    The guide image is resized to the mask size (bilinear, align_corners=True), as WeCLIP does; in
    training both are at crop resolution, so this is a no-op. The neighbour pattern and work buffers of
    the last batch shape are kept for the next call (they depend on nothing else).
    """

    def __init__(self, cfg: ParConfig = ParConfig()):
        super().__init__()
        if not cfg.dilations or min(cfg.dilations) < 1:
            raise ValueError(f"PAR dilations must be positive integers, got {cfg.dilations}")
        self.cfg = cfg
        self.offsets = neighbour_offsets(cfg.dilations)
        self._key: tuple | None = None
        self._pattern: NeighbourPattern | None = None
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def _workspace(self, batch: int, size: tuple[int, int], dtype: torch.dtype, device: torch.device
                   ) -> tuple[NeighbourPattern, tuple[torch.Tensor, torch.Tensor]]:
        key = (batch, tuple(size), dtype, device)
        if key != self._key:
            self._key = None  # never half-updated
            self._pattern = neighbour_pattern(batch, size, self.offsets, device)
            shape = (batch, size[0] * size[1], len(self.offsets))
            self._buffers = (torch.empty(shape, dtype=dtype, device=device),
                             torch.empty(shape, dtype=dtype, device=device))
            self._key = key
        return self._pattern, self._buffers

    @torch.no_grad()
    def forward(self, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        if image.dim() != 4 or masks.dim() != 4 or image.shape[0] != masks.shape[0]:
            raise ValueError(f"PAR expects image B x C x H x W and masks B x K x H x W with the same B, "
                             f"got {tuple(image.shape)} and {tuple(masks.shape)}")
        dtype = torch.promote_types(masks.dtype, torch.float32)
        guide = image.to(dtype)
        if guide.shape[-2:] != masks.shape[-2:]:
            guide = F.interpolate(guide, size=masks.shape[-2:], mode="bilinear", align_corners=True)
        pattern, (aff, scratch) = self._workspace(masks.shape[0], tuple(masks.shape[-2:]), dtype, masks.device)
        par_affinity(guide, pattern.index, self.offsets, self.cfg.w1, self.cfg.w2, out=aff, scratch=scratch)
        return par_propagate(masks.to(dtype), par_operator(aff, pattern), self.cfg.num_iter)
