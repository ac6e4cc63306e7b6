"""Frozen open_clip ViT: loading, per-forward positional-embedding resize, per-block tokens and attention.

The released code (docs/algorithm.md §3.2) runs blocks 1..n-1 once under `no_grad`, collecting every block output and its
head-averaged attention, and re-runs block n with grad for Grad-CAM. open_clip's blocks call
`nn.MultiheadAttention(need_weights=False)`, so the attention maps are not available from them: this module has its own
block forward that uses each block's weights (docs/algorithm.md §13) and gives the same output as the block.

Nothing here ever downloads for a local path: a path is read by us; only an open_clip tag (e.g. 'openai') goes through
open_clip's fetcher.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from weclip.pipeline.config import ModelConfig
from weclip.pipeline.errors import BackboneError, MissingFile
from weclip.pipeline.files import sha256_file

Precision = Literal["fp32", "bf16", "fp16"]
_AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MODEL_CONFIG_DIR = Path(__file__).resolve().parents[1] / "model_configs"
_REGISTERED: set[Path] = set()
# Entries OpenAI's TorchScript archives carry next to the weights (open_clip drops them the same way).
_TORCHSCRIPT_META_KEYS = ("input_resolution", "context_length", "vocab_size")


def register_model_configs(*paths: str | Path) -> None:
    """Add open_clip model configs (JSON files or folders of them) to open_clip's registry; idempotent.

    Without arguments, registers every JSON under `pipeline/model_configs/` (e.g. `weclip-tiny.json`).
    A file registers under its stem: `tests/tiny-vit.json` becomes model name 'tiny-vit'.
    """
    for path in paths or (MODEL_CONFIG_DIR,):
        resolved = Path(path).resolve()
        if resolved in _REGISTERED:
            continue
        if not resolved.exists():
            raise MissingFile(f"model config {resolved} does not exist; give a JSON file or a folder of them")
        open_clip.add_model_config(resolved)
        _REGISTERED.add(resolved)


@dataclass
class FrozenFeatures:
    """Output of `FrozenCLIP.forward_frozen`.

    `tokens[i]` is the output of 1-based block `token_layers[i]` (B×(1+N)×D, batch-first, CLS first);
    `attn[i]` the softmax attention of block `attn_layers[i]`, averaged over heads, fp32 (B×(1+N)×(1+N));
    `last` the output of block n-1, the input of `FrozenCLIP.last_block`; `grid` the patch grid (h, w), N = h·w.
    """
    tokens: list[torch.Tensor]
    attn: list[torch.Tensor]
    last: torch.Tensor
    grid: tuple[int, int]
    token_layers: tuple[int, ...]
    attn_layers: tuple[int, ...]


def _weights_digest(model: nn.Module) -> str:
    """sha256 of a model's parameters and buffers: the identity of randomly initialised weights."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _is_torchscript_archive(path: Path) -> bool:
    """OpenAI's original `ViT-B-16.pt` is a TorchScript archive (it has `constants.pkl` and `code/`)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Read a CLIP state dict from a local file: torch.save'd state dict (optionally under 'state_dict' or with
    'module.' prefixes), safetensors, or an OpenAI TorchScript archive. Raises ValueError naming the file."""
    try:
        if _is_torchscript_archive(path):
            with warnings.catch_warnings():  # torch.jit.load is deprecated, but it is the only reader of these files
                warnings.simplefilter("ignore", FutureWarning)
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
            state = {k: v for k, v in state.items() if k not in _TORCHSCRIPT_META_KEYS}
        else:
            state = open_clip.factory.load_state_dict(str(path), device="cpu", weights_only=True)
    except Exception as exc:  # torch/zip/pickle raise many types for a damaged file
        raise BackboneError(
            f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}. The file is truncated or not a PyTorch / "
            f"safetensors state dict; copy it again, or point `pretrained` at the right file."
        ) from exc
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"checkpoint {path} does not hold a state dict (name -> tensor); save model.state_dict()")
    return state


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], path: Path, name: str) -> None:
    """Raise ValueError naming the file if the keys or shapes of `state` don't match `model`'s architecture."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {expected[k]}"
        for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k]
    )
    if missing or unexpected or mismatched:
        def head(items: list[str]) -> str:
            return ", ".join(items[:4]) + (f" (+{len(items) - 4} more)" if len(items) > 4 else "")
        problems = [f"{label} {head(items)}" for label, items in
                    (("missing keys:", missing), ("unexpected keys:", unexpected), ("shape mismatches:", mismatched))
                    if items]
        raise BackboneError(
            f"checkpoint {path} does not match the architecture of model {name!r}: " + "; ".join(problems)
            + ". Was it saved from another model? Pass the model name it was saved from."
        )


def _check_supported(model: nn.Module, name: str) -> None:
    """This module re-implements the standard CLIP ViT block; refuse what it would compute differently."""
    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        raise BackboneError(f"model {name!r} has no open_clip VisionTransformer image tower; use a CLIP ViT config")
    if visual.attn_pool is not None or visual.final_ln_after_pool or visual.proj is None:
        raise BackboneError(f"model {name!r} uses attentional pooling / post-pool norm / no projection; "
                         "WeCLIP needs the plain CLIP ViT head (ln_post then proj)")
    if visual.patch_size[0] != visual.patch_size[1]:
        raise BackboneError(f"model {name!r} has non-square patches {visual.patch_size}")
    for block in visual.transformer.resblocks:
        attn = getattr(block, "attn", None)
        if (not isinstance(block, ResidualAttentionBlock) or hasattr(block, "ln_1_kv")
                or not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim
                or attn.bias_k is not None or attn.add_zero_attn):
            raise BackboneError(f"model {name!r} uses a custom transformer block; only the standard CLIP block "
                             "(ResidualAttentionBlock with packed q/k/v projection) is supported")


@functools.lru_cache(maxsize=None)
def _tokenizer(name: str) -> Callable[[list[str]], torch.Tensor]:
    """The model's open_clip tokenizer, built once per model name (building the BPE tables takes a while)."""
    return open_clip.get_tokenizer(name)


