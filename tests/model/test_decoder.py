"""WeCLIP decoder: parameter counts, shapes, affinity, and equality with a plain per-block reference."""
from __future__ import annotations

import math

import pytest
import torch
from open_clip.transformer import QuickGELU
from open_clip.transformer import ResidualAttentionBlock as OpenClipBlock
from torch import nn

from weclip.pipeline.config import DecoderConfig
from weclip.pipeline.model.decoder import BlockMLPs, WeCLIPDecoder

TINY = DecoderConfig(embed_dim=32, layers=2, heads=4, mlp_dim=128, dropout=0.1)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize("classes, expected", [(21, 5_985_045), (81, 6_000_465)])
def test_parameter_count_matches_released_model(classes: int, expected: int) -> None:
    assert n_params(WeCLIPDecoder(11, 768, classes, DecoderConfig())) == expected


def test_shapes_on_non_square_grid() -> None:
    torch.manual_seed(0)
    model = WeCLIPDecoder(3, 64, 5, TINY)
    out = model(torch.randn(2, 3, 3 * 5, 64), (3, 5))
    assert out.logits.shape == (2, 5, 3, 5)
    assert out.affinity.shape == (2, 15, 15)
    assert out.fused.shape == (2, 32, 3, 5)


def test_rejects_features_that_do_not_match() -> None:
    model = WeCLIPDecoder(3, 64, 5, TINY)
    with pytest.raises(ValueError, match="in_layers"):
        model(torch.randn(1, 4, 15, 64), (3, 5))
    with pytest.raises(ValueError, match="grid"):
        model(torch.randn(1, 3, 16, 64), (3, 5))


def test_affinity_is_sigmoid_of_post_dropout_fused_map() -> None:
    torch.manual_seed(1)
    model = WeCLIPDecoder(3, 64, 5, DecoderConfig(embed_dim=32, layers=1, heads=4, mlp_dim=64, dropout=0.5)).train()
    out = model(0.05 * torch.randn(2, 3, 12, 64), (3, 4))
    channel_energy = out.fused.abs().sum(dim=(2, 3))
    assert (channel_energy == 0).any(), "Dropout2d should zero whole channels of F_u in train mode"
    a = out.affinity
    assert torch.equal(a, a.transpose(1, 2))
    assert bool(((a > 0) & (a < 1)).all())
    for b in range(2):  # pair by pair from the returned F_u
        f = out.fused[b].detach().reshape(32, -1).double()
        for i in range(12):
            for j in range(12):
                expected = 1.0 / (1.0 + math.exp(-float(f[:, i] @ f[:, j])))
                assert a[b, i, j].item() == pytest.approx(expected, rel=1e-5)


def test_affinity_gradient_reaches_only_fusion_head() -> None:
    model = WeCLIPDecoder(3, 64, 5, TINY)
    out = model(torch.randn(1, 3, 6, 64), (2, 3))
    out.affinity.sum().backward()
    assert model.mlps.w1.grad is not None and model.fuse.weight.grad is not None
    assert all(p.grad is None for p in model.blocks.parameters())
    assert model.head.weight.grad is None


def test_batched_mlps_use_linear_default_init_bounds() -> None:
    mlps = BlockMLPs(4, 400, 100)
    for w, b, fan_in in ((mlps.w1, mlps.b1, 400), (mlps.w2, mlps.b2, 100)):
        bound = 1 / math.sqrt(fan_in)
        for t in (w, b):
            assert t.abs().max() <= bound
            assert t.abs().max() > 0.9 * bound
        assert not torch.equal(w[0], w[1]), "each block has its own weights"


class PlainReference(nn.Module):
    """The released structure written plainly: L nn.Linear pairs, torch.cat, open_clip's CLIP block."""

    def __init__(self, model: WeCLIPDecoder, cfg: DecoderConfig) -> None:
        super().__init__()
        layers = model.mlps.w1.shape[0]
        self.lin1 = nn.ModuleList(nn.Linear(model.in_dim, cfg.embed_dim) for _ in range(layers))
        self.lin2 = nn.ModuleList(nn.Linear(cfg.embed_dim, cfg.embed_dim) for _ in range(layers))
        with torch.no_grad():
            for l in range(layers):
                self.lin1[l].weight.copy_(model.mlps.w1[l].T)
                self.lin1[l].bias.copy_(model.mlps.b1[l])
                self.lin2[l].weight.copy_(model.mlps.w2[l].T)
                self.lin2[l].bias.copy_(model.mlps.b2[l])
        self.fuse = model.fuse
        self.blocks = nn.ModuleList(
            OpenClipBlock(cfg.embed_dim, cfg.heads, cfg.mlp_dim / cfg.embed_dim, act_layer=QuickGELU,
                          norm_layer=nn.LayerNorm, batch_first=True) for _ in range(cfg.layers))
        for mine, ref in zip(model.blocks, self.blocks):
            ref.load_state_dict(mine.state_dict())
        self.head = model.head

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        b = features.shape[0]
        h, w = grid
        maps = []
        for l in range(features.shape[1]):
            y = self.lin2[l](torch.relu(self.lin1[l](features[:, l])))  # B×N×E
            maps.append(y.transpose(1, 2).reshape(b, -1, h, w))
        fused = self.fuse(torch.cat(maps, dim=1))
        x = fused.flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.head(x.transpose(1, 2).reshape(b, -1, h, w)), fused


def test_matches_plain_per_block_reference() -> None:
    torch.manual_seed(2)
    model = WeCLIPDecoder(4, 48, 6, TINY).eval()
    ref = PlainReference(model, TINY).eval()
    features = torch.randn(3, 4, 2 * 5, 48).half()  # the cache stores float16
    with torch.no_grad():
        out = model(features, (2, 5))
        ref_logits, ref_fused = ref(features.float(), (2, 5))
    torch.testing.assert_close(out.fused, ref_fused, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-5, atol=1e-5)


def test_runs_under_autocast_with_fp32_affinity() -> None:
    model = WeCLIPDecoder(3, 64, 5, TINY)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 6, 64), (2, 3))
    assert out.affinity.dtype == torch.float32
    assert torch.isfinite(out.logits.float()).all()
