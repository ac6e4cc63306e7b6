"""What the rest of weclip needs from a frozen backbone, as protocols, so that a second family is one new module.

`Backbone` is the image side every consumer uses (extract, the decoder's inputs, inference): the patch geometry, the
identity that fingerprints a cache, and the no-grad forward of blocks 1..n-1. `CLIPBackbone` adds what
Softmax-Grad-CAM needs on top: the last block with grad, the pooled image embedding and the text tower. A
DINO-style backbone would implement `Backbone` only and feed the decoder, with CAMs from a CLIP model beside it.
`pipeline.model.backbone.FrozenCLIP` implements both.
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch

from weclip.pipeline.model.backbone import FrozenFeatures


@runtime_checkable
class Backbone(Protocol):
    name: str
    identity: str  # fingerprints a cache: the checkpoint's sha256, or a digest of random weights
    patch_size: int
    width: int  # token dimension D of the stored features
    num_blocks: int

    @property
    def device(self) -> torch.device: ...

    def grid(self, images: torch.Tensor) -> tuple[int, int]:
        """Patch grid (H/p, W/p) of a B×3×H×W batch."""

    def forward_frozen(self, images: torch.Tensor, token_layers: Sequence[int] | None = None,
                       attn_layers: Sequence[int] | None = None) -> FrozenFeatures:
        """Blocks 1..n-1 without grad: the requested blocks' tokens and head-averaged attention maps."""


@runtime_checkable
class CLIPBackbone(Backbone, Protocol):
    embed_dim: int
    logit_scale: float

    def last_block(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block n with grad on the output of block n-1."""

    def pooled_embedding(self, tokens_out: torch.Tensor) -> torch.Tensor:
        """The image embedding the CAM scores, from the last block's tokens."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, texts: list[str]) -> torch.Tensor: ...
