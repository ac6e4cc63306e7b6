"""Tests of pipeline/refinement/refine.py against hand computations and direct, loop-based re-implementations."""
from __future__ import annotations

from collections import deque
from fractions import Fraction

import numpy as np
import pytest
import torch

from weclip.pipeline.config import RefineConfig
from weclip.pipeline.refinement.refine import (box_masks, cam_keys, cam_scores, cams_to_labels, minmax, refine_cams,
                             rfm_affinity, rfm_layer_mask, scores_to_labels, sinkhorn, static_affinity,
                             transition, upsample_cams)


# ---------------------------------------------------------------- Sinkhorn / transition

def _fraction_sinkhorn(a: list[list[int]], rounds: int) -> list[list[Fraction]]:
    m = [[Fraction(v) for v in row] for row in a]
    n = len(m)
    for _ in range(rounds):
        cols = [sum(m[i][j] for i in range(n)) for j in range(n)]
        m = [[m[i][j] / cols[j] for j in range(n)] for i in range(n)]
        rows = [sum(r) for r in m]
        m = [[m[i][j] / rows[i] for j in range(n)] for i in range(n)]
    return m


def test_sinkhorn_matches_exact_rational_3x3():
    a = [[1, 2, 3], [4, 5, 6], [7, 8, 10]]
    for rounds in (1, 3):
        exact = torch.tensor([[float(v) for v in row] for row in _fraction_sinkhorn(a, rounds)], dtype=torch.float64)
        got = sinkhorn(torch.tensor(a, dtype=torch.float64), rounds)
        torch.testing.assert_close(got, exact, rtol=1e-14, atol=1e-15)


def test_sinkhorn_one_round_by_hand():
    # column sums 3 and 5 -> [[1/3, 2/5], [2/3, 3/5]]; row sums 11/15 and 19/15.
    got = sinkhorn(torch.tensor([[1.0, 2.0], [2.0, 3.0]], dtype=torch.float64), rounds=1)
    want = torch.tensor([[5 / 11, 6 / 11], [10 / 19, 9 / 19]], dtype=torch.float64)
    torch.testing.assert_close(got, want)


def test_sinkhorn_is_doubly_stochastic_on_well_conditioned_matrix():
    g = torch.Generator().manual_seed(0)
    a = 1.0 + torch.rand(2, 16, 16, generator=g, dtype=torch.float64)
    d = sinkhorn(a, rounds=3)
    torch.testing.assert_close(d.sum(-1), torch.ones(2, 16, dtype=torch.float64), rtol=0, atol=1e-12)
    col_err = (d.sum(-2) - 1).abs().max().item()
    assert col_err < 1e-4
    assert col_err > 0  # ends on a row normalisation: columns are only approximately 1


def test_transition_is_symmetric_square_of_symmetrised_sinkhorn():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(3, 9, 9, generator=g, dtype=torch.float64) + 0.1
    t = transition(a, rounds=3)
    for i in range(3):
        d = sinkhorn(a[i], 3)
        s = (d + d.T) / 2
        torch.testing.assert_close(t[i], s @ s)
    torch.testing.assert_close(t, t.transpose(-1, -2))


# ---------------------------------------------------------------- box masks

def _bfs_boxes_reference(cam: np.ndarray, threshold: float, mode: str) -> np.ndarray:
    """scoremap2bbox re-done by hand: uint8 cast, strict threshold, 8-connected flood fill, boxes."""
    h, w = cam.shape
    u8 = (cam.astype(np.float32) * np.float32(255)).astype(np.uint8)
    fg = u8 > int(threshold * int(u8.max()))
    seen = np.zeros_like(fg)
    out = np.zeros_like(fg)
    for si in range(h):
        for sj in range(w):
            if not fg[si, sj] or seen[si, sj]:
                continue
            seen[si, sj] = True
            queue, pix = deque([(si, sj)]), []
            while queue:
                i, j = queue.popleft()
                pix.append((i, j))
                for di in (-1, 0, 1):
                    for dj in (-1, 0, 1):
                        a, b = i + di, j + dj
                        if 0 <= a < h and 0 <= b < w and fg[a, b] and not seen[a, b]:
                            seen[a, b] = True
                            queue.append((a, b))
            rows, cols = [p[0] for p in pix], [p[1] for p in pix]
            y0, x0, y1, x1 = min(rows), min(cols), max(rows) + 1, max(cols) + 1  # boundingRect: exclusive ends
            if mode == "released":
                y1, x1 = min(y1, h - 1), min(x1, w - 1)
            out[y0:y1, x0:x1] = True
    return out


def _mask(shape, *boxes):
    m = np.zeros(shape, dtype=bool)
    for y0, y1, x0, x1 in boxes:  # inclusive
        m[y0:y1 + 1, x0:x1 + 1] = True
    return m


