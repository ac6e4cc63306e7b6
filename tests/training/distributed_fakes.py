"""What the tests of pipeline/training/distributed.py run in spawned processes. Spawned ranks import a function by its
module's name, which must be importable there: pytest names test modules after the folders holding them (the clone's
folder is the `weclip` package), so these live in a module the tests import by its plain name."""
from __future__ import annotations

import torch

from weclip.pipeline.config import LossConfig
from weclip.pipeline.errors import TrainError
from weclip.pipeline.training.distributed import session
from weclip.pipeline.training.losses import total_loss

MODES = [("balanced", "linear"), ("balanced", "bce"), ("plain", "linear"), ("plain", "bce")]


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits 4×3×4×4, affinity 4×16×16 and labels 4×64×64 whose two halves have very different class counts."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 3, 4, 4, generator=g)
    affinity = torch.rand(4, 16, 16, generator=g)
    labels = torch.randint(0, 3, (4, 64, 64), generator=g)
    labels[:2, :48] = 0  # the first half is mostly background
    return logits, affinity, labels


def rank_shares(seed: int) -> dict:
    """In each of the ranks: this rank's loss shares, summed over the ranks, and the gradient of the shares with
    respect to the whole batch's inputs (each rank's rows filled by that rank)."""
    logits, affinity, labels = batch(seed)
    with session(torch.device("cpu")) as world:
        rows = world.rows(len(labels))
        out = {}
        for seg, aff in MODES:
            lg, af = logits[rows].clone().requires_grad_(), affinity[rows].clone().requires_grad_()
            losses = total_loss(lg, af, labels[rows], LossConfig(seg=seg, aff=aff), count=world.sum)
            losses["loss"].backward()
            grads = [torch.zeros_like(logits), torch.zeros_like(affinity)]
            grads[0][rows], grads[1][rows] = lg.grad, af.grad
            out[seg, aff] = ({k: float(world.sum(v.detach())) for k, v in losses.items()},
                             world.sum(grads[0]), world.sum(grads[1]))
        return out


def fails(kind: str) -> None:
    if kind == "user" and torch.distributed.get_rank() == 1:
        raise TrainError("rank 1 cannot go on")
    if kind == "bug":
        raise RuntimeError("a bug")
