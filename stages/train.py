"""Stage `train`: WeCLIP's decoder with RFM + PAR pseudo labels, from the feature cache or online (docs/design.md §3.4);
with `train.supervised`, from the cache's GT mask crops instead (docs/algorithm.md §8.2).

Composes `pipeline.training`: a Source (cache or online), the data order of `schedule`, one `train_step` per
global step, and the run state of `state` (atomic checkpoints every `train.checkpoint_every` steps, exact resume,
`metrics.jsonl`, optionally TensorBoard events, a validation mIoU every `train.val_every` steps with the best
checkpoint kept as `best.pt`). The data of step s is a pure function of (config, s); the only other randomness is
dropout, whose generator state is saved in every checkpoint (and the DataLoader gets its own generator, so it never
draws from the global one). `resume=True` continues `out_dir/checkpoint.pt` with exactly the batches and losses of an
uninterrupted run; validation forks and restores the RNG states, so it leaves the losses as they are. Under torchrun
or `pipeline.training.distributed.spawn` (`--nproc`) each process trains on its rows of every global batch
(`distributed.World`), and only rank 0 writes the run folder.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from weclip.pipeline.config import Config
from weclip.pipeline.errors import TrainError
from weclip.pipeline.files import atomic_write_text, require_local
from weclip.pipeline.model.backbone import default_device
from weclip.pipeline.model.decoder import WeCLIPDecoder
from weclip.pipeline.refinement.par import PAR
from weclip.pipeline.refinement.pseudo_label import rfm_active
from weclip.pipeline.training.checkpoint import load_checkpoint
from weclip.pipeline.training.distributed import World, session
from weclip.pipeline.training.optim import PolyWarmup, build_optimizer
from weclip.pipeline.training.schedule import batch_positions
from weclip.pipeline.training.sources import CachedSource, OnlineSource, Source
from weclip.pipeline.training.logger import TensorBoardLog
from weclip.pipeline.training.state import (BEST_NAME, CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME, best_so_far, open_metrics,
                                     restore_run_state, save_best, save_run_state)
from weclip.pipeline.training.validation import Validator
from weclip.pipeline.training.step import train_step


@dataclass(frozen=True)
class TrainSummary:
    out_dir: str
    source: str  # "cache" or "online"
    fingerprint: str  # digest of the cache (or of the equivalent cache, online)
    device: str
    start_step: int  # 0, or the step a resumed run started from
    final_step: int  # steps completed in all (the next step's index)
    steps_run: int  # by this call
    last_loss: float | None
    mean_s_per_step: float | None
    rfm_on: bool  # whether RFM was active at the last step
    checkpoint: str
    metrics: str
    samples: int  # the samples the run draws from (cache: committed ones of the chosen views; online: images)
    best_step: int | None = None  # the checkpoint step of the best validation mIoU (train.val_every), if any
    best_val_miou: float | None = None
    best_checkpoint: str | None = None
    supervised: bool = False  # trained on the cache's GT mask crops (train.supervised), not on pseudo labels

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        loss = "n/a" if self.last_loss is None else f"{self.last_loss:.4f}"
        speed = "n/a" if self.mean_s_per_step is None else f"{self.mean_s_per_step:.3f} s/step"
        return "\n".join([
            f"trained {self.steps_run} steps ({self.start_step} -> {self.final_step}) from the {self.source} "
            f"(fingerprint {self.fingerprint[:16]}, {self.samples} samples) on {self.device}"
            + (", fully supervised by its GT masks" if self.supervised else ""),
            f"  last loss {loss}, {speed}, RFM {'on' if self.rfm_on else 'off'}",
            f"  checkpoint {self.checkpoint}", f"  metrics {self.metrics}"]
            + ([] if self.best_step is None else
               [f"  best val mIoU {100 * self.best_val_miou:.2f} at step {self.best_step}: {self.best_checkpoint}"]))


def run(cfg: Config, cache_path: str | Path | None, out_dir: str | Path, resume: bool = False,
        online_manifest: str | Path | None = None, max_steps: int | None = None, progress: bool = True,
        device: str | None = None, model_configs: Sequence[str | Path] = (),
        explicit: Iterable[str] | None = None, val_manifest: str | Path | None = None,
        allow_partial: bool = False) -> TrainSummary:
    """Train the decoder for `cfg.train.iterations` steps (or up to global step `max_steps`, if smaller).

    cache_path: the feature cache (ignored with `online_manifest`, which trains online from that manifest).
    out_dir: receives `checkpoint.pt` (latest), `step_XXXXXX.pt` (every `train.checkpoint_every` steps and at
    the end) and `metrics.jsonl` (one JSON object per step). resume: continue from `out_dir/checkpoint.pt`.
    device: "cpu", "cuda", ... (default: cuda when available). model_configs: extra open_clip model configs to
    register for the online backbone (e.g. a test's tiny ViT). explicit: the dotted config fields the user set
    (--set / --config); from a cache, the settings it fixes (model, text, aug, extract) are taken from it, and one
    of them set to another value is an error (None: every field of `cfg` counts as set). The run's resolved config
    is written to `out_dir/config.json`. val_manifest: a manifest with masks, scored every `train.val_every` steps
    (`val_miou` in metrics.jsonl, the best checkpoint as `best.pt`). allow_partial: train on a cache whose
    extraction has not finished (planned shards without commit record), with a warning; refused otherwise.
    Under torchrun or `distributed.spawn`: this process's part of the run.
    """
    with session(default_device(device)) as world:
        return _run(world, cfg, cache_path, out_dir, resume, online_manifest, max_steps, progress, device,
                    model_configs, explicit, val_manifest, allow_partial)


def _run(world: World, cfg: Config, cache_path, out_dir, resume, online_manifest, max_steps, progress, device,
         model_configs, explicit, val_manifest, allow_partial) -> TrainSummary:  # the arguments of `run`
    out_dir = require_local(out_dir, "output folder")
    dev = world.device(default_device(device))
    world.rows(cfg.train.batch_size)  # fail before any work if the processes cannot share the batch
    if online_manifest is None and cache_path is None:
        raise TrainError("give a feature cache (cache_path) or a manifest to train online (online_manifest)")
    source: Source = (OnlineSource(cfg, online_manifest, dev, model_configs) if online_manifest is not None
                      else CachedSource(cfg, cache_path, dev, explicit, allow_partial))
    cfg = source.cfg
    end = cfg.train.iterations if max_steps is None else min(max_steps, cfg.train.iterations)
    batch_positions(0, source.n_samples, cfg.train.batch_size, cfg.train.seed)  # fail now if one batch cannot fill

    torch.manual_seed(cfg.train.seed)  # decoder init, then dropout
    decoder = WeCLIPDecoder(source.in_layers, source.in_dim, source.classes.num_classes + 1, cfg.decoder).to(dev)
    model = world.wrap(decoder, cfg.train.batch_size)
    optimizer = build_optimizer(decoder.parameters(), cfg.train)
    scheduler = PolyWarmup(optimizer, cfg.train)
    start = 0
    latest = out_dir / CHECKPOINT_NAME
    if resume:
        start = restore_run_state(load_checkpoint(latest, map_location="cpu"), cfg, source, decoder, optimizer, scheduler)
    elif latest.exists():
        raise TrainError(f"{out_dir} already holds a training run ({latest}); pass resume=True (--resume) to "
                         "continue it, or choose a new output folder")
    world.sync_rng(dev)
    metrics_path = out_dir / METRICS_NAME
    if world.main:
        open_metrics(metrics_path, start)
        atomic_write_text(out_dir / CONFIG_NAME, json.dumps(cfg.to_dict(), indent=2) + "\n")
    par = PAR(cfg.par)
    loader = DataLoader(source.dataset(start, max(start, end), world.rows(cfg.train.batch_size)), batch_size=None,
                        shuffle=False, num_workers=cfg.train.loader_workers, pin_memory=dev.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.train.seed))
    validator = _validator(cfg, val_manifest, source, decoder, dev, model_configs, world)
    best = best_so_far(metrics_path) if world.main else None  # a resumed run continues the best of the steps it keeps
    board = TensorBoardLog(out_dir, start) if cfg.train.tensorboard and world.main else None
    last: dict[str, Any] | None = None
    times: list[float] = []
    bar = tqdm(total=max(0, end - start), desc=f"train ({source.kind})", unit="step",
               disable=not (progress and world.main))
    with bar, open(metrics_path if world.main else os.devnull, "a") as metrics_file, board or contextlib.nullcontext():
        tick = time.perf_counter()
        for item in loader:
            step = int(item["step"])
            batch = source.prepare(item)
            data_s = time.perf_counter() - tick  # waiting for the loader + preparing (online: backbone + Grad-CAM)
            last = train_step(model, optimizer, scheduler, par, batch, step, cfg, world)
            now = time.perf_counter()
            last.update(epoch=step // (source.n_samples // cfg.train.batch_size), s_per_step=now - tick,
                        data_s=data_s)
            tick = now
            times.append(last["s_per_step"])
            done = step + 1
            if validator is not None and done % cfg.train.val_every == 0:
                last["val_miou"] = validator.miou()
                tick = time.perf_counter()
                last["val_s"] = tick - now
            metrics_file.write(json.dumps(last) + "\n")
            metrics_file.flush()
            if board is not None:
                board.log(last)
            if world.main and (done % cfg.train.checkpoint_every == 0 or done == end):
                save_run_state(out_dir, done, cfg, source, decoder, optimizer, scheduler)
            if world.main and last.get("val_miou") is not None and (best is None or last["val_miou"] > best[1]):
                best = (done, last["val_miou"])
                save_best(out_dir, done, cfg, source, decoder, optimizer, scheduler)
            bar.set_postfix(loss=f"{last['loss']:.4f}", rfm="on" if last["rfm"] else "off")
            bar.update(1)
    final = max(start, end)
    if world.main and not latest.exists():  # nothing to train (end <= start on a fresh folder): still leave one
        save_run_state(out_dir, final, cfg, source, decoder, optimizer, scheduler)
    world.barrier()  # every process returns once the run folder is complete
    return TrainSummary(out_dir=str(out_dir), source=source.kind, fingerprint=source.fingerprint["digest"],
                        device=str(dev), start_step=start, final_step=final, steps_run=len(times),
                        last_loss=None if last is None else last["loss"],
                        mean_s_per_step=float(np.mean(times)) if times else None,
                        rfm_on=bool(final) and not cfg.train.supervised and rfm_active(final - 1, cfg.refine),
                        checkpoint=str(latest), metrics=str(metrics_path), samples=source.n_samples,
                        best_step=None if best is None else best[0], best_val_miou=None if best is None else best[1],
                        best_checkpoint=None if best is None else str(out_dir / BEST_NAME),
                        supervised=cfg.train.supervised)


def _validator(cfg: Config, val_manifest: str | Path | None, source: Source, decoder: WeCLIPDecoder,
               device: torch.device, model_configs: Sequence[str | Path], world: World) -> Validator | None:
    """The validation of `train.val_every` (online: the source's backbone; cached: the config's, loaded here)."""
    if (val_manifest is None) != (cfg.train.val_every == 0):
        raise TrainError(f"train.val_every = {cfg.train.val_every} and val manifest {val_manifest}: validation needs "
                         "both; give a val manifest (--val) with train.val_every > 0 (--set train.val_every=N), or "
                         "neither")
    if val_manifest is None:
        return None
    backbone = source.backbone if isinstance(source, OnlineSource) else None
    return Validator(val_manifest, cfg, source.fingerprint, source.classes, decoder, backbone, device,
                     model_configs, world)