def test_box_masks_two_blobs_by_hand():
    cam = np.zeros((7, 9), dtype=np.float32)
    cam[1, 1] = 1.0
    cam[2, 2] = 0.9  # diagonal neighbour of (1,1): same 8-connected region
    cam[1:3, 5:7] = 0.8
    cam[3, 6] = 0.5
    cam[5, 3] = 0.3  # below int(0.4 * 255) = 102 in uint8: not foreground
    got = box_masks(torch.from_numpy(cam)[None, None], threshold=0.4, mode="fixed")[0, 0].numpy()
    want = _mask(cam.shape, (1, 2, 1, 2), (1, 3, 5, 6))
    np.testing.assert_array_equal(got, want)
    # interior blobs never touch the last row/column, so the released quirk changes nothing here
    np.testing.assert_array_equal(box_masks(torch.from_numpy(cam), 0.4, "released").numpy(), want)


def test_box_masks_diagonal_touch_is_one_region():
    cam = np.zeros((5, 5), dtype=np.float32)
    cam[1, 1] = cam[2, 2] = cam[3, 3] = 1.0
    got = box_masks(torch.from_numpy(cam), 0.4, "fixed").numpy()
    np.testing.assert_array_equal(got, _mask((5, 5), (1, 3, 1, 3)))  # 4-connectivity would give three 1x1 boxes


def test_box_masks_ring_with_inner_blob_gives_outer_box():
    cam = np.zeros((9, 9), dtype=np.float32)
    cam[1:8, 1:8] = 1.0
    cam[2:7, 2:7] = 0.0  # hole
    cam[4, 4] = 1.0  # island inside the hole
    got = box_masks(torch.from_numpy(cam), 0.4, "fixed").numpy()
    np.testing.assert_array_equal(got, _mask((9, 9), (1, 7, 1, 7)))


def test_box_masks_half_open_quirk_vs_fixed():
    cam = np.zeros((6, 8), dtype=np.float32)
    cam[3:6, 5:8] = 1.0  # touches the last row and column
    cam[0, 0] = 1.0  # single pixel in the corner
    t = torch.from_numpy(cam)
    fixed = box_masks(t, 0.4, "fixed").numpy()
    released = box_masks(t, 0.4, "released").numpy()
    np.testing.assert_array_equal(fixed, _mask(cam.shape, (3, 5, 5, 7), (0, 0, 0, 0)))
    np.testing.assert_array_equal(released, _mask(cam.shape, (3, 4, 5, 6), (0, 0, 0, 0)))
    assert not released[-1].any() and not released[:, -1].any()
    # a region lying only on the last row vanishes in released mode
    last = np.zeros((6, 8), dtype=np.float32)
    last[5, 2:4] = 1.0
    assert not box_masks(torch.from_numpy(last), 0.4, "released").any()
    assert box_masks(torch.from_numpy(last), 0.4, "fixed").sum() == 2


def test_box_masks_threshold_edge_uses_uint8_floor_and_strict_greater():
    cam = np.zeros((3, 5), dtype=np.float32)
    cam[0, 0] = 1.0  # uint8 max 255 -> threshold int(0.4 * 255) = 102
    cam[2, 2] = 102.5 / 255  # floor -> 102, not > 102: excluded (a float comparison would include it)
    cam[2, 4] = 103.5 / 255  # floor -> 103 > 102: included
    got = box_masks(torch.from_numpy(cam), 0.4, "fixed").numpy()
    np.testing.assert_array_equal(got, _mask(cam.shape, (0, 0, 0, 0), (2, 2, 4, 4)))
    # threshold relative to the map's own max: max 0.5 -> uint8 127 -> int(0.4 * 127) = 50
    low = np.zeros((3, 5), dtype=np.float32)
    low[0, 0] = 0.5
    low[1, 1] = 50.5 / 255
    low[1, 3] = 51.5 / 255
    np.testing.assert_array_equal(box_masks(torch.from_numpy(low), 0.4, "fixed").numpy(),
                                  _mask(low.shape, (0, 0, 0, 0), (1, 1, 3, 3)))


def test_box_masks_empty_and_constant_cams():
    zero = torch.zeros(2, 3, 4, 5)
    for mode in ("released", "fixed"):
        out = box_masks(zero, 0.4, mode)
        assert out.shape == zero.shape and out.dtype == torch.bool and not out.any()
    # constant non-zero map: every pixel above int(0.4 * 255) -> one box covering the whole map
    assert box_masks(torch.full((4, 5), 0.9), 0.4, "fixed").all()


