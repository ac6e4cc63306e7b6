"""FrozenCLIP: own block forward vs open_clip, pos-emb resize, last block gradient, loading and checkpoint errors."""
from __future__ import annotations

import copy
import hashlib
import json
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from weclip.pipeline.model.backbone import FrozenCLIP, block_forward, register_model_configs, resize_pos_embed
from tests.conftest import TINY_CONFIG, TINY_NAME, build_tiny_backbone


def images(batch: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def open_clip_avg_pool_model(backbone: FrozenCLIP) -> torch.nn.Module:
    """A copy of the underlying open_clip model pooling like WeCLIP: ln_post, patch-token mean, proj."""
    model = copy.deepcopy(backbone.model)
    model.visual.pool_type = "avg"
    return model


def test_register_model_configs_is_idempotent(tmp_path) -> None:
    register_model_configs(TINY_CONFIG)
    register_model_configs(TINY_CONFIG)
    assert TINY_NAME in open_clip.list_models()
    with pytest.raises(FileNotFoundError, match="nope.json"):
        register_model_configs(tmp_path / "nope.json")


def test_frozen_and_attributes(tiny_backbone: FrozenCLIP) -> None:
    assert not any(p.requires_grad for p in tiny_backbone.parameters())
    assert not tiny_backbone.training
    tiny_backbone.train()
    assert not tiny_backbone.training and not tiny_backbone.model.visual.training
    assert (tiny_backbone.patch_size, tiny_backbone.width, tiny_backbone.num_blocks, tiny_backbone.embed_dim) == \
        (16, 64, 3, 32)
    assert tiny_backbone.logit_scale == pytest.approx(math.exp(tiny_backbone.model.logit_scale.item()))
    assert tiny_backbone.checkpoint_sha256 is None and tiny_backbone.identity.startswith(f"{TINY_NAME}:random:")
    assert build_tiny_backbone(seed=1).identity != tiny_backbone.identity  # different random weights


@pytest.mark.parametrize("batch_first", [True, False])
def test_own_block_forward_matches_open_clip_block(tiny_backbone: FrozenCLIP, batch_first: bool) -> None:
    x = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(2))
    for block in tiny_backbone.model.visual.transformer.resblocks:
        ours, attn = block_forward(block, x)
        block = copy.deepcopy(block)
        block.attn.batch_first = batch_first
        ref = block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        # head-averaged weights as nn.MultiheadAttention reports them with need_weights=True
        h = block.ln_1(x if batch_first else x.transpose(0, 1))
        _, ref_attn = block.attn(h, h, h, need_weights=True, average_attn_weights=True)
        torch.testing.assert_close(attn, ref_attn, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_forward_matches_open_clip_intermediates_and_encode_image(make_tiny_backbone, batch_first: bool) -> None:
    backbone = make_tiny_backbone()
    reference = open_clip_avg_pool_model(backbone)
    reference.visual.transformer.batch_first = batch_first  # open_clip 2.x layout: blocks take L×B×D
    for block in reference.visual.transformer.resblocks:
        block.attn.batch_first = batch_first
    x = images(2, 64, 64)
    frozen = backbone.forward_frozen(x)
    assert frozen.token_layers == frozen.attn_layers == (1, 2) and frozen.grid == (4, 4)
    out = reference.visual.forward_intermediates(x, indices=[0, 1], output_fmt="NLC", output_extra_tokens=True)
    for ours, patches, cls in zip(frozen.tokens, out["image_intermediates"], out["image_intermediates_prefix"]):
        assert ours.shape == (2, 17, 64)
        torch.testing.assert_close(ours, torch.cat([cls, patches], dim=1), atol=1e-5, rtol=1e-5)
    assert frozen.last is frozen.tokens[-1]
    torch.testing.assert_close(backbone.encode_image(x), reference.encode_image(x, normalize=True),
                               atol=1e-5, rtol=1e-5)


def test_attention_rows_sum_to_one_and_are_fp32(tiny_backbone: FrozenCLIP) -> None:
    frozen = tiny_backbone.forward_frozen(images(2, 48, 80))
    for attn in frozen.attn:
        assert attn.dtype == torch.float32 and attn.shape == (2, 16, 16)
        assert (attn >= 0).all()
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, 16), atol=1e-6, rtol=0)


