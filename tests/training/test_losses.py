"""Losses against hand computations on tiny tensors (docs/algorithm.md §7.2)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from weclip.pipeline.config import LossConfig
from weclip.pipeline.training.losses import affinity_label, affinity_loss, seg_loss, total_loss

IGN = 255


def pixel_ce(logits: torch.Tensor, b: int, y: int, x: int, target: int) -> float:
    """-log softmax at one pixel, in plain Python."""
    z = [float(v) for v in logits[b, :, y, x]]
    return math.log(sum(math.exp(v) for v in z)) - z[target]


def test_seg_loss_matches_hand_ce_on_2x2() -> None:
    logits = torch.tensor([[[[2.0, -1.0], [0.5, 0.0]],
                            [[0.0, 3.0], [-2.0, 1.0]],
                            [[1.0, 0.0], [1.5, 4.0]]]])  # 1×3×2×2
    label = torch.tensor([[[0, 1], [2, IGN]]])
    ce_bg = pixel_ce(logits, 0, 0, 0, 0)
    ce_fg = [pixel_ce(logits, 0, 0, 1, 1), pixel_ce(logits, 0, 1, 0, 2)]
    balanced = 0.5 * (ce_bg + sum(ce_fg) / 2)
    plain = (ce_bg + sum(ce_fg)) / 3
    assert seg_loss(logits, label, "balanced").item() == pytest.approx(balanced, rel=1e-6)
    assert seg_loss(logits, label, "plain").item() == pytest.approx(plain, rel=1e-6)


def test_seg_loss_terms_are_means_over_the_whole_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 2, 2)
    label = torch.tensor([[[0, 1], [1, 1]], [[0, 0], [0, 2]]])  # 1 bg in image 0, 3 in image 1
    bg = [(b, y, x) for b in range(2) for y in range(2) for x in range(2) if label[b, y, x] == 0]
    fg = [(b, y, x) for b in range(2) for y in range(2) for x in range(2) if label[b, y, x] != 0]
    ce_bg = sum(pixel_ce(logits, *p, 0) for p in bg) / len(bg)
    ce_fg = sum(pixel_ce(logits, *p, int(label[p])) for p in fg) / len(fg)
    assert seg_loss(logits, label).item() == pytest.approx(0.5 * (ce_bg + ce_fg), rel=1e-6)


def test_seg_loss_upsamples_logits_bilinearly_inside() -> None:
    torch.manual_seed(1)
    small = torch.randn(2, 4, 3, 5)
    label = torch.randint(0, 4, (2, 12, 20))
    label[0, :3] = IGN
    up = F.interpolate(small, size=(12, 20), mode="bilinear", align_corners=False)
    for mode in ("balanced", "plain"):
        torch.testing.assert_close(seg_loss(small, label, mode), seg_loss(up, label, mode))
    constant = torch.tensor([[[[0.0]], [[1.0]]]])  # 1×1 grid → every pixel has logits (0, 1)
    expected = math.log(1 + math.e) - 1.0
    assert seg_loss(constant, torch.ones(1, 4, 4, dtype=torch.long), "plain").item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("fill, expected_terms", [(0, "bg"), (2, "fg"), (IGN, "none")])
def test_seg_loss_guard_cases_are_finite(fill: int, expected_terms: str) -> None:
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    label = torch.full((2, 4, 4), fill)
    loss = seg_loss(logits, label)
    assert torch.isfinite(loss)
    plain = seg_loss(logits, label, "plain")
    if expected_terms == "none":
        assert loss.item() == 0.0 and plain.item() == 0.0
    else:  # the one non-empty term is halved, the empty one adds 0
        assert loss.item() == pytest.approx(0.5 * plain.item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_seg_loss_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="balanced"):
        seg_loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), "focal")


def direct_affinity_label(label: torch.Tensor, h: int, w: int, cell: int, radius: int) -> torch.Tensor:
    """Double loop over grid cells; each cell takes its top-left pixel."""
    out = torch.empty(label.shape[0], h * w, h * w, dtype=torch.uint8)
    for b in range(label.shape[0]):
        for i in range(h * w):
            for j in range(h * w):
                ri, ci, rj, cj = i // w, i % w, j // w, j % w
                vi, vj = int(label[b, ri * cell, ci * cell]), int(label[b, rj * cell, cj * cell])
                if max(abs(ri - rj), abs(ci - cj)) > radius or vi == IGN or vj == IGN:
                    out[b, i, j] = IGN
                else:
                    out[b, i, j] = int(vi == vj)
    return out


def test_affinity_label_matches_double_loop() -> None:
    torch.manual_seed(3)
    h, w, cell = 3, 5, 4
    label = torch.randint(0, 3, (2, h * cell, w * cell))
    label[1, 4, 8] = IGN  # top-left pixel of cell (1, 2): that row and column are ignored
    label[0, 5, 5] = IGN  # not a top-left pixel: no effect
    got = affinity_label(label, (h, w), radius=1)
    assert got.dtype == torch.uint8 and got.shape == (2, 15, 15)
    assert torch.equal(got, direct_affinity_label(label, h, w, cell, radius=1))
    diag = got.diagonal(dim1=1, dim2=2)
    assert bool((diag[0] == 1).all()) and diag[1, 1 * w + 2] == IGN and bool((diag[1, :7] == 1).all())
    assert torch.equal(got, got.transpose(1, 2))
    assert (got == IGN).any() and (got == 0).any()


def test_affinity_label_released_geometry_takes_top_left_of_16x16_cells() -> None:
    torch.manual_seed(4)
    label = torch.randint(0, 21, (1, 320, 320))
    got = affinity_label(label, (20, 20), radius=8)
    small = label[0, ::16, ::16].flatten()
    rows, cols = torch.arange(400) // 20, torch.arange(400) % 20
    near = torch.maximum((rows[:, None] - rows).abs(), (cols[:, None] - cols).abs()) <= 8
    expected = torch.where(near, (small[:, None] == small).to(torch.uint8), torch.tensor(IGN, dtype=torch.uint8))
    assert torch.equal(got[0], expected)


def test_linear_affinity_loss_matches_direct_formula() -> None:
    torch.manual_seed(5)
    a = torch.rand(2, 6, 6)
    target = torch.randint(0, 3, (2, 6, 6)).to(torch.uint8)
    target[target == 2] = IGN
    pos_sum = neg_sum = 0.0
    n_pos = n_neg = 0
    for v, t in zip(a.flatten().tolist(), target.flatten().tolist()):
        if t == 1:
            pos_sum, n_pos = pos_sum + (1 - v), n_pos + 1
        elif t == 0:
            neg_sum, n_neg = neg_sum + v, n_neg + 1
    expected = 0.5 * pos_sum / (n_pos + 1) + 0.5 * neg_sum / (n_neg + 1)
    assert affinity_loss(a, target, "linear").item() == pytest.approx(expected, rel=1e-6)


def test_bce_affinity_loss_over_valid_pairs_and_saturation() -> None:
    torch.manual_seed(6)
    a = torch.rand(2, 5, 5) * 0.98 + 0.01
    target = torch.randint(0, 3, (2, 5, 5)).to(torch.uint8)
    target[target == 2] = IGN
    valid = target != IGN
    expected = F.binary_cross_entropy(a[valid], target[valid].float())
    torch.testing.assert_close(affinity_loss(a, target, "bce"), expected)
    saturated = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], requires_grad=True)
    wrong = torch.tensor([[[0, 1], [1, 0]]], dtype=torch.uint8)
    loss = affinity_loss(saturated, wrong, "bce")
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 80 and torch.isfinite(saturated.grad).all()
    assert affinity_loss(saturated, torch.full((1, 2, 2), IGN, dtype=torch.uint8), "bce").item() == 0.0


def test_total_loss_combines_terms_with_config_weight() -> None:
    torch.manual_seed(7)
    logits = torch.randn(2, 4, 4, 4, requires_grad=True)
    affinity = torch.rand(2, 16, 16, requires_grad=True)
    label = torch.randint(0, 4, (2, 16, 16))
    cfg = LossConfig(aff_radius=2)
    terms = total_loss(logits, affinity, label, cfg)
    seg = seg_loss(logits, label, "balanced")
    aff = affinity_loss(affinity, direct_affinity_label(label, 4, 4, 4, radius=2), "linear")
    torch.testing.assert_close(terms["seg"], seg)
    torch.testing.assert_close(terms["aff"], aff)
    torch.testing.assert_close(terms["loss"], seg + 0.1 * aff)
    terms["loss"].backward()
    assert logits.grad.abs().sum() > 0 and affinity.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="same forward"):
        total_loss(logits, affinity[:, :9, :9], label, cfg)
