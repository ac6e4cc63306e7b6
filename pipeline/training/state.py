"""The saved state of a training run: checkpoints with the exact-resume state, and the metrics file.

`step_XXXXXX.pt` and `checkpoint.pt` (the latest) hold decoder, optimizer, schedule and RNG state, the config and the
data's fingerprint, each written atomically; with `train.keep_checkpoints` = k only the newest k step files stay.
`best.pt` is the checkpoint of the best validation mIoU so far (`train.val_every`). Restoring checks that the
checkpoint belongs to the same data and the same settings (only the fields in RESUMABLE_CHANGES may differ), so a
resumed run continues with exactly the batches and losses of an uninterrupted one. `metrics.jsonl` keeps one JSON object per step; a resumed run drops the lines a
killed run logged past its last checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from weclip.pipeline.cache import fingerprint as fp
from weclip.pipeline.config import Config
from weclip.pipeline.errors import TrainError
from weclip.pipeline.files import atomic_write_text
from weclip.pipeline.model.decoder import WeCLIPDecoder
from weclip.pipeline.training.checkpoint import Checkpoint, save_checkpoint
from weclip.pipeline.training.optim import PolyWarmup
from weclip.pipeline.training.sources import Source

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"  # the run's resolved config, readable
# Config fields that may change between a run and its resumption: they do not change what is computed.
RESUMABLE_CHANGES = ("train.loader_workers", "train.checkpoint_every", "train.tensorboard", "train.keep_checkpoints")
BEST_NAME = "best.pt"


def rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _checkpoint_kwargs(step: int, cfg: Config, source: Source, decoder: WeCLIPDecoder,
                       optimizer: torch.optim.Optimizer, scheduler: PolyWarmup) -> dict[str, Any]:
    return dict(decoder=decoder, optimizer=optimizer, scheduler=scheduler, step=step, config=cfg,
                fingerprint=source.fingerprint, classes=source.classes,
                rng_state=rng_state(next(decoder.parameters()).device))


def save_run_state(out_dir: Path, step: int, cfg: Config, source: Source, decoder: WeCLIPDecoder,
          optimizer: torch.optim.Optimizer, scheduler: PolyWarmup) -> None:
    """`step_XXXXXX.pt` and `checkpoint.pt` (the latest), each written atomically; then the step files past
    `train.keep_checkpoints` are deleted (after the new one is safely on disk)."""
    kwargs = _checkpoint_kwargs(step, cfg, source, decoder, optimizer, scheduler)
    save_checkpoint(out_dir / f"step_{step:06d}.pt", **kwargs)
    save_checkpoint(out_dir / CHECKPOINT_NAME, **kwargs)
    for old in stale_steps(saved_steps(out_dir), step, cfg.train.keep_checkpoints):
        (out_dir / f"step_{old:06d}.pt").unlink(missing_ok=True)


def save_best(out_dir: Path, step: int, cfg: Config, source: Source, decoder: WeCLIPDecoder,
              optimizer: torch.optim.Optimizer, scheduler: PolyWarmup) -> Path:
    """`best.pt`: the checkpoint of the step with the best validation mIoU so far, written atomically."""
    return save_checkpoint(out_dir / BEST_NAME, **_checkpoint_kwargs(step, cfg, source, decoder, optimizer, scheduler))


def saved_steps(out_dir: Path) -> list[int]:
    """The steps of the `step_XXXXXX.pt` files in a run folder."""
    return sorted(int(p.stem[len("step_"):]) for p in out_dir.glob("step_*.pt") if p.stem[len("step_"):].isdigit())


def stale_steps(steps: list[int], current: int, keep: int) -> list[int]:
    """The step files to delete once step `current` is written: all but the newest `keep` of those up to `current`
    (0 keeps all). Files past `current` (a killed run's, which this run rewrites identically) are left alone."""
    if not keep:
        return []
    done = sorted(s for s in steps if s <= current)
    return done[:-keep]


def restore_run_state(ckpt: Checkpoint, cfg: Config, source: Source, decoder: WeCLIPDecoder,
             optimizer: torch.optim.Optimizer, scheduler: PolyWarmup) -> int:
    """Load a checkpoint's states after checking it belongs to this data and config; returns its step."""
    if ckpt.weights_only:
        raise TrainError(f"{ckpt.path} is a weights-only export (`weclip export`) without optimizer and RNG state; "
                         "resume from the run's checkpoint.pt or a step_XXXXXX.pt")
    if ckpt.fingerprint.get("digest") != source.fingerprint["digest"]:
        keys = fp.diff(ckpt.fingerprint, source.fingerprint)
        raise TrainError(f"checkpoint {ckpt.path} was trained on other data than the {source.kind} given now "
                         f"(fingerprint {str(ckpt.fingerprint.get('digest'))[:16]} vs "
                         f"{source.fingerprint['digest'][:16]}; differing: {', '.join(keys) or 'digest'}); resume "
                         "with the cache (or manifest) it was trained on")
    changed = [k for k in _flat_diff(ckpt.config.to_dict(), cfg.to_dict()) if k not in RESUMABLE_CHANGES]
    if changed:
        raise TrainError(f"checkpoint {ckpt.path} was trained with other settings: {', '.join(changed)} differ; an "
                         f"exact resume needs the same config (only {', '.join(RESUMABLE_CHANGES)} may change). Use the "
                         "original settings, or train into a new folder")
    decoder.load_state_dict(ckpt.decoder_state)
    optimizer.load_state_dict(ckpt.optimizer_state)
    scheduler.load_state_dict(ckpt.scheduler_state)
    torch.set_rng_state(ckpt.rng_state["torch"])
    if "cuda" in ckpt.rng_state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt.rng_state["cuda"])
    return ckpt.step


def _flat_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the leaves that differ between two nested config dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _flat_diff(x, y, f"{prefix}{key}.")
        elif fp.canonical_json(x) != fp.canonical_json(y):
            out.append(f"{prefix}{key}")
    return out


def open_metrics(path: Path, start: int) -> Path:
    """Keep the metric lines of steps < start (a resumed run rewrites the ones a killed run logged past its last
    checkpoint); a fresh run starts an empty file. Rewritten atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if start and path.exists():
        kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and json.loads(line)["step"] < start]
    return atomic_write_text(path, "".join(line + "\n" for line in kept))


def best_so_far(metrics_path: Path) -> tuple[int, float] | None:
    """(checkpoint step, val_miou) of the best validation in a metrics file (the first of equal scores: a later step
    must beat it), or None. A line of step s scores the decoder after s + 1 steps, the checkpoint of step s + 1."""
    best = None
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line) if line.strip() else {}
        score = record.get("val_miou")
        if score is not None and (best is None or score > best[1]):
            best = (int(record["step"]) + 1, float(score))
    return best
