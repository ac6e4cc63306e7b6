"""Optimiser and poly warm-up schedule (docs/algorithm.md §7.3)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from weclip.pipeline.config import TrainConfig
from weclip.pipeline.training.optim import PolyWarmup, build_optimizer, lr_at

VOC = TrainConfig()  # lr 2e-3, 50 warm-up iterations, 30k iterations, power 1


@pytest.mark.parametrize("step, expected", [
    (0, 2e-3 * 1e-6),                              # 1 − (1 − 0)(1 − 1e-6)
    (49, 2e-3 * (1 - (1 - 49 / 50) * (1 - 1e-6))),
    (50, 2e-3 * (1 - 50 / 30000)),
    (29999, 2e-3 / 30000),
    (30000, 2e-3 / 30000),                         # released code leaves the lr unchanged past max_iter
])
def test_lr_schedule_values(step: int, expected: float) -> None:
    assert lr_at(step, VOC) == pytest.approx(expected, rel=1e-9, abs=0)


def test_lr_schedule_power_and_negative_step() -> None:
    cfg = TrainConfig(lr=1.0, warmup_iters=0, iterations=10, poly_power=0.9)
    assert lr_at(5, cfg) == pytest.approx(0.5 ** 0.9)
    with pytest.raises(ValueError):
        lr_at(-1, cfg)


def test_build_optimizer_settings() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    opt = build_optimizer(model.parameters(), VOC)
    assert isinstance(opt, torch.optim.AdamW)
    (group,) = opt.param_groups
    assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8
    assert group["weight_decay"] == 0.01 and group["lr"] == 2e-3
    assert len(group["params"]) == 4  # biases and LayerNorm included


def test_scheduler_scales_every_group_from_its_own_base() -> None:
    cfg = TrainConfig(lr=1e-2, warmup_iters=3, iterations=10)
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = build_optimizer([{"params": [a], "lr": 1e-3}, {"params": [b]}], cfg)
    sched = PolyWarmup(opt, cfg)
    for step in range(12):
        lrs = sched.get_last_lr()
        assert lrs[1] == pytest.approx(lr_at(step, cfg), rel=1e-9, abs=0)
        assert lrs[0] == pytest.approx(0.1 * lr_at(step, cfg), rel=1e-9, abs=0)
        opt.step()
        sched.step()


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, sched: PolyWarmup, start: int, n: int) -> None:
    for step in range(start, start + n):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(8, 4, generator=g)
        loss = (model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_resume_continues_exactly() -> None:
    cfg = TrainConfig(lr=5e-2, warmup_iters=3, iterations=12)
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = build_optimizer(model.parameters(), cfg)
    sched = PolyWarmup(opt, cfg)
    train_steps(model, opt, sched, 0, 5)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    train_steps(model, opt, sched, 5, 6)

    torch.manual_seed(123)  # a fresh run: different init, schedule at step 0
    resumed = nn.Linear(4, 1)
    opt2 = build_optimizer(resumed.parameters(), cfg)
    sched2 = PolyWarmup(opt2, cfg)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert sched2.get_last_lr() == pytest.approx([lr_at(5, cfg)], rel=1e-9, abs=0)
    train_steps(resumed, opt2, sched2, 5, 6)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert sched2.state_dict() == sched.state_dict()


def test_load_state_rejects_other_group_layout() -> None:
    opt = build_optimizer([nn.Parameter(torch.zeros(1))], VOC)
    sched = PolyWarmup(opt, VOC)
    with pytest.raises(ValueError, match="param groups"):
        sched.load_state_dict({"last_step": 3, "base_lrs": [1e-3, 1e-2]})
