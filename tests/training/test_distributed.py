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

from tests.training.distributed_fakes import MODES, batch, fails, rank_shares


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


def test_loss_shares_of_two_processes_add_up_to_the_whole_batch_loss():
    shares = spawn(2, rank_shares, (0,))
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


def test_spawn_raises_a_ranks_user_error_as_it_is():
    with pytest.raises(TrainError, match="rank 1 cannot go on"):
        spawn(2, fails, ("user",))
    with pytest.raises(torch.multiprocessing.ProcessRaisedException, match="a bug"):
        spawn(2, fails, ("bug",))