def test_box_masks_match_flood_fill_reference_on_random_cams():
    rng = np.random.default_rng(0)
    cams = rng.random((4, 3, 11, 13)).astype(np.float32) ** 3
    cams[0, 1] = 0.0
    for threshold in (0.4, 0.7):
        for mode in ("released", "fixed"):
            got = box_masks(torch.from_numpy(cams), threshold, mode).numpy()
            for b in range(4):
                for k in range(3):
                    np.testing.assert_array_equal(got[b, k], _bfs_boxes_reference(cams[b, k], threshold, mode))


def test_box_masks_rejects_unknown_mode():
    with pytest.raises(ValueError, match="box mode"):
        box_masks(torch.zeros(3, 3), 0.4, "inclusive")


# ---------------------------------------------------------------- static / RFM affinity

def _rfm_reference(attn: torch.Tensor, a_f: torch.Tensor, layers: int, filt: str) -> torch.Tensor:
    """Per-image, per-layer loop in the released code's order of operations."""
    out = []
    for b in range(attn.shape[0]):
        maps = [attn[b, l] for l in range(attn.shape[1])][-layers:]
        diffs = [((a_f[b] - m).abs() if filt == "abs" else (a_f[b] - m)).sum() for m in maps]
        th = sum(diffs) / len(diffs)
        keep = [1.0 if d <= th else 0.0 for d in diffs]
        acc = sum(g * m for g, m in zip(keep, maps))
        out.append(a_f[b] * acc / (sum(keep) + 1e-5))
    return torch.stack(out)


@pytest.mark.parametrize("filt", ["signed", "abs"])
def test_rfm_affinity_matches_layer_loop(filt):
    g = torch.Generator().manual_seed(2)
    attn = torch.rand(3, 12, 16, 16, generator=g, dtype=torch.float64)
    attn = attn * torch.linspace(0.5, 1.5, 12, dtype=torch.float64)[:, None, None]  # distinct layer masses
    a_f = torch.rand(3, 16, 16, generator=g, dtype=torch.float64)
    for layers in (6, 10):
        torch.testing.assert_close(rfm_affinity(attn, a_f, layers, filt), _rfm_reference(attn, a_f, layers, filt))


def test_rfm_signed_selection_ignores_a_f_but_abs_does_not():
    g = torch.Generator().manual_seed(3)
    scale = torch.tensor([1.0, 1.2, 0.8, 1.1, 0.9, 1.3], dtype=torch.float64)
    attn = (torch.rand(1, 6, 8, 8, generator=g, dtype=torch.float64) * 0.1 + 0.05) * scale[:, None, None]
    want = (attn.sum((-1, -2)) >= attn.sum((-1, -2)).mean()).to(torch.float64)  # docs/algorithm.md §0.1 item 1
    candidates = [torch.zeros(1, 8, 8, dtype=torch.float64), 1e3 * torch.rand(1, 8, 8, generator=g, dtype=torch.float64),
                  attn[:, 2].clone(), attn[:, 5].clone(), -torch.rand(1, 8, 8, generator=g, dtype=torch.float64)]
    for a_f in candidates:
        torch.testing.assert_close(rfm_layer_mask(attn, a_f, 6, "signed"), want, rtol=0, atol=0)
    # with |.| the selection follows A_f: A_f equal to a low-mass layer keeps that layer, a high-mass one drops it
    assert rfm_layer_mask(attn, attn[:, 2].clone(), 6, "abs")[0, 2] == 1
    assert rfm_layer_mask(attn, attn[:, 5].clone(), 6, "abs")[0, 2] == 0


def test_rfm_threshold_is_inclusive_at_the_mean():
    # dyadic values: every sum is exact, so the ties below are exact ties
    base = torch.full((4, 4), 0.125, dtype=torch.float64)
    masses = torch.tensor([1.0, 2.0, 2.0, 3.0], dtype=torch.float64)  # mean 2: layers 1 and 2 tie
    attn = (base * masses[:, None, None])[None]
    a_f = torch.full((1, 4, 4), 0.5, dtype=torch.float64)
    assert rfm_layer_mask(attn, a_f, 4, "signed").tolist() == [[0.0, 1.0, 1.0, 1.0]]
    equal = base.expand(1, 3, 4, 4)
    assert rfm_layer_mask(equal, a_f, 3, "signed").tolist() == [[1.0, 1.0, 1.0]]
    torch.testing.assert_close(rfm_affinity(equal, a_f, 3), a_f * base * 3 / (3 + 1e-5))


def test_rfm_affinity_is_detached_from_a_f():
    attn = torch.rand(1, 6, 4, 4)
    a_f = torch.rand(1, 4, 4, requires_grad=True)
    assert not rfm_affinity(attn, a_f, 6).requires_grad


def test_static_affinity_is_mean_of_last_layers():
    attn = torch.rand(2, 12, 5, 5)
    torch.testing.assert_close(static_affinity(attn, 8), sum(attn[:, l] for l in range(4, 12)) / 8)
    with pytest.raises(ValueError, match="last 13"):
        static_affinity(attn, 13)