def test_pos_embed_resize_keeps_native_grid_and_matches_hand_computation() -> None:
    pos = torch.randn(1 + 2 * 3, 5)
    assert resize_pos_embed(pos, (2, 3), (2, 3)) is pos
    # 1×2 grid → 1×4, bilinear, align_corners=False: source x = (i + 0.5)/2 - 0.5, clamped at the borders
    pos = torch.randn(3, 5)
    cls, v0, v1 = pos
    expected = torch.stack([cls, v0, 0.75 * v0 + 0.25 * v1, 0.25 * v0 + 0.75 * v1, v1])
    torch.testing.assert_close(resize_pos_embed(pos, (1, 2), (1, 4)), expected)


def test_non_square_forward_equals_open_clip_with_resized_table(make_tiny_backbone) -> None:
    backbone = make_tiny_backbone()
    x = images(2, 48, 96)  # grid 3×6 (trained grid 4×4)
    frozen = backbone.forward_frozen(x)
    assert frozen.grid == (3, 6) and frozen.tokens[0].shape == (2, 19, 64) and frozen.attn[0].shape == (2, 19, 19)
    reference = open_clip_avg_pool_model(backbone)
    visual = reference.visual
    visual.positional_embedding = torch.nn.Parameter(resize_pos_embed(visual.positional_embedding, (4, 4), (3, 6)))
    torch.testing.assert_close(backbone.encode_image(x), reference.encode_image(x, normalize=True),
                               atol=1e-5, rtol=1e-5)


def test_image_size_must_be_a_multiple_of_the_patch(tiny_backbone: FrozenCLIP) -> None:
    with pytest.raises(ValueError, match="multiples of the patch size 16"):
        tiny_backbone.forward_frozen(images(1, 50, 64))


