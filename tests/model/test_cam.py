"""Softmax-Grad-CAM: batched == per-image per-class reference, CAM formula, outputs kept, input checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from weclip.pipeline.model.backbone import FrozenCLIP, block_forward
from weclip.pipeline.model.cam import cam_from_gradient, softmax_gradcam, softmax_gradcam_loop
from weclip.pipeline.model.text import TextEmbeddings
from weclip.pipeline.refinement.refine import box_masks

# Random weights with OpenAI's scale (100) saturate the softmax and give ~1e-20 gradients, CAMs that the 1e-7 of the
# min-max would dominate. A soft scale keeps every target's gradient ~1e-3, so the comparisons below mean something.
SOFT_LOGIT_SCALE = 2.0


def random_text(classes: int, background: int, dim: int, seed: int = 0) -> TextEmbeddings:
    g = torch.Generator().manual_seed(seed)
    return TextEmbeddings(fg=F.normalize(torch.randn(classes, dim, generator=g), dim=-1),
                          bg=F.normalize(torch.randn(background, dim, generator=g), dim=-1))


def images(batch: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def backbone(make_tiny_backbone) -> FrozenCLIP:
    """Tiny random ViT with a soft logit scale, so every CAM is well-conditioned."""
    model = make_tiny_backbone()
    model.logit_scale = SOFT_LOGIT_SCALE
    return model


def released_scale_cam(activations: np.ndarray, grads: np.ndarray, grid: tuple[int, int],
                       passes: int = 2) -> np.ndarray:
    """pytorch_grad_cam's way, in numpy (docs/algorithm.md §4 steps 1-4): D×h×w maps, weights = spatial mean of
    grads, weighted sum, ReLU, scale_cam_image (x - min, / (1e-7 + max)) in compute_cam_per_layer; then, in
    aggregate_multi_layers, stack the one layer, max(·, 0), mean over layers and scale_cam_image again.
    passes=1 stops after compute_cam_per_layer: the one-pass CAM of the bug."""
    act = activations.T.reshape(-1, *grid)
    weights = grads.T.reshape(-1, *grid).mean(axis=(1, 2))
    cam = np.maximum((weights[:, None, None] * act).sum(axis=0), 0).astype(np.float32)
    cam = cam - np.min(cam)
    cam = cam / (1e-7 + np.max(cam))
    if passes == 1:
        return cam
    layers = np.mean(np.maximum(np.stack([cam]), 0), axis=0)
    layers = layers - np.min(layers)
    return layers / (1e-7 + np.max(layers))


def test_cam_formula_by_hand() -> None:
    act = torch.tensor([[1.0], [3.0], [-2.0], [0.5]])  # N=4 patches, D=1
    grad = torch.tensor([[2.0], [0.0], [1.0], [1.0]])  # weight = mean = 1
    # CAM = [1, 3, -2, 0.5] → ReLU [1, 3, 0, 0.5] → - min 0 → / (3 + 1e-7) → - min 0 → / (peak + 1e-7)
    once = torch.tensor([[1.0, 3.0], [0.0, 0.5]], dtype=torch.float64) / (3.0 + 1e-7)
    expected = (once / (once.max() + 1e-7)).float()
    torch.testing.assert_close(cam_from_gradient(act, grad, (2, 2)), expected)


def test_cam_formula_matches_released_numpy_batched() -> None:
    g = torch.Generator().manual_seed(5)
    act, grad = torch.randn(3, 2, 12, 7, generator=g), torch.randn(3, 2, 12, 7, generator=g)
    ours = cam_from_gradient(act, grad, (3, 4))
    assert ours.shape == (3, 2, 3, 4) and ours.dtype == torch.float32
    for b in range(3):
        for k in range(2):
            expected = released_scale_cam(act[b, k].numpy(), grad[b, k].numpy(), (3, 4))
            np.testing.assert_allclose(ours[b, k].numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("shape, grid", [((5, 16, 64), (4, 4)), ((3, 2, 400, 768), (20, 20))])
def test_a_cam_is_the_same_bits_whichever_maps_share_its_batch(shape: tuple[int, ...], grid: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(7)
    act, grad = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    together = cam_from_gradient(act, grad, grid).reshape(-1, *grid)
    for i, (a, d) in enumerate(zip(act.reshape(-1, *shape[-2:]), grad.reshape(-1, *shape[-2:]))):
        assert torch.equal(together[i], cam_from_gradient(a, d, grid))


def tiny_peak_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Activations and gradients (N=16 patches of a 4×4 grid, D=1) whose raw CAM peaks at 1e-6, as a class with a
    low softmax probability gets (docs/algorithm.md §4 step 4): patch (0, 0) is the peak, patch (1, 1) sits at
    0.4005 of it, the rest at 0. After one min-max the peak is 1e-6 / (1e-6 + 1e-7) ≈ 0.909."""
    act = torch.zeros(16, 1)
    act[0, 0], act[5, 0] = 1.0, 0.4005
    return act, torch.full((16, 1), 1e-6)


