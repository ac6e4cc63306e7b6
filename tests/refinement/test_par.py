"""Tests of pipeline/refinement/par.py against a direct per-pixel implementation of the formula of docs/algorithm.md §6.6."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from weclip.pipeline.config import ParConfig
from weclip.pipeline.refinement.par import PAR, neighbour_offsets


def _par_reference(image: np.ndarray, masks: np.ndarray, dilations, num_iter, w1, w2) -> np.ndarray:
    """One pixel at a time: clamped neighbour coordinates, numpy std (ddof=1), explicit softmaxes."""
    c, h, w = image.shape
    offsets = [(dy * d, dx * d) for d in dilations
               for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]

    def at(y, x):
        return min(max(y, 0), h - 1), min(max(x, 0), w - 1)

    def softmax(v):
        e = np.exp(v - v.max())
        return e / e.sum()

    dist = np.array([math.sqrt(dy * dy + dx * dx) for dy, dx in offsets])
    pos = softmax(-(dist / (dist.std(ddof=1) + 1e-8) / w1) ** 2)
    weights = np.zeros((h, w, len(offsets)))
    for i in range(h):
        for j in range(w):
            logits = np.zeros(len(offsets))
            for ch in range(c):
                nb = np.array([image[ch][at(i + dy, j + dx)] for dy, dx in offsets])
                logits += -(np.abs(nb - image[ch, i, j]) / (nb.std(ddof=1) + 1e-8) / w1) ** 2
            weights[i, j] = softmax(logits / c) + w2 * pos
    for _ in range(num_iter):
        new = np.zeros_like(masks)
        for i in range(h):
            for j in range(w):
                for n, (dy, dx) in enumerate(offsets):
                    new[:, i, j] += weights[i, j, n] * masks[(slice(None),) + at(i + dy, j + dx)]
        masks = new
    return masks


@pytest.mark.parametrize("dilations", [(1, 2), (1, 8)])  # 8 > image size: replicate padding beyond the border
def test_par_matches_per_pixel_formula(dilations):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 3, 6, 7))
    masks = rng.random((2, 3, 6, 7))
    cfg = ParConfig(num_iter=2, dilations=dilations)
    got = PAR(cfg)(torch.from_numpy(image), torch.from_numpy(masks)).numpy()
    for b in range(2):
        want = _par_reference(image[b], masks[b], dilations, 2, cfg.w1, cfg.w2)
        np.testing.assert_allclose(got[b], want, rtol=1e-10, atol=1e-12)


def test_default_has_48_neighbours():
    assert len(neighbour_offsets(ParConfig().dilations)) == 48
    assert (0, 0) not in neighbour_offsets(ParConfig().dilations)


def test_constant_mask_is_only_scaled_by_one_plus_w2_per_iteration():
    image = torch.randn(1, 3, 9, 11, generator=torch.Generator().manual_seed(1))
    masks = torch.stack([torch.full((9, 11), 0.3), torch.full((9, 11), 0.7)])[None]
    cfg = ParConfig()
    out = PAR(cfg)(image, masks)
    torch.testing.assert_close(out, masks * (1 + cfg.w2) ** cfg.num_iter)
    exact = PAR(ParConfig(w2=0.0))(image, masks)
    torch.testing.assert_close(exact, masks)


def test_guide_is_resized_to_mask_size_with_align_corners():
    g = torch.Generator().manual_seed(2)
    big = torch.randn(1, 3, 12, 14, generator=g)
    masks = torch.rand(1, 2, 6, 7, generator=g)
    small = F.interpolate(big, size=(6, 7), mode="bilinear", align_corners=True)
    par = PAR(ParConfig(num_iter=3, dilations=(1, 2)))
    torch.testing.assert_close(par(big, masks), par(small, masks))


def test_par_pulls_labels_to_image_edges():
    # two flat regions split at column 8; the initial scores put the class boundary at column 10
    h, w = 16, 16
    image = torch.zeros(1, 3, h, w)
    image[..., 8:] = 1.0
    image += 0.01 * torch.randn(image.shape, generator=torch.Generator().manual_seed(3))
    fg = torch.zeros(h, w)
    fg[:, 10:] = 1.0
    masks = torch.stack([1 - fg, fg])[None] * 0.6 + 0.2
    out = PAR(ParConfig(dilations=(1, 2, 4)))(image, masks)
    labels = out.argmax(1)[0]
    assert (labels[:, 8:] == 1).all() and (labels[:, :8] == 0).all()


def test_par_needs_no_grad_and_checks_shapes():
    image = torch.randn(1, 3, 5, 5, requires_grad=True)
    assert not PAR(ParConfig(num_iter=1, dilations=(1,)))(image, torch.rand(1, 2, 5, 5)).requires_grad
    with pytest.raises(ValueError, match="same B"):
        PAR()(torch.randn(2, 3, 5, 5), torch.rand(1, 2, 5, 5))
