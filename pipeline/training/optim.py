"""AdamW with the released poly warm-up schedule (`PolyWarmupAdamW`, docs/algorithm.md §7.3).

Schedule by global step s (from 0; the lr for the s-th optimizer step):
    s < warmup_iters:  lr0·(1 − (1 − s/warmup_iters)(1 − warmup_ratio))     linear warm-up from ≈ warmup_ratio·lr0
    otherwise:         lr0·(1 − s/iterations)^poly_power
The released optimizer stops updating the lr at s ≥ max_iter, so the lr keeps its value at iterations − 1;
`lr_factor` does the same. Weight decay applies to every parameter, biases and LayerNorms included.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from weclip.pipeline.config import TrainConfig


def build_optimizer(params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW(lr, betas, eps, weight_decay) from `cfg` (code: lr 2e-3 = 2e-4×10, wd 0.01; paper wd 1e-3)."""
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the base lr at global step `step` (see the module docstring)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < cfg.warmup_iters:
        return 1.0 - (1.0 - step / cfg.warmup_iters) * (1.0 - cfg.warmup_ratio)
    step = min(step, cfg.iterations - 1)
    return (1.0 - step / cfg.iterations) ** cfg.poly_power


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of a group whose base lr is `cfg.lr` at global step `step`."""
    return cfg.lr * lr_factor(step, cfg)


class PolyWarmup:
    """Sets every param group's lr to base_lr·lr_factor(step).

    Build it right after the optimizer (it sets the lr of step 0), call `step()` after each
    `optimizer.step()`. `state_dict`/`load_state_dict` carry the step and base lrs, so a resumed run
    continues with exactly the lr it would have had.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
        self.optimizer = optimizer
        self.cfg = cfg
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.last_step = 0
        self._apply()

    def _apply(self) -> None:
        factor = lr_factor(self.last_step, self.cfg)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [float(group["lr"]) for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["base_lrs"]) != len(self.optimizer.param_groups):
            raise ValueError(f"scheduler state has {len(state['base_lrs'])} param groups, the optimizer has "
                             f"{len(self.optimizer.param_groups)}; resume with the same model and optimizer layout")
        self.last_step = int(state["last_step"])
        self.base_lrs = [float(v) for v in state["base_lrs"]]
        self._apply()
