"""online_pseudo_label against a per-image, per-class composition written out from docs/algorithm.md §6.4–6.6."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from weclip.pipeline.config import ParConfig, RefineConfig
from weclip.pipeline.refinement.par import PAR
from weclip.pipeline.refinement.pseudo_label import online_pseudo_label, rfm_active
from weclip.pipeline.refinement.refine import box_masks

REFINE = RefineConfig(static_layers=3, rfm_layers=3, box_threshold=0.4, rfm_start_iter=7)
PAR_CFG = ParConfig(num_iter=4, dilations=(1, 2, 4))
GRID = (4, 5)
SIZE = (64, 80)  # 16 × the grid, like a 320 crop on a 20×20 grid


def _inputs(seed: int = 0):
    """B=2, K=3 slots (image 1 has an empty slot), L=4 attention maps, float64 so ties cannot flip the argmax."""
    g = torch.Generator().manual_seed(seed)
    b, k, layers = 2, 3, 4
    n = GRID[0] * GRID[1]
    cams = torch.rand(b, k, *GRID, generator=g, dtype=torch.float64)
    cams = (cams - cams.amin((-1, -2), True)) / cams.amax((-1, -2), True)
    cam_classes = torch.tensor([[0, 3, 5], [2, 4, -1]])
    cams[1, 2] = 0  # an empty slot holds zeros, as the cache stores it
    # softmax over CLS + N, CLS column dropped: each layer sends a different mass between patches (§6.4)
    attn = torch.softmax(3 * torch.randn(b, layers, n, n + 1, generator=g, dtype=torch.float64), dim=-1)[..., 1:]
    feats = torch.randn(b, 6, n, generator=g, dtype=torch.float64)
    a_f = torch.sigmoid(feats.transpose(1, 2) @ feats)
    image = torch.randn(b, 3, *SIZE, generator=g, dtype=torch.float64)
    return cams, cam_classes, attn, a_f, image


def _sinkhorn_transition(a: torch.Tensor) -> torch.Tensor:
    d = a.clone()
    for _ in range(REFINE.sinkhorn_rounds):
        d = d / d.sum(0, keepdim=True)
        d = d / d.sum(1, keepdim=True)
    d = (d + d.T) / 2
    return d @ d


def _reference(cams, cam_classes, attn, a_f, image, use_rfm: bool) -> torch.Tensor:
    """One image and one class at a time, every step spelled out (§6.4 RFM loop over layers, §6.5, §6.6)."""
    out = []
    for b in range(cams.shape[0]):
        maps = attn[b]
        if use_rfm:
            last = maps[-REFINE.rfm_layers:]
            s = [float((a_f[b] - m).sum()) for m in last]  # signed S^l
            keep = [1.0 if v <= sum(s) / len(s) else 0.0 for v in s]
            mean = sum(g * m for g, m in zip(keep, last)) / (sum(keep) + 1e-5)
            affinity = a_f[b] * mean
        else:
            affinity = maps[-REFINE.static_layers:].mean(0)
        t = _sinkhorn_transition(affinity)
        channels, keys = [], [0]
        for j, cls in enumerate(cam_classes[b].tolist()):
            if cls < 0:
                continue
            cam = cams[b, j]
            mask = box_masks(cam, REFINE.box_threshold, REFINE.box_mode)
            refined = (t @ (cam * mask).reshape(-1)).reshape(GRID)
            refined = refined - refined.min()
            refined = refined / (refined.max() + 1e-7)
            channels.append(F.interpolate(refined[None, None], size=SIZE, mode="bilinear", align_corners=False)[0, 0])
            keys.append(cls + 1)
        fg = torch.stack(channels)
        scores = torch.cat([(1 - fg.max(0, keepdim=True).values) ** REFINE.bg_power, fg])
        refined_scores = PAR(PAR_CFG)(image[b:b + 1], scores[None])[0]
        out.append(torch.tensor(keys)[refined_scores.argmax(0)])
    return torch.stack(out)


@pytest.mark.parametrize("use_rfm", [False, True])
def test_matches_per_image_composition(use_rfm):
    inputs = _inputs()
    got = online_pseudo_label(*inputs, use_rfm=use_rfm, refine=REFINE, par=PAR(PAR_CFG))
    want = _reference(*inputs, use_rfm=use_rfm)
    assert got.dtype == torch.int64 and got.shape == (2, *SIZE)
    assert torch.equal(got, want)


def test_labels_are_keys_without_ignore_and_rfm_changes_them():
    cams, cam_classes, attn, a_f, image = _inputs(1)
    static = online_pseudo_label(cams, cam_classes, attn, a_f, image, use_rfm=False, refine=REFINE, par=PAR(PAR_CFG))
    rfm = online_pseudo_label(cams, cam_classes, attn, a_f, image, use_rfm=True, refine=REFINE, par=PAR(PAR_CFG))
    for labels in (static, rfm):
        assert set(labels[0].unique().tolist()) <= {0, 1, 4, 6}
        assert set(labels[1].unique().tolist()) <= {0, 3, 5}  # the empty slot never wins
    assert not torch.equal(static, rfm)


def test_a_f_is_used_detached_and_no_grad_flows():
    cams, cam_classes, attn, a_f, image = _inputs(2)
    a_f = a_f.clone().requires_grad_(True)
    labels = online_pseudo_label(cams, cam_classes, attn, a_f, image, use_rfm=True, refine=REFINE, par=PAR(PAR_CFG))
    assert not labels.requires_grad and a_f.grad is None


def test_rfm_switch_counts_training_iterations_from_zero():
    assert not rfm_active(REFINE.rfm_start_iter - 1, REFINE)
    assert rfm_active(REFINE.rfm_start_iter, REFINE)
    assert rfm_active(0, RefineConfig(rfm_start_iter=0))


def test_shape_errors_are_readable():
    cams, cam_classes, attn, a_f, image = _inputs()
    with pytest.raises(ValueError, match="attn must be"):
        online_pseudo_label(cams, cam_classes, attn[:, :, :-1], a_f, image, use_rfm=False, refine=REFINE,
                            par=PAR(PAR_CFG))
    with pytest.raises(ValueError, match="image_norm must be"):
        online_pseudo_label(cams, cam_classes, attn, a_f, image[:1], use_rfm=False, refine=REFINE, par=PAR(PAR_CFG))
    with pytest.raises(ValueError, match="needs the decoder affinity"):
        online_pseudo_label(cams, cam_classes, attn, None, image, use_rfm=True, refine=REFINE, par=PAR(PAR_CFG))


def test_static_refinement_needs_no_decoder_affinity():
    cams, cam_classes, attn, a_f, image = _inputs(3)
    with_a_f = online_pseudo_label(cams, cam_classes, attn, a_f, image, use_rfm=False, refine=REFINE, par=PAR(PAR_CFG))
    without = online_pseudo_label(cams, cam_classes, attn, None, image, use_rfm=False, refine=REFINE, par=PAR(PAR_CFG))
    assert torch.equal(with_a_f, without)