def resize_pos_embed(pos: torch.Tensor, trained_grid: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """(1+G)×D table → (1+h·w)×D: patch rows resized bilinearly (align_corners=False, no antialias), CLS row kept.

    docs/algorithm.md §3.2 step 1 (re-interpolated on every forward). The native grid returns the table unchanged.
    """
    if tuple(grid) == tuple(trained_grid):
        return pos
    cls, patches = pos[:1], pos[1:]
    table = patches.reshape(1, *trained_grid, -1).permute(0, 3, 1, 2)
    table = F.interpolate(table.float(), size=grid, mode="bilinear", align_corners=False, antialias=False)
    return torch.cat([cls, table.to(pos.dtype).permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)], dim=0)


def self_attention(attn: nn.MultiheadAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head self-attention with the weights of `attn` on batch-first x (B×L×D).

    Returns (output B×L×D, softmax attention averaged over heads B×L×L fp32). QKᵀ, the softmax and the weighted
    sum run in fp32 whatever the autocast dtype (WeCLIP's myAtt, docs/algorithm.md §3.1); the projections follow autocast.
    The map is the sum over heads / heads (docs/algorithm.md §3.1). Layout does not depend on `attn.batch_first`: only
    the weights are used.
    """
    batch, length, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.reshape(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
    with torch.autocast(x.device.type, enabled=False):
        scale = (width // heads) ** -0.5
        probs = torch.softmax((q.float() * scale) @ k.float().transpose(-2, -1), dim=-1)  # B×H×L×L
        out = (probs @ v.float()).transpose(1, 2).reshape(batch, length, width)
    return attn.out_proj(out), probs.mean(dim=1)


def finish_block(block: ResidualAttentionBlock, x: torch.Tensor, u: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Block output given its input x and u = ln_1(x): x + attn(u), then the MLP residual. Returns (out, attn)."""
    attn_out, attn_map = self_attention(block.attn, u)
    x = x + block.ls_1(attn_out)
    return x + block.ls_2(block.mlp(block.ln_2(x))), attn_map


def block_forward(block: ResidualAttentionBlock, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same output as open_clip's `block(x)` on batch-first x, plus the head-averaged attention."""
    return finish_block(block, x, block.ln_1(x))


@contextlib.contextmanager
def _quiet_open_clip():
    """Silence open_clip's root-logger warnings while building an architecture whose weights we load ourselves."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


class FrozenCLIP(nn.Module):
    """A frozen open_clip CLIP ViT (eval mode, no parameter requires grad) with WeCLIP's image-side forward."""

    def __init__(self, model: nn.Module, name: str, pretrained: str | None, identity: str,
                 checkpoint_sha256: str | None = None, precision: Precision = "fp32") -> None:
        super().__init__()
        _check_supported(model, name)
        if precision not in _AUTOCAST_DTYPES:
            raise BackboneError(f"precision must be one of {sorted(_AUTOCAST_DTYPES)}, got {precision!r}")
        self.model = model
        self.name, self.pretrained, self.identity = name, pretrained, identity
        self.checkpoint_sha256 = checkpoint_sha256
        self.precision: Precision = precision
        visual = model.visual
        self.patch_size = int(visual.patch_size[0])
        self.trained_grid = tuple(int(g) for g in visual.grid_size)
        self.width = int(visual.transformer.width)
        self.num_blocks = len(visual.transformer.resblocks)
        self.embed_dim = int(visual.output_dim)
        self.logit_scale = float(model.logit_scale.detach().float().exp().reshape(-1)[0])
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    @classmethod
    def load(cls, name: str, pretrained: str | None = None, device: str | torch.device = "cpu",
             precision: Precision = "fp32") -> "FrozenCLIP":
        """Build `name` (open_clip or `pipeline/model_configs/` config) with weights from an open_clip tag
        ('openai' for ViT-B-16-quickgelu, docs/algorithm.md §13), a local checkpoint file, or None (random init)."""
        register_model_configs()
        if name not in open_clip.list_models():
            raise BackboneError(f"unknown model {name!r}: not an open_clip config nor a JSON in {MODEL_CONFIG_DIR}")
        if pretrained is not None and open_clip.get_pretrained_cfg(name, pretrained):
            try:
                model = open_clip.create_model(name, pretrained=pretrained, device="cpu")
            except Exception as exc:
                raise BackboneError(
                    f"could not fetch open_clip weights {pretrained!r} for {name} ({exc}). This machine may be "
                    f"offline: download the checkpoint elsewhere and pass its local path as `pretrained`."
                ) from exc
            return cls(model.to(device), name, pretrained, f"{name}:{pretrained}", None, precision)
        with _quiet_open_clip():  # its "initialized randomly" warning is wrong when a local file follows
            model = open_clip.create_model(name, pretrained=None, device="cpu")
        if pretrained is None:
            return cls(model.to(device), name, None, f"{name}:random:{_weights_digest(model)}", None, precision)
        path = Path(pretrained).expanduser()
        if not path.is_file():
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise MissingFile(
                f"checkpoint file {path} not found, and {pretrained!r} is not an open_clip tag of {name} "
                f"(tags: {tags or 'none'}); give an existing checkpoint file or one of the tags"
            )
        state = read_checkpoint(path)
        # TorchScript archives also list non-persistent buffers (e.g. the text attn_mask), which a state dict omits.
        transient = {n for n, _ in model.named_buffers()} - set(model.state_dict())
        state = {k: v for k, v in state.items() if k not in transient}
        check_state_dict(model, state, path, name)
        model.load_state_dict(state, strict=True)
        sha = sha256_file(path)
        return cls(model.to(device), name, str(path), f"{name}@sha256:{sha}", sha, precision)

    def train(self, mode: bool = True) -> "FrozenCLIP":
        """Always eval: the backbone is frozen even inside a module switched to training."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.model.visual.conv1.weight.device

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = _AUTOCAST_DTYPES[self.precision]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    @property
    def _blocks(self) -> nn.ModuleList:
        return self.model.visual.transformer.resblocks

    def grid(self, images: torch.Tensor) -> tuple[int, int]:
        """Patch grid (H/p, W/p) of a B×3×H×W batch; H and W must be multiples of the patch size."""
        height, width = images.shape[-2:]
        p = self.patch_size
        if images.ndim != 4 or images.shape[1] != 3 or height % p or width % p:
            raise ValueError(f"images must be B×3×H×W with H, W multiples of the patch size {p}; "
                             f"got {tuple(images.shape)}")
        return height // p, width // p

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """conv1 → flatten → prepend CLS → add resized pos-emb → ln_pre (docs/algorithm.md §3.2 step 2).

        The residual stream is kept in fp32 under autocast (only the matmuls follow the autocast dtype), so block
        outputs, u and its gradient are fp32 whatever the precision (docs/algorithm.md §13: keep CAM maths in fp32).
        """
        visual = self.model.visual
        x = visual.conv1(images.to(self.device, visual.conv1.weight.dtype)).float().flatten(2).transpose(1, 2)
        cls = visual.class_embedding.float().expand(x.shape[0], 1, -1)
        pos = resize_pos_embed(visual.positional_embedding, self.trained_grid, self.grid(images))
        return visual.ln_pre(torch.cat([cls, x], dim=1) + pos.float())

    @torch.no_grad()
    def forward_frozen(self, images: torch.Tensor, token_layers: Sequence[int] | None = None,
                       attn_layers: Sequence[int] | None = None) -> FrozenFeatures:
        """Blocks 1..n-1 without grad (docs/algorithm.md §3.2 step 3) on normalised images B×3×H×W.

        `token_layers` / `attn_layers` (1-based, ≤ n-1) select what is kept; None keeps all n-1.
        """
        grid = self.grid(images)
        frozen = range(1, self.num_blocks)
        token_layers = tuple(frozen) if token_layers is None else tuple(token_layers)
        attn_layers = tuple(frozen) if attn_layers is None else tuple(attn_layers)
        for layer in token_layers + attn_layers:
            if layer not in frozen:
                raise ValueError(f"forward_frozen keeps blocks 1..{self.num_blocks - 1}, got {layer}")
        tokens, attn = {}, {}
        with self._autocast():
            x = self._embed(images)
            for index, block in enumerate(self._blocks[:-1], start=1):
                x, attn_map = block_forward(block, x)
                if index in token_layers:
                    tokens[index] = x
                if index in attn_layers:
                    attn[index] = attn_map
        return FrozenFeatures(tokens=[tokens[i] for i in token_layers], attn=[attn[i] for i in attn_layers],
                              last=x, grid=grid, token_layers=token_layers, attn_layers=attn_layers)

    def last_block(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block n with grad (docs/algorithm.md §3.2 step 5, §4 step 1) on x = block n-1 output.

        Returns (u, tokens_out, attn_out): u = ln_1(x) as a fresh leaf requiring grad — the Grad-CAM layer —,
        the block output (a function of u and the constant x, so ∂/∂u is the gradient the released code's hook
        on ln_1 sees) and the head-averaged attention.
        """
        block = self._blocks[-1]
        with torch.no_grad(), self._autocast():
            u = block.ln_1(x.detach())
        u = u.detach().requires_grad_(True)
        with torch.enable_grad(), self._autocast():
            tokens_out, attn_out = finish_block(block, x.detach(), u)
        return u, tokens_out, attn_out

    def pooled_embedding(self, tokens_out: torch.Tensor) -> torch.Tensor:
        """ln_post on all tokens → mean over patch tokens (CLS excluded) → @ proj → L2-normalise, fp32
        (docs/algorithm.md §3.2 step 5; [PC]: the patch mean instead of CLS)."""
        visual = self.model.visual
        with self._autocast():
            pooled = visual.ln_post(tokens_out)[:, 1:].mean(dim=1) @ visual.proj
        return F.normalize(pooled.float(), dim=-1)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Full no-grad forward: B×E L2-normalised image embeddings."""
        frozen = self.forward_frozen(images, token_layers=(), attn_layers=())
        with self._autocast():
            tokens_out, _ = block_forward(self._blocks[-1], frozen.last)
        return self.pooled_embedding(tokens_out)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Tokenise with the model's tokenizer, encode, L2-normalise: len(texts)×E fp32 (docs/algorithm.md §3.3)."""
        tokens = _tokenizer(self.name)(list(texts)).to(self.device)
        with self._autocast():
            emb = self.model.encode_text(tokens)
        return F.normalize(emb.float(), dim=-1)

    def extra_repr(self) -> str:
        return f"identity={self.identity!r}, precision={self.precision!r}"



def default_device(device: str | torch.device | None = None) -> torch.device:
    """The device a command runs its models on: the one asked for, else cuda when available, else cpu."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


_BACKBONES: dict[tuple[object, ...], FrozenCLIP] = {}


def _file_state(pretrained: str | None) -> object:
    """What identifies loaded weights: a local file by path, size and mtime (a file replaced or removed since is
    loaded again, and checked again), an open_clip tag by itself."""
    path = Path(pretrained).expanduser() if pretrained is not None else None
    if path is None or not path.is_file():
        return pretrained
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def load_backbone(model: ModelConfig, device: str | torch.device,
                  model_configs: Sequence[str | Path] = ()) -> FrozenCLIP:
    """The frozen backbone of this process, loaded on first use and reused (one load per worker process).

    `model_configs` are extra open_clip config JSONs to register first (e.g. a test's tiny ViT; `FrozenCLIP.load`
    registers the project's own). A random init (`pretrained=None`) is seeded with `model.init_seed`, so every
    process builds the same weights.
    """
    if model_configs:
        register_model_configs(*model_configs)
    key = (model.name, _file_state(model.pretrained), model.precision, model.init_seed, str(device))
    if key not in _BACKBONES:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model.init_seed)
            _BACKBONES[key] = FrozenCLIP.load(model.name, model.pretrained, device=device, precision=model.precision)
    return _BACKBONES[key]
