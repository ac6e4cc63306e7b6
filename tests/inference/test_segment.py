"""pipeline/inference/segment.py: multi-scale + flip merging, the patch-grid floor, segment_fn, CLIP-ES inputs and scores."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from weclip.pipeline.model.backbone import block_forward
from weclip.pipeline.config import EvalConfig, RefineConfig
from weclip.pipeline.model.decoder import DecoderConfig, WeCLIPDecoder
from weclip.pipeline.inference.segment import (ImageTooSmall, check_msc_size, clipes_cam_scores, msc_sizes, clipes_input, floor_to_patches, msc_flip_logits,
                                resize_long_side, segment_fn)
from weclip.pipeline.model.text import TextEmbeddings

H, W = 50, 37  # neither a multiple of 16


def conv_seg_fn(channels: int = 5, seed: int = 0):
    """A toy seg_fn: a fixed random 16×16 stride-16 conv (floors like the ViT's patch embedding) plus a column
    ramp, so the output depends on content and position (a flip is visible)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(channels, 3, 16, 16, generator=gen) / 100
    calls: list[torch.Tensor] = []

    def seg(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.clone())
        out = F.conv2d(x, weight, stride=16)
        return out + torch.arange(out.shape[-1], dtype=out.dtype) / 10

    return seg, calls


def image(seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(seed))


def test_msc_flip_equals_a_per_view_loop():
    """Reference written view by view, batch of one each (docs/algorithm.md §8.1)."""
    seg, _ = conv_seg_fn()
    x = image()
    got = msc_flip_logits(seg, x, EvalConfig())
    ratio = 512 / max(H, W)
    base = F.interpolate(x, size=(int(H * ratio), int(W * ratio)), mode="bilinear", align_corners=False)
    reference, per_scale = None, []
    for scale in (1.0, 0.75):
        scaled = base if scale == 1.0 else F.interpolate(base, scale_factor=scale, mode="bilinear",
                                                         align_corners=False)
        views = []
        for flip in (False, True):
            out = seg(scaled.flip(-1) if flip else scaled)
            reference = reference or tuple(out.shape[-2:])
            out = F.interpolate(out, size=reference, mode="bilinear", align_corners=False)
            views.append(out.flip(-1) if flip else out)
        per_scale.append((views[0] + views[1]) / 2)
    want = F.interpolate((per_scale[0] + per_scale[1]) / 2, size=(H, W), mode="bilinear", align_corners=False)[0]
    assert got.shape == (5, H, W)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_flip_averaging_of_a_position_ramp_is_its_mean():
    """seg_fn = column index, whatever the input: the un-flipped flip is the reversed ramp, so each scale averages
    to (w − 1)/2. Scale 1.0: 50×37 → 512×378 → 32×23 grid → 11; scale 0.75: 384×283 → 24×17 grid → 8. Mean 9.5."""
    seen = []

    def ramp(x: torch.Tensor) -> torch.Tensor:
        seen.append(x)
        h, w = x.shape[-2] // 16, x.shape[-1] // 16
        return torch.arange(w, dtype=torch.float32).expand(x.shape[0], 2, h, w)

    out = msc_flip_logits(ramp, image(), EvalConfig())
    torch.testing.assert_close(out, torch.full((2, H, W), 9.5))
    assert [tuple(x.shape) for x in seen] == [(2, 3, 512, 378), (2, 3, 384, 283)]
    for x in seen:  # one batched call per scale: the image and its h-flip
        assert torch.equal(x[1], x[0].flip(-1))


def test_single_scale_without_flip_is_plain_upsampling():
    seg, calls = conv_seg_fn()
    x = image(2)
    got = msc_flip_logits(seg, x, EvalConfig(scales=(1.0,), flip=False, long_side=100))
    resized = F.interpolate(x, size=(100, 74), mode="bilinear", align_corners=False)
    want = F.interpolate(seg(resized), size=(H, W), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(got, want)
    assert calls[0].shape == (1, 3, 100, 74)


def test_resize_long_side_truncates_like_int():
    assert resize_long_side(torch.zeros(1, 3, H, W), 512).shape[-2:] == (512, 378)  # 37·512/50 = 378.88
    assert resize_long_side(torch.zeros(1, 3, 600, 1000), 512).shape[-2:] == (307, 512)  # 307.2
    x = torch.randn(1, 3, 32, 512)
    assert resize_long_side(x, 512) is x


def test_msc_flip_rejects_a_batch():
    with pytest.raises(ValueError, match="1×3×H×W"):
        msc_flip_logits(conv_seg_fn()[0], torch.zeros(2, 3, 32, 32))


def test_floor_to_patches_drops_what_the_patch_conv_never_reads():
    x = torch.randn(1, 3, H, W)
    assert torch.equal(floor_to_patches(x, 16), x[..., :48, :32])
    weight = torch.randn(4, 3, 16, 16)
    assert torch.equal(F.conv2d(x, weight, stride=16), F.conv2d(floor_to_patches(x, 16), weight, stride=16))
    with pytest.raises(ValueError, match="smaller than one"):
        floor_to_patches(torch.zeros(1, 3, 15, 40), 16)


def tiny_decoder(backbone, layers: int, seed: int = 0) -> WeCLIPDecoder:
    torch.manual_seed(seed)
    return WeCLIPDecoder(layers, backbone.width, 4, DecoderConfig(embed_dim=16, layers=1, heads=2, mlp_dim=32)).eval()


def test_segment_fn_is_backbone_tokens_then_decoder_on_the_floored_grid(tiny_backbone):
    decoder = tiny_decoder(tiny_backbone, 2)
    x = torch.randn(2, 3, H, W)
    got = segment_fn(tiny_backbone, decoder, (1, 2))(x)
    frozen = tiny_backbone.forward_frozen(x[..., :48, :32], token_layers=(1, 2), attn_layers=())
    features = torch.stack([t[:, 1:] for t in frozen.tokens], dim=1)
    with torch.no_grad():
        want = decoder(features, (3, 2)).logits
    assert got.shape == (2, 4, 3, 2)
    torch.testing.assert_close(got, want)


def test_segment_fn_with_the_last_block(tiny_backbone):
    """Paper variant (decoder fed every block, §9 row 6): block n comes from the grad pass, same numbers."""
    decoder = tiny_decoder(tiny_backbone, 2, seed=1)
    x = torch.randn(1, 3, 32, 48)
    got = segment_fn(tiny_backbone, decoder, (2, 3))(x)
    frozen = tiny_backbone.forward_frozen(x, token_layers=(2,), attn_layers=())
    with torch.no_grad():
        last, _ = block_forward(tiny_backbone.model.visual.transformer.resblocks[-1], frozen.last)
        want = decoder(torch.stack([frozen.tokens[0][:, 1:], last[:, 1:]], dim=1), (2, 3)).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not got.requires_grad


def test_segment_fn_refuses_a_decoder_of_other_layers(tiny_backbone):
    with pytest.raises(ValueError, match="decoder takes 2 layers"):
        segment_fn(tiny_backbone, tiny_decoder(tiny_backbone, 2), (1, 2, 3))
    with pytest.raises(ValueError, match="ascending blocks"):
        segment_fn(tiny_backbone, tiny_decoder(tiny_backbone, 2), (2, 1))


def test_clipes_input_is_a_bicubic_resize_up_to_the_patch_multiple():
    rgb = np.random.default_rng(0).integers(0, 256, (40, 53, 3), dtype=np.uint8)
    out = clipes_input(rgb, 16)
    assert out.shape == (48, 64, 3)
    np.testing.assert_array_equal(out, np.asarray(Image.fromarray(rgb).resize((64, 48), Image.Resampling.BICUBIC)))
    square = rgb[:32, :48]
    assert clipes_input(square, 16) is square


def test_clipes_cam_scores_stack_background_and_keys(tiny_backbone):
    gen = torch.Generator().manual_seed(0)
    text = TextEmbeddings(fg=F.normalize(torch.randn(5, 32, generator=gen), dim=-1),
                          bg=F.normalize(torch.randn(3, 32, generator=gen), dim=-1))
    maps = clipes_cam_scores(tiny_backbone, text, torch.randn(1, 3, 48, 64, generator=gen), [1, 4], (40, 53),
                             RefineConfig(static_layers=3))
    assert maps.cams.shape == maps.refined.shape == (2, 3, 4)
    assert maps.scores.shape == (3, 40, 53)
    assert maps.keys.tolist() == [0, 2, 5]
    torch.testing.assert_close(maps.scores[0], 1 - maps.scores[1:].amax(dim=0))  # bg = (1 − max)^1
    for k in range(2):  # each refined CAM is min-max normalised, or all zero when its box mask is empty
        assert float(maps.refined[k].max()) in (0.0, pytest.approx(1.0, abs=1e-3))  # (max + 1e-7) divisor
    with pytest.raises(ValueError, match="last 8 blocks"):
        clipes_cam_scores(tiny_backbone, text, torch.randn(1, 3, 32, 32), [0], (32, 32), RefineConfig())


@pytest.mark.parametrize("size", [(40, 1000), (37, 53), (500, 375), (333, 77)])
def test_msc_sizes_are_the_sizes_msc_flip_feeds_the_model(size):
    """The size check predicts exactly the inputs `msc_flip_logits` builds (recorded through the seg_fn)."""
    cfg = EvalConfig(long_side=97, scales=(1.0, 0.75, 0.5), flip=False)
    seen = []

    def record(x):
        seen.append(tuple(x.shape[-2:]))
        return torch.zeros(1, 2, 1, 1)

    msc_flip_logits(record, torch.zeros(1, 3, *size), cfg)
    assert msc_sizes(*size, cfg) == seen


def test_check_msc_size_refuses_a_strip_before_any_work():
    cfg = EvalConfig(long_side=512, scales=(1.0, 0.75))
    check_msc_size(375, 500, cfg, 16)  # a VOC-sized image passes
    with pytest.raises(ImageTooSmall, match=r"4×3000 image is 1×512 pixels .* smaller than one 16×16 patch"):
        check_msc_size(4, 3000, cfg, 16)
    with pytest.raises(ImageTooSmall, match="scale 0.75"):  # 21 px at scale 1.0, 15 at 0.75
        check_msc_size(21, 512, cfg, 16)
