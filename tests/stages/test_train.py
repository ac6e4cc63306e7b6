"""stages/train.py on a tiny world: shapes images → manifest → feature cache (tiny random ViT, extract inline)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY_CONFIG
from pipeline.cache.schema import CacheSpec
from pipeline.cache.store import CacheReader, CacheWriter, NotACache
from pipeline.training.checkpoint import build_decoder_from_checkpoint, load_checkpoint
from pipeline.config import Config, preset
from pipeline.data.shapes import generate
from pipeline.model.text import SHAPES_CLASSES
from pipeline.training import schedule, sources
from pipeline.training.step import train_step
from stages import extract, manifest, train

CROP, IMAGES = 64, 8


def tiny_config(**sections) -> Config:
    """Tiny ViT (3 blocks, patch 16), 64-px crops (4×4 grid), a small decoder, batch 2; RFM from step 2."""
    cfg = preset("shapes").replace(
        model={"name": "tiny-vit", "pretrained": None, "init_seed": 0},
        aug={"crop": CROP},
        extract={"views": 1, "samples_per_shard": 4, "feature_layers": [1, 2], "attn_layers": [1, 2, 3],
                 "dtype": "float32", "batch_size": 4},
        refine={"static_layers": 3, "rfm_layers": 2, "rfm_start_iter": 2},
        par={"num_iter": 3, "dilations": [1, 2, 4]},
        decoder={"embed_dim": 32, "layers": 1, "heads": 2, "mlp_dim": 64},
        train={"iterations": 40, "batch_size": 2, "checkpoint_every": 2, "loader_workers": 0, "warmup_iters": 2})
    return cfg.replace(**sections)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    generate(root / "data", "train", IMAGES, seed=5, size=CROP)
    manifest_path = manifest.run("shapes", root / "data", root / "m.parquet", progress=False).manifest_path
    cfg = tiny_config()
    extract.run(cfg, manifest_path, root / "cache", executor="inline", progress=False, model_configs=[TINY_CONFIG])
    return {"root": root, "manifest": manifest_path, "cache": root / "cache", "cfg": cfg}


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def trajectory(out: Path) -> list[tuple]:
    return [(m["step"], m["loss"], m["seg"], m["aff"], m["lr"], m["rfm"], m["classes"]) for m in metrics(out)]


@pytest.fixture(scope="module")
def uninterrupted(world):
    cfg = world["cfg"].replace(train={"train_flip": True})
    out = world["root"] / "full"
    summary = train.run(cfg, world["cache"], out, max_steps=6, progress=False)
    return {"cfg": cfg, "out": out, "summary": summary}


def test_cached_step_equals_online_step(world):
    cfg = world["cfg"].replace(decoder={"dropout": 0.0})
    cached = train.run(cfg, world["cache"], world["root"] / "cached1", max_steps=1, progress=False)
    online = train.run(cfg, None, world["root"] / "online1", online_manifest=world["manifest"], max_steps=1,
                       progress=False, model_configs=[TINY_CONFIG])
    assert cached.fingerprint == online.fingerprint  # the online run describes the same data as the 1-view cache
    (a,), (b,) = metrics(world["root"] / "cached1"), metrics(world["root"] / "online1")
    for key in ("loss", "seg", "aff"):
        assert a[key] == pytest.approx(b[key], abs=1e-4), key
    assert a["classes"] == b["classes"] and a["fg_fraction"] == pytest.approx(b["fg_fraction"], abs=1e-3)
    assert a["loss"] > 0 and a["fg_fraction"] > 0


def test_kill_and_resume_gives_the_uninterrupted_curve(world, uninterrupted):
    cfg, out = uninterrupted["cfg"], world["root"] / "killed"
    train.run(cfg, world["cache"], out, max_steps=3, progress=False)
    # a kill after step 3 was logged but before its checkpoint: the latest checkpoint is the one of step 2
    shutil.copyfile(out / "step_000002.pt", out / "checkpoint.pt")
    summary = train.run(cfg.replace(train={"loader_workers": 1}), world["cache"], out, resume=True, max_steps=6,
                        progress=False)
    assert summary.start_step == 2 and summary.final_step == 6 and summary.steps_run == 4
    full = trajectory(uninterrupted["out"])
    assert [t[0] for t in full] == list(range(6))
    assert trajectory(out) == full  # exact: same batches, flips, dropout masks and losses
    a = build_decoder_from_checkpoint(load_checkpoint(out / "checkpoint.pt"))
    b = build_decoder_from_checkpoint(load_checkpoint(uninterrupted["out"] / "checkpoint.pt"))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_rfm_switches_on_at_rfm_start_iter(uninterrupted):
    flags = [m["rfm"] for m in metrics(uninterrupted["out"])]
    start = uninterrupted["cfg"].refine.rfm_start_iter
    assert flags == [step >= start for step in range(len(flags))]
    assert uninterrupted["summary"].rfm_on


def test_checkpoints_and_metrics_are_written(uninterrupted):
    out = uninterrupted["out"]
    assert sorted(p.name for p in out.glob("step_*.pt")) == ["step_000002.pt", "step_000004.pt", "step_000006.pt"]
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt.step == 6 and ckpt.class_names == SHAPES_CLASSES
    assert len(ckpt.class_names) + 1 == ckpt.decoder_args["num_classes"]
    m = metrics(out)
    keys = {"loss", "seg", "aff", "lr", "fg_fraction", "pad_fraction", "classes", "s_per_step", "data_s", "rfm", "epoch"}
    assert keys <= set(m[0])
    assert [x["epoch"] for x in m] == [0, 0, 0, 0, 1, 1]  # 8 samples, batch 2
    assert m[0]["lr"] < m[2]["lr"]  # warm-up


def test_train_views_of_a_bigger_cache_give_the_smaller_cache_run(world, tmp_path):
    """train.views = 1 on a 2-view cache trains on exactly the samples and batches of the 1-view cache."""
    two = world["cfg"].replace(extract={"views": 2})
    extract.run(two, world["manifest"], tmp_path / "cache2", executor="inline", progress=False,
                model_configs=[TINY_CONFIG])
    train.run(two.replace(train={"views": 1}), tmp_path / "cache2", tmp_path / "first-view", max_steps=5,
              progress=False)
    train.run(world["cfg"], world["cache"], tmp_path / "one-view", max_steps=5, progress=False)
    assert trajectory(tmp_path / "first-view") == trajectory(tmp_path / "one-view")
    train.run(two, tmp_path / "cache2", tmp_path / "both-views", max_steps=5, progress=False)
    assert [m["epoch"] for m in metrics(tmp_path / "both-views")] == [0] * 5  # 16 samples: 8 steps per epoch
    assert trajectory(tmp_path / "both-views") != trajectory(tmp_path / "one-view")
    with pytest.raises(train.TrainError, match=r"train.views = 3.*holds 2 views"):
        train.run(two.replace(train={"views": 3}), tmp_path / "cache2", tmp_path / "too-many", progress=False)
    with pytest.raises(train.TrainError, match="online training draws a fresh view"):
        train.run(two.replace(train={"views": 1}), None, tmp_path / "online", online_manifest=world["manifest"],
                  progress=False, model_configs=[TINY_CONFIG])


def test_refuses_bad_cache_path(world, tmp_path):
    with pytest.raises(NotACache, match="no-such-cache"):
        train.run(world["cfg"], tmp_path / "no-such-cache", tmp_path / "out", progress=False)


def test_refuses_empty_cache(world, tmp_path):
    spec = CacheSpec(total_samples=4, samples_per_shard=4, feature_layers=2, attn_layers=3, grid=(4, 4), dim=64,
                     k_max=3, crop=CROP, dtype="float32", compressor="none")
    fingerprint = CacheReader(world["cache"]).fingerprint  # a valid fingerprint; no shard is ever written
    CacheWriter.create_or_open(tmp_path / "empty", spec, fingerprint).finalize()
    with pytest.raises(train.TrainError, match="no committed samples"):
        train.run(world["cfg"], tmp_path / "empty", tmp_path / "out", progress=False)


def test_resume_refuses_another_cache_and_other_settings(world, tmp_path):
    out = tmp_path / "run"
    train.run(world["cfg"], world["cache"], out, max_steps=1, progress=False)
    other_cfg = world["cfg"].replace(extract={"seed": 2})
    extract.run(other_cfg, world["manifest"], tmp_path / "other", executor="inline", progress=False,
                model_configs=[TINY_CONFIG])
    with pytest.raises(train.TrainError, match=r"other data.*seed"):
        train.run(other_cfg, tmp_path / "other", out, resume=True, max_steps=2, progress=False)
    with pytest.raises(train.TrainError, match=r"loss.aff_weight"):
        train.run(world["cfg"].replace(loss={"aff_weight": 0.5}), world["cache"], out, resume=True, max_steps=2,
                  progress=False)
    with pytest.raises(train.TrainError, match="already holds a training run"):
        train.run(world["cfg"], world["cache"], out, max_steps=2, progress=False)


def test_hflip_sample_matches_flipping_the_grid():
    rng = np.random.default_rng(0)
    h, w, d = 3, 4, 5
    tokens = rng.normal(size=(2, h, w, d))  # L × h × w × D
    feats = tokens.reshape(2, h * w, d)
    attn = np.einsum("lnd,lmd->lnm", feats, feats)  # a function of the two tokens' contents
    sample = {"features": feats, "attn": attn, "cams": rng.random((3, h, w)),
              "image": rng.random((3, 16 * h, 16 * w)), "valid": rng.random((16 * h, 16 * w)) > 0.5,
              "cam_classes": np.array([1, 2, -1])}
    flipped = schedule.hflip_sample(sample, (h, w))
    mirrored = tokens[:, :, ::-1].reshape(2, h * w, d)
    np.testing.assert_array_equal(flipped["features"], mirrored)
    np.testing.assert_allclose(flipped["attn"], np.einsum("lnd,lmd->lnm", mirrored, mirrored))
    for name in ("cams", "image", "valid"):
        np.testing.assert_array_equal(flipped[name], sample[name][..., ::-1])
    np.testing.assert_array_equal(flipped["cam_classes"], sample["cam_classes"])
    again = schedule.hflip_sample(flipped, (h, w))
    for name in sample:
        np.testing.assert_array_equal(again[name], sample[name])


def test_data_order_is_a_function_of_seed_and_epoch():
    n, batch = 10, 3  # 3 steps per epoch, one sample dropped each epoch
    epochs = {}
    for step in range(6):
        epoch, positions = schedule.batch_positions(step, n, batch, seed=7)
        epochs.setdefault(epoch, []).extend(positions.tolist())
    assert sorted(epochs) == [0, 1]
    for visited in epochs.values():
        assert len(visited) == 9 and len(set(visited)) == 9
    assert epochs[0] != epochs[1]
    assert np.array_equal(schedule.batch_positions(4, n, batch, 7)[1], schedule.batch_positions(4, n, batch, 7)[1])
    with pytest.raises(train.TrainError, match="cannot fill one batch"):
        schedule.batch_positions(0, 2, 3, 7)