def test_last_block_gradient_equals_hook_on_ln1(tiny_backbone: FrozenCLIP) -> None:
    x = images(2, 48, 64)
    direction = torch.randn(tiny_backbone.embed_dim, generator=torch.Generator().manual_seed(3))
    frozen = tiny_backbone.forward_frozen(x)
    u, tokens_out, attn_out = tiny_backbone.last_block(frozen.last)
    assert u.is_leaf and u.requires_grad and attn_out.shape == (2, 13, 13)
    (tiny_backbone.pooled_embedding(tokens_out) @ direction).sum().backward()

    # the released code's way: a forward hook on the last block's ln_1 output inside one full forward
    reference = open_clip_avg_pool_model(tiny_backbone)
    visual = reference.visual
    visual.positional_embedding = torch.nn.Parameter(resize_pos_embed(visual.positional_embedding, (4, 4), (3, 4)))
    captured = []

    def keep_output(module, inputs, output) -> None:
        output.retain_grad()
        captured.append(output)

    visual.transformer.resblocks[-1].ln_1.register_forward_hook(keep_output)
    (reference.encode_image(x.clone().requires_grad_(True), normalize=True) @ direction).sum().backward()
    torch.testing.assert_close(u.detach(), captured[0].detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(u.grad, captured[0].grad, atol=1e-6, rtol=1e-4)
    assert u.grad.abs().max() > 0


def test_encode_text_is_normalised_and_matches_open_clip(tiny_backbone: FrozenCLIP) -> None:
    texts = ["a clean origami cat.", "a clean origami person with clothes,people,human."]
    emb = tiny_backbone.encode_text(texts)
    assert emb.shape == (2, tiny_backbone.embed_dim) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    tokens = open_clip.get_tokenizer(TINY_NAME)(texts)
    torch.testing.assert_close(emb, tiny_backbone.model.encode_text(tokens, normalize=True))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_stays_close_and_keeps_fp32_attention(precision: str) -> None:
    fp32 = build_tiny_backbone()
    low = build_tiny_backbone(precision=precision)
    x = images(2, 64, 64)
    frozen = low.forward_frozen(x)
    assert all(t.dtype == torch.float32 for t in frozen.attn + frozen.tokens)
    u, _, _ = low.last_block(frozen.last)
    assert u.dtype == torch.float32
    torch.testing.assert_close(frozen.attn[0].sum(-1), torch.ones(2, 17), atol=1e-5, rtol=0)
    torch.testing.assert_close(low.encode_image(x), fp32.encode_image(x), atol=3e-2, rtol=0)


def save_formats(state: dict, path, fmt: str) -> None:
    if fmt == "state_dict":
        torch.save(state, path)
    elif fmt == "wrapped":  # a training checkpoint from DDP: {'state_dict': {'module.<key>': ...}}
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    elif fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "torchscript":  # OpenAI's original ViT-B-16.pt is a TorchScript archive
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(torch.jit.script(build_tiny_backbone().model), str(path))


@pytest.mark.parametrize("fmt", ["state_dict", "wrapped", "safetensors", "torchscript"])
def test_local_checkpoint_round_trip(tmp_path, tiny_backbone: FrozenCLIP, fmt: str) -> None:
    path = tmp_path / ("weights.safetensors" if fmt == "safetensors" else "weights.pt")
    save_formats(tiny_backbone.model.state_dict(), path, fmt)
    torch.manual_seed(123)  # a different random init, which the file must overwrite
    loaded = FrozenCLIP.load(TINY_NAME, pretrained=str(path))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.checkpoint_sha256 == sha and sha in loaded.identity and loaded.pretrained == str(path)
    x = images(2, 48, 64)
    torch.testing.assert_close(loaded.encode_image(x), tiny_backbone.encode_image(x), atol=0, rtol=0)
    torch.testing.assert_close(loaded.encode_text(["a dog"]), tiny_backbone.encode_text(["a dog"]), atol=0, rtol=0)


def test_truncated_checkpoint_names_the_file(tmp_path, tiny_backbone: FrozenCLIP) -> None:
    path = tmp_path / "cut.pt"
    torch.save(tiny_backbone.model.state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*cut\.pt.*truncated"):
        FrozenCLIP.load(TINY_NAME, pretrained=str(path))


def test_wrong_architecture_checkpoint_names_the_file(tmp_path) -> None:
    config = json.loads(TINY_CONFIG.read_text())
    config["vision_cfg"]["width"] = 32
    other = tmp_path / "tiny-vit-narrow.json"
    other.write_text(json.dumps(config))
    register_model_configs(other)
    path = tmp_path / "narrow.pt"
    torch.save(open_clip.create_model("tiny-vit-narrow").state_dict(), path)
    with pytest.raises(ValueError, match=r"narrow\.pt does not match the architecture of model 'tiny-vit'.*"
                                         r"visual\.conv1\.weight"):
        FrozenCLIP.load(TINY_NAME, pretrained=str(path))


def test_missing_checkpoint_and_unknown_model(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"absent\.pt not found"):
        FrozenCLIP.load(TINY_NAME, pretrained=str(tmp_path / "absent.pt"))
    with pytest.raises(ValueError, match="unknown model 'no-such-vit'"):
        FrozenCLIP.load("no-such-vit")


def test_not_a_state_dict(tmp_path) -> None:
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match=r"tensor\.pt"):
        FrozenCLIP.load(TINY_NAME, pretrained=str(path))


def test_pooled_embedding_is_normalised_patch_mean(tiny_backbone: FrozenCLIP) -> None:
    tokens = torch.randn(2, 5, 64)
    visual = tiny_backbone.model.visual
    expected = F.normalize(torch.stack([visual.ln_post(t)[1:].mean(0) @ visual.proj for t in tokens]), dim=-1)
    torch.testing.assert_close(tiny_backbone.pooled_embedding(tokens), expected)