def test_a_tiny_raw_peak_is_normalised_twice_to_one() -> None:
    act, grad = tiny_peak_case()
    raw = (act @ grad.mean(dim=0)).max().item()
    assert raw == pytest.approx(1e-6, rel=1e-6)
    ours = cam_from_gradient(act, grad, (4, 4))
    expected = released_scale_cam(act.numpy(), grad.numpy(), (4, 4))
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-6)
    assert abs(ours.max().item() - 1) < 1e-6
    assert released_scale_cam(act.numpy(), grad.numpy(), (4, 4), passes=1).max() < 0.91  # the case needs pass 2


def test_one_pass_gives_another_box_mask() -> None:
    """CAA's box threshold int(0.4·max(floor(255·cam))) (docs/algorithm.md §5.2 step 4) moves with the peak: after
    two passes patch (1, 1) is floor(255·0.4005) = 102 > int(0.4·254) = 101, a box of its own; after one pass it is
    floor(231.8·0.4005) = 92, not > int(0.4·231) = 92."""
    act, grad = tiny_peak_case()
    fixed = box_masks(cam_from_gradient(act, grad, (4, 4)), threshold=0.4)
    one_pass = box_masks(torch.from_numpy(released_scale_cam(act.numpy(), grad.numpy(), (4, 4), passes=1)),
                         threshold=0.4)
    assert torch.equal(fixed, box_masks(torch.from_numpy(released_scale_cam(act.numpy(), grad.numpy(), (4, 4))),
                                        threshold=0.4))
    assert not torch.equal(fixed, one_pass)
    assert fixed[1, 1] and not one_pass[1, 1] and fixed[0, 0] and one_pass[0, 0]


def test_batched_equals_loop_with_mixed_label_counts(backbone: FrozenCLIP, monkeypatch) -> None:
    text = random_text(classes=7, background=5, dim=backbone.embed_dim)
    x = images(4, 48, 80)  # non-square 3×5 grid, not the trained 4×4
    labels = [[0, 2, 6], [4], [1, 3], [0, 1, 5]]
    layers, attn_layers = (1, 3), (2, 3)
    calls = []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real_grad(*a, **k))
    batched = softmax_gradcam(backbone, x, labels, text, layers, attn_layers, k_max=4)
    monkeypatch.setattr(torch.autograd, "grad", real_grad)
    assert len(calls) == 1  # one vmapped backward for every class slot, never one per (image, class)

    loop = softmax_gradcam_loop(backbone, x, labels, text, layers, attn_layers, k_max=4)
    full = softmax_gradcam_loop(backbone, x, labels, text, layers, attn_layers, k_max=4, full_pass=True)
    torch.testing.assert_close(full.cams, loop.cams, atol=1e-6, rtol=0)
    assert batched.grid == loop.grid == (3, 5)
    assert batched.cams.shape == (4, 4, 3, 5) and batched.cams.dtype == torch.float32
    torch.testing.assert_close(batched.cams, loop.cams, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.features, loop.features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched.attn, loop.attn, atol=1e-6, rtol=1e-5)
    expected_classes = torch.tensor([[0, 2, 6, -1], [4, -1, -1, -1], [1, 3, -1, -1], [0, 1, 5, -1]])
    assert torch.equal(batched.cam_classes, expected_classes) and torch.equal(loop.cam_classes, expected_classes)
    filled = expected_classes >= 0
    assert (batched.cams[~filled] == 0).all()
    maxima = batched.cams.amax(dim=(-2, -1))[filled]
    assert ((maxima > 0.99) & (maxima <= 1)).all() and (batched.cams.amin(dim=(-2, -1))[filled] == 0).all()
    # different classes of one image give different maps: the per-slot targets really differ
    assert (batched.cams[0, 0] - batched.cams[0, 1]).abs().max() > 1e-3


def test_k_max_defaults_to_the_largest_label_count(backbone: FrozenCLIP) -> None:
    text = random_text(classes=4, background=3, dim=backbone.embed_dim)
    out = softmax_gradcam(backbone, images(2, 32, 32), [[1], [0, 3]], text, (), ())
    assert out.cams.shape == (2, 2, 2, 2) and out.cam_classes.tolist() == [[1, -1], [0, 3]]
    assert out.features.shape == (2, 0, 4, 64) and out.attn.shape == (2, 0, 4, 4)


