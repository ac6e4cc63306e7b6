"""pipeline/training/distributed.py: each rank's rows, the global-batch dropout, loss shares over 2 gloo processes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from weclip.pipeline.config import LossConfig
from weclip.pipeline.errors import TrainError
from weclip.pipeline.training import distributed, schedule
from weclip.pipeline.training.distributed import GlobalBatchDropout2d, World, session, spawn
from weclip.pipeline.training.losses import total_loss

MODES = [("balanced", "linear"), ("balanced", "bce"), ("plain", "linear"), ("plain", "bce")]


def test_rank_rows_split_the_batch_in_rank_order():
    parts = [schedule.rank_rows(6, rank, 3) for rank in range(3)]
    assert np.concatenate([np.arange(6)[p] for p in parts]).tolist() == list(range(6))
    assert World(0, 1).rows(4) == slice(0, 4)
    with pytest.raises(TrainError, match=r"train.batch_size = 4 cannot be split over 3 processes"):
        World(1, 3).rows(4)


def test_global_batch_dropout_uses_the_rows_of_the_one_process_mask():
    x = torch.randn(4, 8, 3, 3)
    torch.manual_seed(3)
    whole = F.dropout2d(x, 0.3, True)
    after = torch.get_rng_state()
    assert (whole == 0).any() and (whole != 0).any()
    for rows in (slice(0, 2), slice(2, 4)):
        torch.manual_seed(3)
        assert torch.equal(GlobalBatchDropout2d(0.3, rows, 4).train()(x[rows]), whole[rows])
        assert torch.equal(torch.get_rng_state(), after)  # every rank's generator moves as the one process's
    assert torch.equal(GlobalBatchDropout2d(0.3, slice(0, 2), 4).eval()(x[:2]), x[:2])


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits 4×3×4×4, affinity 4×16×16 and labels 4×64×64 whose two halves have very different class counts."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 3, 4, 4, generator=g)
    affinity = torch.rand(4, 16, 16, generator=g)
    labels = torch.randint(0, 3, (4, 64, 64), generator=g)
    labels[:2, :48] = 0  # the first half is mostly background
    return logits, affinity, labels


def _rank_shares(seed: int) -> dict:
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


def test_loss_shares_of_two_processes_add_up_to_the_whole_batch_loss():
    shares = spawn(2, _rank_shares, (0,))
    logits, affinity, labels = batch(0)
    for seg, aff in MODES:
        lg, af = logits.clone().requires_grad_(), affinity.clone().requires_grad_()
        whole = total_loss(lg, af, labels, LossConfig(seg=seg, aff=aff))
        whole["loss"].backward()
        values, grad_logits, grad_aff = shares[seg, aff]
        for key in ("loss", "seg", "aff"):
            assert values[key] == pytest.approx(float(whole[key].detach()), abs=1e-6), (seg, aff, key)
        torch.testing.assert_close(grad_logits, lg.grad, rtol=0, atol=1e-7)
        torch.testing.assert_close(grad_aff, af.grad, rtol=0, atol=1e-7)
        # the mean of per-rank means, what plain DDP would optimise, is another number: the test can fail
        halves = [total_loss(logits[r], affinity[r], labels[r], LossConfig(seg=seg, aff=aff))["loss"]
                  for r in (slice(0, 2), slice(2, 4))]
        if seg == "balanced":
            assert abs(float(sum(halves)) / 2 - float(whole["loss"].detach())) > 1e-3


def test_session_joins_torchruns_group_and_leaves_it(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: calls.append(("destroy",)))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 3)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with session(torch.device("cpu")) as world:
        assert world == World(rank=3, size=4, local_rank=1) and not world.main
        assert calls == [("init", "gloo")]
    assert calls[-1] == ("destroy",)
    with session(torch.device("cuda")):
        assert calls[-1] == ("init", "nccl")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with session(torch.device("cpu")) as world:
        assert world == World() and world.main
    assert len(calls) == 4


def _fails(kind: str) -> None:
    if kind == "user" and torch.distributed.get_rank() == 1:
        raise TrainError("rank 1 cannot go on")
    if kind == "bug":
        raise RuntimeError("a bug")


def test_spawn_raises_a_ranks_user_error_as_it_is():
    with pytest.raises(TrainError, match="rank 1 cannot go on"):
        spawn(2, _fails, ("user",))
    with pytest.raises(torch.multiprocessing.ProcessRaisedException, match="a bug"):
        spawn(2, _fails, ("bug",))
