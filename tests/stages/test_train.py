"""stages/train.py on a tiny world: shapes images → manifest → feature cache (tiny random ViT, extract inline)."""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY_CONFIG
from weclip.pipeline.cache.schema import CacheSpec
from weclip.pipeline.cache.store import CacheReader, CacheWriter, NotACache
from weclip.pipeline.training.checkpoint import build_decoder_from_checkpoint, load_checkpoint
from weclip.pipeline.config import Config, preset
from weclip.pipeline.data.manifest import read_manifest, write_manifest
from weclip.pipeline.errors import ConfigError
from weclip.pipeline.model.text import SHAPES_CLASSES
from weclip.pipeline.training import schedule, sources, state
from weclip.pipeline.training.step import train_step
from weclip.stages import extract, train
from tests.stages.train_fakes import shapes_world

CROP, IMAGES = 64, 8


def tiny_config(**sections) -> Config:
    """Tiny ViT (3 blocks, patch 16), 64-px crops (4×4 grid), a small decoder, batch 2; RFM from step 2."""
    cfg = preset("shapes").replace(
        model={"name": "tiny-vit", "pretrained": None, "init_seed": 0},
        aug={"crop": CROP},
        extract={"views": 1, "samples_per_shard": 4, "feature_layers": [1, 2], "attn_layers": [1, 2, 3],
                 "dtype": "float32", "features_storage": "plain", "attn_storage": "plain",  # = online, to 1e-4
                 "batch_size": 4},
        refine={"static_layers": 3, "rfm_layers": 2, "rfm_start_iter": 2},
        par={"num_iter": 3, "dilations": [1, 2, 4]},
        decoder={"embed_dim": 32, "layers": 1, "heads": 2, "mlp_dim": 64},
        train={"iterations": 40, "batch_size": 2, "checkpoint_every": 2, "loader_workers": 0, "warmup_iters": 2})
    return cfg.replace(**sections)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return shapes_world(tmp_path_factory.mktemp("train"), tiny_config(), IMAGES, CROP, [TINY_CONFIG])


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



# --- watching a run: validation mIoU with the best checkpoint, a cap on step files, TensorBoard ---------------------

def val_config(world) -> Config:
    """The uninterrupted run's settings with a validation every 2 steps at the images' own size."""
    return world["cfg"].replace(train={"train_flip": True, "val_every": 2}, eval={"long_side": CROP})


def decoder_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).decoder_state


@pytest.fixture(scope="module")
def validated(world):
    out = world["root"] / "validated"
    summary = train.run(val_config(world), world["cache"], out, max_steps=6, progress=False,
                        val_manifest=world["manifest"])
    return {"out": out, "summary": summary}


def test_validation_logs_miou_every_n_steps_and_keeps_the_best(world, uninterrupted, validated):
    out, summary = validated["out"], validated["summary"]
    m = metrics(out)
    assert [x["step"] for x in m if "val_miou" in x] == [1, 3, 5]  # after 2, 4 and 6 steps
    assert all(0 <= x["val_miou"] <= 1 for x in m if "val_miou" in x)
    assert trajectory(out) == trajectory(uninterrupted["out"])  # validation changes no loss, flip or dropout mask
    scores = [(x["val_miou"], x["step"] + 1) for x in m if "val_miou" in x]
    best_score = max(s for s, _ in scores)
    best_step = min(step for s, step in scores if s == best_score)  # a tie keeps the earlier checkpoint
    assert (summary.best_step, summary.best_val_miou) == (best_step, best_score)
    assert summary.best_checkpoint == str(out / "best.pt") and "best val mIoU" in summary.format()
    best, at_step = decoder_tensors(out / "best.pt"), decoder_tensors(out / f"step_{best_step:06d}.pt")
    assert load_checkpoint(out / "best.pt").step == best_step
    assert best.keys() == at_step.keys() and all(torch.equal(best[k], at_step[k]) for k in best)


def test_validation_score_is_the_evaluate_score_of_the_checkpoint(world, validated):
    """val_miou is what `weclip evaluate` (no CRF, the run's eval settings) reports for that step's checkpoint."""
    from weclip.stages import evaluate
    report = evaluate.run(validated["out"] / "step_000004.pt", world["manifest"], world["root"] / "eval4",
                          crf=False, progress=False, model_configs=[TINY_CONFIG])
    (line,) = [x for x in metrics(validated["out"]) if x["step"] == 3]
    assert line["val_miou"] == pytest.approx(report.miou, abs=1e-12)


