"""Softmax-Grad-CAM (CLIP-ES / WeCLIP, docs/algorithm.md §4), batched over images and classes.

The released code makes one Grad-CAM call per image and present class, each re-running the last block. Here the
frozen blocks run once for the batch, the last block once with grad, and the per-class gradients come from one
vmapped backward (`torch.autograd.grad(..., is_grads_batched=True)`) whose cotangent j selects each image's j-th
target. Images are independent through the whole graph (per-image pooling and per-image softmax), so each image's
slice of gradient j is exactly its own ∂s_j/∂u. The vmapped backward does the work of K_max separate passes in bigger
matmuls (`benchmarks/cam_throughput.py` measures it against the loop); its peak memory grows with K_max.
`softmax_gradcam_loop` is the released code's way, kept as the reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from weclip.pipeline.model.backbone import FrozenFeatures
from weclip.pipeline.model.protocol import CLIPBackbone
from weclip.pipeline.model.text import TextEmbeddings
from weclip.pipeline.refinement.refine import minmax


@dataclass
class CamBatch:
    """What the extract stage stores per view (docs/design.md §3.2), for a batch of B images on an h×w grid (N = h·w).

    features: B×F×N×D patch tokens of the requested 1-based blocks; attn: B×A×N×N patch-to-patch head-averaged
    attention (CLS row and column dropped); cams: B×K_max×h×w fp32 in [0, 1]; cam_classes: B×K_max int64 class id
    per slot, −1 for an empty slot (whose CAM is zeros).
    """
    features: torch.Tensor
    attn: torch.Tensor
    cams: torch.Tensor
    cam_classes: torch.Tensor
    grid: tuple[int, int]


def cam_from_gradient(activations: torch.Tensor, gradients: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Grad-CAM on patch tokens (...×N×D each, CLS already dropped) → ...×h×w fp32 in [0, 1].

    docs/algorithm.md §4 steps 3–4: w = mean over patches of the gradient; CAM = Σ_k w_k·U_k; ReLU; then min-max
    twice, as the released code does (compute_cam_per_layer, then aggregate_multi_layers, whose max(·, 0) and mean
    over the one layer change nothing). The second pass matters for a low-probability class: its raw peak M is tiny,
    the first pass leaves it at M/(M + 1e-7), and the box threshold and the background score 1 − max see that peak.
    The channel sum is a product reduced over D rather than an einsum, whose matmul rounds differently for other
    batch shapes: a map's CAM is then the same bits whichever maps share its batch (view 0 of a k-view cache is the
    1-view cache's), so a tie in the pseudo labels downstream cannot break differently.
    """
    activations, gradients = activations.float(), gradients.float()
    weights = gradients.mean(dim=-2)
    cam = torch.relu((activations * weights.unsqueeze(-2)).sum(dim=-1))
    return minmax(minmax(cam.reshape(*cam.shape[:-1], *grid)))


