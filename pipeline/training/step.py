"""One optimisation step of WeCLIP's decoder (docs/algorithm.md §7.2), the same for cached and online data:

    decoder(features) -> logits P, affinity A_f
    M_p = online_pseudo_label(cams, attn, A_f, image)              (static CAA before `rfm_start_iter`, then RFM)
    loss = L_seg(P↑, M_p) + λ·L_aff(A_f, Â(M_p))                   (pipeline/training/losses.py)
    AdamW step + poly warm-up                                       (pipeline/training/optim.py; only the decoder learns)

On several processes (`world`, pipeline/training/distributed.py) the batch is this rank's rows of the global batch,
the losses are its shares of the global batch's losses, and the returned metrics are those of the global batch.
With `train.supervised` (docs/algorithm.md §8.2) the label is the batch's GT mask crop instead of M_p and the loss
is plain CE alone (`supervised_loss`): no CAMs, RFM, PAR or affinity loss.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from weclip.pipeline.config import IGNORE_INDEX, Config
from weclip.pipeline.errors import TrainError
from weclip.pipeline.model.decoder import WeCLIPDecoder
from weclip.pipeline.refinement.par import PAR
from weclip.pipeline.refinement.pseudo_label import online_pseudo_label, rfm_active
from weclip.pipeline.training.distributed import World
from weclip.pipeline.training.losses import supervised_loss, total_loss
from weclip.pipeline.training.optim import PolyWarmup
from weclip.pipeline.training.sources import StepBatch


def train_step(decoder: WeCLIPDecoder | torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: PolyWarmup,
               par: PAR, batch: StepBatch, step: int, cfg: Config, world: World = World()) -> dict[str, Any]:
    """One optimisation step (docs/algorithm.md §7.2) on a batch; returns the step's metrics (no timing).
    `decoder` is the decoder, or on several processes the DDP module around it (`World.wrap`)."""
    decoder.train()
    lr = optimizer.param_groups[0]["lr"]
    out = decoder(batch.features, batch.grid)
    if cfg.train.supervised:
        if batch.mask is None:
            raise TrainError("train.supervised needs the batch's GT mask crops (a cache extracted with "
                             "extract.store_masks)")
        use_rfm, labels = False, batch.mask
        losses = supervised_loss(out.logits, labels, count=world.sum)
    else:
        use_rfm = rfm_active(step, cfg.refine)
        labels = online_pseudo_label(batch.cams, batch.cam_classes, batch.attn, out.affinity, batch.image,
                                     use_rfm=use_rfm, refine=cfg.refine, par=par)
        losses = total_loss(out.logits, out.affinity, labels, cfg.loss, count=world.sum)
    optimizer.zero_grad(set_to_none=True)
    (losses["loss"] * world.size).backward()  # DDP averages the ranks' gradients: this makes it their sum
    optimizer.step()
    scheduler.step()
    values = dict(zip(losses, world.sum(torch.stack([v.detach() for v in losses.values()])).tolist()))
    if not np.isfinite(values["loss"]):
        raise FloatingPointError(f"non-finite loss {values} at step {step}; the last checkpoint is the one to resume")
    fractions = world.sum(torch.stack([((labels > 0) & (labels != IGNORE_INDEX)).float().mean(),
                                     1 - batch.valid.float().mean()])) / world.size
    # ignored pixels left out, so every rank's count has the same length (one per decoder output) for the sum
    present = world.sum(torch.bincount(labels[labels != IGNORE_INDEX], minlength=out.logits.shape[1]))
    return {"step": step, **values, "lr": lr, "rfm": use_rfm,
            "fg_fraction": float(fractions[0]), "pad_fraction": float(fractions[1]),
            "classes": [v - 1 for v in present.nonzero().flatten().tolist() if v > 0]}