# ---------------------------------------------------------------- refine_cams

def _refine_reference(cams: torch.Tensor, classes: torch.Tensor, aff: torch.Tensor, cfg: RefineConfig) -> torch.Tensor:
    """Released-code loop: per image the transition matrix, per class the column-masked T times the CAM,
    then numpy scale_cam_image."""
    b, k, h, w = cams.shape
    out = torch.zeros(b, k, h, w, dtype=torch.float64)
    for i in range(b):
        t = aff[i].double()
        t = t / t.sum(0, keepdim=True)
        t = t / t.sum(1, keepdim=True)
        for _ in range(cfg.sinkhorn_rounds - 1):
            t = t / t.sum(0, keepdim=True)
            t = t / t.sum(1, keepdim=True)
        t = (t + t.T) / 2
        t = t @ t
        for j in range(k):
            if classes[i, j] < 0:
                continue
            cam = cams[i, j].double()
            mask = torch.from_numpy(_bfs_boxes_reference(cam.numpy(), cfg.box_threshold, cfg.box_mode))
            refined = ((t * mask.double().view(1, h * w)) @ cam.reshape(-1, 1)).reshape(h, w).numpy()
            refined = refined - refined.min()
            refined = refined / (1e-7 + refined.max())
            out[i, j] = torch.from_numpy(refined)
    return out


@pytest.mark.parametrize("mode", ["released", "fixed"])
def test_refine_cams_matches_per_class_loop(mode):
    g = torch.Generator().manual_seed(4)
    b, k, h, w = 2, 3, 6, 7
    cams = minmax(torch.rand(b, k, h, w, generator=g, dtype=torch.float64) ** 2)
    cams[1, 2] = 0.0  # a present class whose CAM is empty: refined CAM must be all zeros
    classes = torch.tensor([[3, 0, -1], [5, 1, 7]])
    aff = torch.rand(b, h * w, h * w, generator=g, dtype=torch.float64) + 0.01
    cfg = RefineConfig(box_mode=mode)
    got = refine_cams(cams, classes, aff, cfg)
    torch.testing.assert_close(got, _refine_reference(cams, classes, aff, cfg))
    assert (got[0, 2] == 0).all() and (got[1, 2] == 0).all()
    assert got[0, 0].max() > 0.99


def test_refine_cams_checks_shapes():
    with pytest.raises(ValueError, match="affinity must be"):
        refine_cams(torch.rand(1, 2, 3, 3), torch.zeros(1, 2, dtype=torch.long), torch.rand(1, 8, 8))


# ---------------------------------------------------------------- labels

def test_upsample_matches_hand_bilinear_half_pixel():
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0]])[None, None]
    got = upsample_cams(x, (4, 4))[0, 0]
    axis = torch.tensor([0.0, 0.25, 0.75, 1.0])  # src = (i + 0.5) / 2 - 0.5, clamped at the borders
    torch.testing.assert_close(got, 2 * axis[:, None] + axis[None, :])


def test_cam_scores_keys_and_labels_by_hand():
    cams = torch.tensor([[[[0.9, 0.2], [0.1, 0.0]],
                          [[0.3, 0.8], [0.2, 0.0]],
                          [[5.0, 5.0], [5.0, 5.0]]]])  # slot 2 is empty: garbage must be ignored
    classes = torch.tensor([[4, 11, -1]])
    scores, keys = cam_scores(cams, classes, bg_power=2.0)
    assert keys.tolist() == [[0, 5, 12, -1]]
    bg = torch.tensor([[0.1 ** 2, 0.2 ** 2], [0.8 ** 2, 1.0]])
    torch.testing.assert_close(scores[0, 0], bg)
    assert (scores[0, 3] == 0).all()
    labels = cams_to_labels(cams, classes, bg_power=2.0)
    assert labels.dtype == torch.int64
    assert labels.tolist() == [[[5, 12], [0, 0]]]
    assert cams_to_labels(cams, classes, bg_power=1.0).tolist() == [[[5, 12], [0, 0]]]


def test_scores_to_labels_never_picks_empty_channel():
    keys = torch.tensor([[0, 3, -1]])
    assert scores_to_labels(torch.tensor([[[[0.1]], [[0.2]], [[0.9]]]]), keys).tolist() == [[[3]]]
    # scores of any sign (e.g. log-probabilities): the empty channel still loses
    assert scores_to_labels(torch.tensor([[[[-3.0]], [[-2.0]], [[0.0]]]]), keys).tolist() == [[[3]]]


def test_no_present_class_is_all_background():
    cams = torch.rand(1, 2, 3, 3)
    labels = cams_to_labels(cams, torch.tensor([[-1, -1]]))
    assert (labels == 0).all()
    assert cam_keys(torch.tensor([[-1, 2]])).tolist() == [[0, -1, 3]]