def _released_cam(activations: torch.Tensor, gradients: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The released Grad-CAM of one map, written apart from `cam_from_gradient` so the loop can check its passes.

    activations, gradients: N×D patch tokens → h×w. pytorch_grad_cam's order (docs/algorithm.md §4 steps 3–4):
    D×h×w maps, weights = spatial mean of the gradient, weighted channel sum, ReLU, `scale_cam_image`
    (compute_cam_per_layer); then stack the layers, max(·, 0), mean over layers, `scale_cam_image` again
    (aggregate_multi_layers).
    """
    maps = activations.float().T.reshape(-1, *grid)
    weights = gradients.float().T.reshape(-1, *grid).mean(dim=(1, 2))
    per_layer = torch.relu((weights[:, None, None] * maps).sum(dim=0))
    per_layer = per_layer - per_layer.min()
    per_layer = per_layer / (per_layer.max() + 1e-7)
    layers = per_layer[None].clamp(min=0).mean(dim=0)
    layers = layers - layers.min()
    return layers / (layers.max() + 1e-7)


def _check_request(backbone: CLIPBackbone, images: torch.Tensor, labels: Sequence[Sequence[int]],
                   text: TextEmbeddings, feature_layers: Sequence[int], attn_layers: Sequence[int],
                   k_max: int | None) -> int:
    """Validate the inputs; returns the number of CAM slots K_max."""
    if len(labels) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(labels)} label lists")
    num_classes = text.fg.shape[0]
    for index, image_labels in enumerate(labels):
        ids = list(image_labels)
        if not ids or ids != sorted(set(ids)) or ids[0] < 0 or ids[-1] >= num_classes:
            raise ValueError(f"labels of image {index} must be ascending distinct class ids in [0, {num_classes}) "
                             f"with at least one; got {ids}")
    for layer in (*feature_layers, *attn_layers):
        if not 1 <= layer <= backbone.num_blocks:
            raise ValueError(f"layers are 1-based blocks 1..{backbone.num_blocks}; got {layer}")
    most = max(len(image_labels) for image_labels in labels)
    if k_max is not None and k_max < most:
        raise ValueError(f"an image has {most} classes but k_max is {k_max}; raise k_max")
    return most if k_max is None else k_max


def _patch_stack(maps: Sequence[torch.Tensor], patch_dims: int) -> torch.Tensor:
    """Stack per-layer B×(1+N)×… maps on dim 1, dropping the CLS entry of the first `patch_dims` token axes."""
    index = (slice(None),) + (slice(1, None),) * patch_dims
    return torch.stack([m.detach()[index] for m in maps], dim=1)


def _assemble(backbone: CLIPBackbone, frozen: FrozenFeatures, tokens_out: torch.Tensor, attn_out: torch.Tensor,
              feature_layers: Sequence[int], attn_layers: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """features B×F×N×D and attn B×A×N×N of the requested blocks; block n comes from the last-block pass."""
    last = backbone.num_blocks
    tokens = dict(zip(frozen.token_layers, frozen.tokens)) | {last: tokens_out}
    attn = dict(zip(frozen.attn_layers, frozen.attn)) | {last: attn_out}
    batch, length, width = tokens_out.shape
    features = (_patch_stack([tokens[i] for i in feature_layers], 1) if feature_layers
                else tokens_out.new_zeros(batch, 0, length - 1, width))
    maps = (_patch_stack([attn[i] for i in attn_layers], 2) if attn_layers
            else attn_out.new_zeros(batch, 0, length - 1, length - 1))
    return features, maps


def _frozen_request(backbone: CLIPBackbone, images: torch.Tensor, feature_layers: Sequence[int],
                    attn_layers: Sequence[int]) -> FrozenFeatures:
    """forward_frozen keeping only the requested blocks below n."""
    n = backbone.num_blocks
    return backbone.forward_frozen(images, token_layers=sorted({i for i in feature_layers if i < n}),
                                   attn_layers=sorted({i for i in attn_layers if i < n}))


def _padded_text_sets(text: TextEmbeddings, labels: Sequence[Sequence[int]], k_max: int, device: torch.device
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image text sets (docs/algorithm.md §3.3) padded to K_max fg slots: B×(K_max+M)×E and a validity mask.

    Slot j < K_b holds image b's j-th present class, slots K_max.. the M background prompts; padded fg slots are
    masked out of the softmax, so each row's softmax is the one over its own K_b + M entries.
    """
    num_bg = text.bg.shape[0]
    sets = text.fg.new_zeros(len(labels), k_max + num_bg, text.fg.shape[1])
    valid = torch.zeros(len(labels), k_max + num_bg, dtype=torch.bool)
    for b, image_labels in enumerate(labels):
        own = text.per_image(list(image_labels))
        count = len(image_labels)
        sets[b, :count], sets[b, k_max:] = own[:count], own[count:]
        valid[b, :count], valid[b, k_max:] = True, True
    return sets.to(device), valid.to(device)


def _slot_classes(labels: Sequence[Sequence[int]], k_max: int, device: torch.device) -> torch.Tensor:
    """B×K_max int64: the class id of each CAM slot, −1 where the image has fewer classes."""
    slots = torch.full((len(labels), k_max), -1, dtype=torch.int64)
    for b, image_labels in enumerate(labels):
        slots[b, :len(image_labels)] = torch.as_tensor(list(image_labels), dtype=torch.int64)
    return slots.to(device)


def softmax_gradcam(backbone: CLIPBackbone, images: torch.Tensor, labels: Sequence[Sequence[int]],
                    text: TextEmbeddings, feature_layers: Sequence[int], attn_layers: Sequence[int],
                    k_max: int | None = None, frozen: FrozenFeatures | None = None) -> CamBatch:
    """Batched Softmax-Grad-CAM of normalised images B×3×H×W.

    labels: per image, ascending 0-based fg class ids (at least one). feature_layers / attn_layers: 1-based blocks
    to return (block n allowed). k_max: CAM slots per image (default: the largest label count in the batch).
    Target of slot j: softmax over [present classes + all background prompts] of logit_scale·cos
    (docs/algorithm.md §3.2 step 6, §4); CAM layer: ln_1 output of the last block (§4 step 1).
    frozen: `backbone.forward_frozen(images, ...)` computed by the caller, holding at least the requested blocks
    below n, to share blocks 1..n-1 between calls with other text sets (`weclip prompts` scores many templates).
    """
    slots = _check_request(backbone, images, labels, text, feature_layers, attn_layers, k_max)
    if frozen is None:
        frozen = _frozen_request(backbone, images, feature_layers, attn_layers)
    u, tokens_out, attn_out = backbone.last_block(frozen.last)
    features, attn = _assemble(backbone, frozen, tokens_out, attn_out, feature_layers, attn_layers)
    grid = frozen.grid
    del frozen  # frees the full B×(1+N)×D block outputs: `features` / `attn` hold copies of what was asked
    sets, valid = _padded_text_sets(text, labels, slots, u.device)
    with torch.enable_grad():
        image_emb = backbone.pooled_embedding(tokens_out)
        logits = backbone.logit_scale * torch.einsum("be,bte->bt", image_emb, sets)
        probs = logits.masked_fill(~valid, float("-inf")).softmax(dim=-1)
    cams = torch.zeros(len(labels), slots, *grid, device=u.device)
    used = max(len(image_labels) for image_labels in labels)
    slot = torch.arange(used, device=u.device)
    cotangents = torch.zeros(used, *probs.shape, device=u.device, dtype=probs.dtype)
    cotangents[slot, :, slot] = valid[:, :used].T.to(probs.dtype)  # [j, b, j] = 1 where image b has a slot j
    (grads,) = torch.autograd.grad(probs, u, cotangents, is_grads_batched=True)  # used × B × (1+N) × D
    patches = u.detach()[:, 1:]
    for j in range(used):
        has = valid[:, j]
        cams[has, j] = cam_from_gradient(patches[has], grads[j, has, 1:], grid)
    return CamBatch(features=features, attn=attn, cams=cams, cam_classes=_slot_classes(labels, slots, u.device),
                    grid=grid)


def softmax_gradcam_loop(backbone: CLIPBackbone, images: torch.Tensor, labels: Sequence[Sequence[int]],
                         text: TextEmbeddings, feature_layers: Sequence[int], attn_layers: Sequence[int],
                         k_max: int | None = None, full_pass: bool = False) -> CamBatch:
    """Reference: the released code's way (docs/algorithm.md §4). Per image, the frozen blocks once; per present class,
    a separate forward of the last block and a backward, reading ∂s_c/∂U from the leaf's `.grad` as the hook does,
    and the CAM of `_released_cam`, which shares no code with the fast path's. The last block's attention is taken
    from the first class's call (§4 step 6). Same outputs as `softmax_gradcam`.
    full_pass=True re-runs the frozen blocks for every (image, class) too: the naive one-full-pass-per-target
    Grad-CAM (e.g. pytorch-grad-cam on the whole encoder), the other baseline of `benchmarks/cam_throughput.py`.
    """
    slots = _check_request(backbone, images, labels, text, feature_layers, attn_layers, k_max)
    grid = backbone.grid(images)
    cams = torch.zeros(len(labels), slots, *grid, device=backbone.device)
    features, attn = [], []
    for b, image_labels in enumerate(labels):
        frozen = _frozen_request(backbone, images[b:b + 1], feature_layers, attn_layers)
        text_set = text.per_image(list(image_labels)).to(backbone.device)
        for j in range(len(image_labels)):
            if full_pass and j > 0:
                frozen = _frozen_request(backbone, images[b:b + 1], feature_layers, attn_layers)
            u, tokens_out, attn_out = backbone.last_block(frozen.last)
            with torch.enable_grad():
                probs = (backbone.logit_scale * backbone.pooled_embedding(tokens_out) @ text_set.T).softmax(dim=-1)
                probs[0, j].backward()
            cams[b, j] = _released_cam(u.detach()[0, 1:], u.grad[0, 1:], grid)
            if j == 0:
                image_features, image_attn = _assemble(backbone, frozen, tokens_out, attn_out,
                                                       feature_layers, attn_layers)
        features.append(image_features)
        attn.append(image_attn)
    return CamBatch(features=torch.cat(features), attn=torch.cat(attn), cams=cams,
                    cam_classes=_slot_classes(labels, slots, backbone.device), grid=grid)