def test_kill_and_resume_with_validation_gives_the_uninterrupted_run(world, validated):
    cfg, out = val_config(world), world["root"] / "validated-killed"
    train.run(cfg, world["cache"], out, max_steps=3, progress=False, val_manifest=world["manifest"])
    shutil.copyfile(out / "step_000002.pt", out / "checkpoint.pt")  # killed after step 3 was logged
    summary = train.run(cfg, world["cache"], out, resume=True, max_steps=6, progress=False,
                        val_manifest=world["manifest"])
    strip = ("s_per_step", "data_s", "val_s")
    assert ([{k: v for k, v in x.items() if k not in strip} for x in metrics(out)]
            == [{k: v for k, v in x.items() if k not in strip} for x in metrics(validated["out"])])
    assert (summary.best_step, summary.best_val_miou) == (validated["summary"].best_step,
                                                          validated["summary"].best_val_miou)
    a, b = decoder_tensors(out / "best.pt"), decoder_tensors(validated["out"] / "best.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_validation_needs_both_the_setting_and_a_manifest(world, tmp_path):
    with pytest.raises(train.TrainError, match=r"train.val_every = 2 .*--val"):
        train.run(val_config(world), world["cache"], tmp_path / "a", max_steps=1, progress=False)
    with pytest.raises(train.TrainError, match=r"train.val_every = 0 and val manifest"):
        train.run(world["cfg"], world["cache"], tmp_path / "b", max_steps=1, progress=False,
                  val_manifest=world["manifest"])


def test_keep_checkpoints_deletes_the_older_step_files(world, tmp_path):
    out = tmp_path / "capped"
    train.run(world["cfg"].replace(train={"keep_checkpoints": 2}), world["cache"], out, max_steps=7, progress=False)
    assert sorted(p.name for p in out.glob("step_*.pt")) == ["step_000006.pt", "step_000007.pt"]
    assert load_checkpoint(out / "checkpoint.pt").step == 7
    # the cap may change on resume (it changes nothing computed); 0 keeps every file again
    train.run(world["cfg"], world["cache"], out, resume=True, max_steps=10, progress=False)
    assert sorted(p.name for p in out.glob("step_*.pt")) == ["step_000006.pt", "step_000007.pt", "step_000008.pt",
                                                             "step_000010.pt"]


def test_stale_steps_keeps_the_newest_up_to_the_current_step():
    assert state.stale_steps([2, 4, 6, 8], current=6, keep=2) == [2]  # step 8 is a killed run's, rewritten later
    assert state.stale_steps([2, 4, 6], current=6, keep=1) == [2, 4]
    assert state.stale_steps([2, 4, 6], current=6, keep=0) == []
    assert state.stale_steps([6], current=6, keep=3) == []


def test_resume_refuses_a_weights_only_export(world, tmp_path):
    from weclip.stages import export
    out = tmp_path / "run"
    train.run(world["cfg"], world["cache"], out, max_steps=1, progress=False)
    export.run(out / "checkpoint.pt", tmp_path / "model.safetensors")
    shutil.copyfile(tmp_path / "model.safetensors", out / "checkpoint.pt")
    with pytest.raises(train.TrainError, match="weights-only export"):
        train.run(world["cfg"], world["cache"], out, resume=True, max_steps=2, progress=False)


def test_tensorboard_events_hold_the_step_scalars(world, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "board"
    cfg = val_config(world).replace(train={"tensorboard": True})
    train.run(cfg, world["cache"], out, max_steps=4, progress=False, val_manifest=world["manifest"])
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/total", "loss/seg", "loss/aff", "train/lr", "train/fg_fraction", "train/rfm", "val/miou"} <= tags
    m = metrics(out)
    loss = events.Scalars("loss/total")
    assert [e.step for e in loss] == [0, 1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([x["loss"] for x in m], rel=1e-6)
    assert [e.value for e in events.Scalars("train/rfm")] == [float(x["rfm"]) for x in m]
    assert [e.step for e in events.Scalars("val/miou")] == [1, 3]


def test_tensorboard_without_the_package_names_the_extra(world, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # an import of it raises ImportError
    with pytest.raises(ConfigError, match=r"weclip\[tensorboard\]"):
        train.run(world["cfg"].replace(train={"tensorboard": True}), world["cache"], tmp_path / "x", max_steps=1,
                  progress=False)


def test_cli_val_validates_every_checkpoint_unless_told(monkeypatch, tmp_path):
    from weclip import cli
    calls = []
    monkeypatch.setattr(train, "run", lambda cfg, cache, out, **kw: calls.append((cfg, kw)) or {"ok": 1})
    monkeypatch.setattr(cli, "_print", lambda summary: None)
    base = ["train", "-o", str(tmp_path / "o"), "--cache", str(tmp_path / "c"), "--preset", "shapes"]
    for extra in (["--val", "v.parquet"], ["--val", "v.parquet", "--set", "train.val_every=7"], []):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(base + extra)
        assert exit_info.value.code == 0
    (with_val, kw), (told, _), (without, kw_none) = calls
    assert with_val.train.val_every == preset("shapes").train.checkpoint_every and kw["val_manifest"] == "v.parquet"
    assert told.train.val_every == 7
    assert without.train.val_every == 0 and kw_none["val_manifest"] is None


def test_validation_refuses_a_manifest_of_other_classes_or_without_masks(world, tmp_path):
    from tests.stages import eval_fakes as ef
    voc = ef.make_world(tmp_path / "voc")  # VOC classes, the run trains on the shapes class set
    with pytest.raises(train.TrainError, match=r"val manifest .* does not have the classes of the run's training data"):
        train.run(val_config(world), world["cache"], tmp_path / "a", max_steps=1, progress=False, val_manifest=voc)
    data = read_manifest(world["manifest"])
    unlabelled = write_manifest(tmp_path / "unlabelled.parquet",
                                [dataclasses.replace(r, mask_path=None) for r in data.rows], dataset=data.dataset,
                                class_names=data.class_names, root=data.root, command="test", class_set=data.class_set)
    with pytest.raises(train.TrainError, match="without a mask"):
        train.run(val_config(world), world["cache"], tmp_path / "b", max_steps=1, progress=False,
                  val_manifest=unlabelled)


def test_validation_refuses_a_backbone_other_than_the_caches(world, tmp_path):
    other = val_config(world).replace(model={"init_seed": 1})  # the cache's features came from init_seed 0
    with pytest.raises(ConfigError, match="made with model.init_seed = 0, but this run asks for 1"):
        train.run(other, world["cache"], tmp_path / "a", max_steps=1, progress=False, val_manifest=world["manifest"])


def test_online_validation_uses_the_sources_backbone(world, tmp_path):
    cfg = val_config(world).replace(decoder={"dropout": 0.0}, train={"train_flip": False})
    online = train.run(cfg, None, tmp_path / "online", online_manifest=world["manifest"], max_steps=2,
                       progress=False, model_configs=[TINY_CONFIG], val_manifest=world["manifest"])
    cached = train.run(cfg, world["cache"], tmp_path / "cached", max_steps=2, progress=False,
                       val_manifest=world["manifest"])
    assert online.best_step == cached.best_step == 2
    assert online.best_val_miou == pytest.approx(cached.best_val_miou, abs=1e-3)  # the same decoder up to float noise


def test_tensorboard_of_a_resumed_run_drops_the_killed_runs_later_events(world, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg, out = world["cfg"].replace(train={"tensorboard": True}), tmp_path / "board"
    train.run(cfg, world["cache"], out, max_steps=3, progress=False)
    shutil.copyfile(out / "step_000002.pt", out / "checkpoint.pt")  # killed after step 3 was logged
    train.run(cfg, world["cache"], out, resume=True, max_steps=4, progress=False)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    loss = events.Scalars("loss/total")
    assert [e.step for e in loss] == [0, 1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([x["loss"] for x in metrics(out)], rel=1e-6)


def test_a_compact_8bit_cache_of_later_blocks_trains_and_evaluates(world, tmp_path):
    """The compact setting end to end: decoder blocks {2} of 3 (like VOC's 8..11 of 12), fp8 features and log8
    attention (the presets' storage): extract, train, and evaluate with the backbone online reading the same blocks."""
    from weclip.stages import evaluate
    cfg = tiny_config(extract={"feature_layers": [2], "features_storage": "fp8", "attn_storage": "log8"})
    extract.run(cfg, world["manifest"], tmp_path / "cache", executor="inline", progress=False,
                model_configs=[TINY_CONFIG])
    reader = CacheReader(str(tmp_path / "cache"))
    assert reader.spec.feature_layers == 1 and reader.fingerprint["feature_layers"] == [2]
    assert reader.schemas["features"].stored_shape == (1, 16, 64 + 4)  # tiny ViT: width 64, grid 4×4
    summary = train.run(cfg, tmp_path / "cache", tmp_path / "run", max_steps=2, progress=False)
    ckpt = load_checkpoint(summary.checkpoint)
    assert build_decoder_from_checkpoint(ckpt).in_layers == 1 and ckpt.config.extract.feature_layers == (2,)
    report = evaluate.run(summary.checkpoint, world["manifest"], tmp_path / "eval", crf=False, progress=False,
                          model_configs=[TINY_CONFIG])
    assert report.images == IMAGES and 0 <= report.miou <= 1
