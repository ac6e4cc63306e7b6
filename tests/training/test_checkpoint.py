"""pipeline/training/checkpoint.py: round trip, atomic writes, readable errors."""
from __future__ import annotations

import pytest
import torch

from weclip.pipeline.model.text import dataset_class_set
from weclip.pipeline.training.checkpoint import CheckpointError, build_decoder_from_checkpoint, load_checkpoint, save_checkpoint
from weclip.pipeline.config import preset
from weclip.pipeline.model.decoder import WeCLIPDecoder
from weclip.pipeline.training.optim import PolyWarmup, build_optimizer

CFG = preset("coco").replace(decoder={"embed_dim": 16, "layers": 1, "heads": 2, "mlp_dim": 32},
                             train={"iterations": 10})
FINGERPRINT = {"model": "m", "digest": "abc"}


def _trained(seed: int = 0):
    torch.manual_seed(seed)
    decoder = WeCLIPDecoder(in_layers=2, in_dim=8, num_classes=5, cfg=CFG.decoder)
    optimizer = build_optimizer(decoder.parameters(), CFG.train)
    scheduler = PolyWarmup(optimizer, CFG.train)
    features = torch.randn(2, 2, 6, 8)
    for _ in range(2):
        out = decoder(features, (2, 3))
        (out.logits.square().mean() + out.affinity.mean()).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return decoder, optimizer, scheduler, features


RNG_STATE = torch.Generator().manual_seed(3).get_state()
CLASSES = dataset_class_set(("a", "b", "c", "d"), None)


def _save(path, decoder, optimizer, scheduler, step=2):
    return save_checkpoint(path, decoder=decoder, optimizer=optimizer, scheduler=scheduler, step=step, config=CFG,
                           fingerprint=FINGERPRINT, classes=CLASSES, rng_state={"torch": RNG_STATE})


def test_round_trip_rebuilds_decoder_optimizer_and_schedule(tmp_path):
    decoder, optimizer, scheduler, features = _trained()
    path = _save(tmp_path / "run" / "checkpoint.pt", decoder, optimizer, scheduler)
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temp file left behind
    ckpt = load_checkpoint(path)
    assert ckpt.step == 2 and ckpt.config == CFG and ckpt.fingerprint == FINGERPRINT
    assert ckpt.class_names == ("a", "b", "c", "d") and ckpt.decoder_args == {"in_layers": 2, "in_dim": 8,
                                                                              "num_classes": 5}
    rebuilt = build_decoder_from_checkpoint(ckpt)
    assert not rebuilt.training
    decoder.eval()
    torch.testing.assert_close(rebuilt(features, (2, 3)).logits, decoder(features, (2, 3)).logits, rtol=0, atol=0)
    assert torch.equal(ckpt.rng_state["torch"], RNG_STATE)

    fresh, fresh_opt, fresh_sched, _ = _trained(seed=1)
    fresh_opt.load_state_dict(ckpt.optimizer_state)
    fresh_sched.load_state_dict(ckpt.scheduler_state)
    assert fresh_sched.last_step == scheduler.last_step and fresh_sched.get_last_lr() == scheduler.get_last_lr()
    for a, b in zip(fresh_opt.state.values(), optimizer.state.values()):
        torch.testing.assert_close(a["exp_avg"], b["exp_avg"], rtol=0, atol=0)


def test_overwrite_replaces_the_file(tmp_path):
    decoder, optimizer, scheduler, _ = _trained()
    path = _save(tmp_path / "c.pt", decoder, optimizer, scheduler, step=2)
    _save(path, decoder, optimizer, scheduler, step=7)
    assert load_checkpoint(path).step == 7
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_missing_corrupt_and_foreign_files_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pt does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    decoder, optimizer, scheduler, _ = _trained()
    good = _save(tmp_path / "good.pt", decoder, optimizer, scheduler).read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pt"):
        load_checkpoint(truncated)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.pt"):
        load_checkpoint(text)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": decoder.state_dict()}, foreign)
    with pytest.raises(CheckpointError, match=r"foreign\.pt is not a weclip training checkpoint"):
        load_checkpoint(foreign)
    future = tmp_path / "future.pt"
    data = torch.load(tmp_path / "good.pt", weights_only=True)
    torch.save({**data, "version": 99}, future)
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(future)