def test_kept_features_and_attention_are_the_blocks_patch_parts(backbone: FrozenCLIP) -> None:
    text = random_text(classes=3, background=2, dim=backbone.embed_dim)
    x = images(2, 64, 48)
    out = softmax_gradcam(backbone, x, [[0], [1, 2]], text, (3, 1), (1, 2, 3))
    frozen = backbone.forward_frozen(x)
    last_tokens, last_attn = block_forward(backbone.model.visual.transformer.resblocks[-1], frozen.last)
    assert out.features.shape == (2, 2, 12, 64) and out.attn.shape == (2, 3, 12, 12)
    torch.testing.assert_close(out.features[:, 0], last_tokens[:, 1:], atol=1e-6, rtol=1e-5)  # block n
    torch.testing.assert_close(out.features[:, 1], frozen.tokens[0][:, 1:])
    for i in range(2):
        torch.testing.assert_close(out.attn[:, i], frozen.attn[i][:, 1:, 1:])
    torch.testing.assert_close(out.attn[:, 2], last_attn[:, 1:, 1:], atol=1e-6, rtol=1e-5)


def test_one_image_alone_gives_the_same_cams_as_in_a_batch(backbone: FrozenCLIP) -> None:
    text = random_text(classes=5, background=4, dim=backbone.embed_dim)
    x = images(3, 32, 48)
    labels = [[0, 4], [2], [1, 3]]
    together = softmax_gradcam(backbone, x, labels, text, (), ()).cams
    alone = softmax_gradcam(backbone, x[2:], labels[2:], text, (), (), k_max=2).cams
    torch.testing.assert_close(together[2], alone[0], atol=1e-5, rtol=0)


def test_a_shared_frozen_pass_gives_the_same_cams_for_every_text_set(backbone: FrozenCLIP) -> None:
    x, labels = images(2, 32, 48), [[0, 3], [1]]
    frozen = backbone.forward_frozen(x, token_layers=(), attn_layers=())
    for seed in (0, 1):  # two text sets, as two templates give, on one frozen pass
        text = random_text(classes=4, background=3, dim=backbone.embed_dim, seed=seed)
        fresh = softmax_gradcam_loop(backbone, x, labels, text, (), ()).cams
        shared = softmax_gradcam(backbone, x, labels, text, (), (), frozen=frozen).cams
        torch.testing.assert_close(shared, fresh, atol=1e-5, rtol=0)


@pytest.mark.parametrize("labels, match", [
    ([[1, 0], [2]], "ascending"),
    ([[], [2]], "at least one"),
    ([[0, 9], [2]], r"\[0, 4\)"),
    ([[0]], "2 images but 1 label lists"),
])
def test_bad_labels_are_rejected(tiny_backbone: FrozenCLIP, labels, match: str) -> None:
    text = random_text(classes=4, background=2, dim=tiny_backbone.embed_dim)
    with pytest.raises(ValueError, match=match):
        softmax_gradcam(tiny_backbone, images(2, 32, 32), labels, text, (), ())


def test_bad_layers_and_k_max_are_rejected(tiny_backbone: FrozenCLIP) -> None:
    text = random_text(classes=4, background=2, dim=tiny_backbone.embed_dim)
    with pytest.raises(ValueError, match="1-based blocks 1..3"):
        softmax_gradcam(tiny_backbone, images(1, 32, 32), [[0]], text, (0,), ())
    with pytest.raises(ValueError, match="raise k_max"):
        softmax_gradcam(tiny_backbone, images(1, 32, 32), [[0, 1]], text, (), (), k_max=1)


@pytest.mark.slow
def test_vit_b16_random_weights_batched_equals_loop() -> None:
    torch.manual_seed(0)
    backbone = FrozenCLIP.load("ViT-B-16-quickgelu", pretrained=None)  # random-init logit scale 1/0.07: not saturated
    assert (backbone.width, backbone.num_blocks, backbone.embed_dim, backbone.trained_grid) == (768, 12, 512, (14, 14))
    text = random_text(classes=20, background=25, dim=512)
    x = images(2, 320, 320)
    labels = [[3, 14], [7]]
    batched = softmax_gradcam(backbone, x, labels, text, tuple(range(1, 12)), tuple(range(1, 13)))
    loop = softmax_gradcam_loop(backbone, x, labels, text, tuple(range(1, 12)), tuple(range(1, 13)))
    assert batched.features.shape == (2, 11, 400, 768) and batched.attn.shape == (2, 12, 400, 400)
    assert batched.cams.shape == (2, 2, 20, 20)
    assert (batched.cams.amax(dim=(-2, -1))[batched.cam_classes >= 0] > 0.99).all()
    torch.testing.assert_close(batched.cams, loop.cams, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.attn, loop.attn, atol=1e-5, rtol=1e-4)
