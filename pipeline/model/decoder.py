"""WeCLIP's trainable part: fusion head, transformer decoder and affinity map (docs/algorithm.md §6.1–6.3).

Input is the feature cache's `features` array: B×L×N×D patch tokens of the frozen backbone's blocks
(CLS dropped, blocks in order, N = h·w row-major). With the released settings (L=11, D=768, 21 classes)
the module has exactly 5,985,045 learnable parameters (§6.2), 6,000,465 with 81 classes.

Differences from the released code, none of which changes the maths or the parameter count:
- the L per-block MLPs are stored as stacked weights and run as two batched matmuls instead of L
  separate `nn.Linear` pairs (same default initialisation, U(±1/√fan_in), for weights and biases);
- everything runs in the parameters' dtype (fp32, autocast-friendly) instead of the released half-precision
  mix; the affinity map is always computed in fp32 so that the sigmoid of large dot products stays exact.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import NamedTuple

import torch
from open_clip.transformer import QuickGELU
from torch import Tensor, nn

from weclip.pipeline.config import DecoderConfig


class DecoderOutput(NamedTuple):
    logits: Tensor  # B×C×h×w segmentation logits at patch resolution (upsampling happens in the loss / inference)
    affinity: Tensor  # B×N×N, sigmoid(F_uᵀF_u) of the post-dropout fused map (§6.3), fp32
    fused: Tensor  # B×E×h×w, F_u after the 1×1 fuse conv and Dropout2d (§6.1)


class BlockMLPs(nn.Module):
    """L independent two-layer MLPs, D→E, ReLU, E→E, one per backbone block ([PW] Eq. 1, §6.1).

    Weights are stacked (w1: L×D×E, w2: L×E×E) so that all blocks run in one batched matmul; the
    parameter count and the maths equal L pairs of `nn.Linear` (whose weight is the transpose of w·[l]).
    """

    def __init__(self, layers: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(layers, in_dim, out_dim))
        self.b1 = nn.Parameter(torch.empty(layers, out_dim))
        self.w2 = nn.Parameter(torch.empty(layers, out_dim, out_dim))
        self.b2 = nn.Parameter(torch.empty(layers, out_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default `nn.Linear` init: weight and bias ~ U(±1/√fan_in)."""
        for weight, bias in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = 1.0 / math.sqrt(weight.shape[1])
            nn.init.uniform_(weight, -bound, bound)
            nn.init.uniform_(bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """x: B×L×N×D → B×L×N×E."""
        b, layers, n, d = x.shape
        x = x.transpose(0, 1).reshape(layers, b * n, d).to(self.w1.dtype)
        x = torch.relu(torch.baddbmm(self.b1.unsqueeze(1), x, self.w1))
        x = torch.baddbmm(self.b2.unsqueeze(1), x, self.w2)
        return x.reshape(layers, b, n, -1).transpose(0, 1)


class ResidualAttentionBlock(nn.Module):
    """CLIP-style pre-LN block (§6.2): x += MHA(LN1(x)); x += MLP(LN2(x)); QuickGELU, no dropout.

    Parameter names follow CLIP / open_clip (ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj).
    """

    def __init__(self, width: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, mlp_dim), gelu=QuickGELU(), c_proj=nn.Linear(mlp_dim, width)))

    def forward(self, x: Tensor) -> Tensor:
        """x: B×N×width tokens (no positional encoding)."""
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


def affinity_map(fused: Tensor) -> Tensor:
    """A_f = sigmoid(F_uᵀF_u) per image, raw dot products, no normalisation ([PW] Eq. 4, §6.3).

    fused: B×E×h×w → B×N×N in fp32 (autocast is switched off for this product on purpose).
    """
    with torch.autocast(device_type=fused.device.type, enabled=False):
        f = fused.flatten(2).float()
        return torch.sigmoid(torch.bmm(f.transpose(1, 2), f))


class WeCLIPDecoder(nn.Module):
    """Fusion head + 3-block transformer decoder + 1×1 classifier (§6.1–6.2), with the affinity map (§6.3).

    in_layers: number of backbone blocks fed in (released code: 11, blocks 1..11; paper: 12).
    in_dim: backbone width (768 for ViT-B/16). num_classes: including background (VOC 21, COCO 81).
    """

    def __init__(self, in_layers: int, in_dim: int, num_classes: int, cfg: DecoderConfig = DecoderConfig()) -> None:
        super().__init__()
        self.in_layers = in_layers
        self.in_dim = in_dim
        width = cfg.embed_dim
        self.mlps = BlockMLPs(in_layers, in_dim, width)
        self.fuse = nn.Conv2d(in_layers * width, width, kernel_size=1, bias=True)
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.blocks = nn.Sequential(*(ResidualAttentionBlock(width, cfg.heads, cfg.mlp_dim) for _ in range(cfg.layers)))
        self.head = nn.Conv2d(width, num_classes, kernel_size=1, bias=True)

    def forward(self, features: Tensor, grid: tuple[int, int]) -> DecoderOutput:
        """features: B×L×N×D patch tokens (the cache's `features`), grid: (h, w) with h·w = N."""
        h, w = grid
        if features.ndim != 4 or features.shape[1] != self.in_layers or features.shape[3] != self.in_dim \
                or features.shape[2] != h * w:
            raise ValueError(
                f"decoder expects features of shape B×{self.in_layers}×{h * w}×{self.in_dim} for grid {h}×{w}, "
                f"got {tuple(features.shape)}; check that the cache's feature layers and the model width match "
                f"the decoder (feature_layers / in_layers) and that the grid is the crop size // patch size")
        b = features.shape[0]
        tokens = self.mlps(features)  # B×L×N×E
        stacked = tokens.permute(0, 1, 3, 2).reshape(b, -1, h, w)  # channels in block order, l·E + e
        fused = self.dropout(self.fuse(stacked))
        x = self.blocks(fused.flatten(2).transpose(1, 2))  # B×N×E
        logits = self.head(x.transpose(1, 2).reshape(b, -1, h, w))
        return DecoderOutput(logits=logits, affinity=affinity_map(fused), fused=fused)
