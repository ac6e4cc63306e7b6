"""Stage `train`: WeCLIP's decoder with RFM + PAR pseudo labels, from the feature cache or online (DESIGN.md §3.4).

One training step (ALGORITHM.md §7.2), shared by both sources:

    decoder(features) -> logits P, affinity A_f
    M_p = online_pseudo_label(cams, attn, A_f, image)              (static CAA before `rfm_start_iter`, then RFM)
    loss = L_seg(P↑, M_p) + λ·L_aff(A_f, Â(M_p))                   (pipeline/training/losses.py)
    AdamW step + poly warm-up                                       (pipeline/training/optim.py; only the decoder learns)

Sources of (features, attn, cams, image) for a step:
* cache (default): the committed samples of a feature cache. Every epoch visits them all in a new order,
  a permutation drawn from (train.seed, epoch); `drop_last` as the released loader (§7.3). With `train.train_flip`
  each sample is h-flipped with probability `aug.flip_prob`, decided from (train.seed, step, row), consistently in
  every array (patch indices of features and attention are permuted, not just reversed). `train.views = k` trains
  on views 0..k-1 of each image only — the batches a k-view cache of the same images would give — so one cache
  serves a views-per-image ablation.
* online (`online_manifest`): the released code's way — the frozen backbone and `softmax_gradcam` run in the loop on
  a fresh crop of every image each epoch: view `epoch` of the image, drawn from (extract.seed, image_id, view) exactly
  as `weclip extract` draws its views, so epoch 0 of an online run sees the crops of a 1-view cache. Images are
  visited in the same (train.seed, epoch) order. `train_flip` does not apply (every view has its own flip).

Determinism and resume: the data of step s is a pure function of (config, s); the only other randomness is
dropout, whose generator state is saved in every checkpoint (and the DataLoader gets its own generator, so it
never draws from the global one). `resume=True` restores decoder, optimizer, schedule and RNG state from
`out_dir/checkpoint.pt` and continues with exactly the batches and losses of an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.data.augment import apply_view, draw_view, normalise, valid_mask
from pipeline.cache import fingerprint as fp
from pipeline.cache.store import CacheReader
from pipeline.model.cam import softmax_gradcam
from pipeline.training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from pipeline.config import Config
from pipeline.data.images import ImageDecodeError, load_manifest_rgb
from pipeline.data.manifest import read_manifest
from pipeline.model.decoder import WeCLIPDecoder
from pipeline.extract.worker import (ExtractPlan, PlannedImage, all_prompts, check_layers, crop_grid, load_backbone,
                                     make_plan)
from pipeline.training.losses import total_loss
from pipeline.training.optim import PolyWarmup, build_optimizer
from pipeline.refinement.par import PAR
from pipeline.refinement.pseudo_label import online_pseudo_label, rfm_active
from pipeline.model.text import class_set, text_embeddings

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
# Config fields that may change between a run and its resumption: they do not change what is computed.
RESUMABLE_CHANGES = ("train.loader_workers", "train.checkpoint_every")
# Domains of the seeded generators, so that the order and flip streams never coincide.
_ORDER_STREAM, _FLIP_STREAM = 0, 1


class TrainError(ValueError):
    """The training inputs (cache, checkpoint, output folder, config) cannot be used as asked."""


# ---------------------------------------------------------------------------------------------------------------
# Data order and train-time flip: pure functions of the seed, the epoch / step and the sample.

def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The visiting order of n samples in `epoch`, from a generator seeded with (seed, epoch) only."""
    return np.random.default_rng([seed, _ORDER_STREAM, epoch]).permutation(n)


def batch_positions(step: int, n: int, batch_size: int, seed: int) -> tuple[int, np.ndarray]:
    """(epoch, positions of the samples of global step `step`), `drop_last` (ALGORITHM.md §7.3)."""
    steps_per_epoch = n // batch_size
    if steps_per_epoch < 1:
        raise TrainError(f"{n} samples cannot fill one batch of {batch_size}; lower train.batch_size or add data")
    epoch, index = divmod(step, steps_per_epoch)
    return epoch, epoch_permutation(seed, epoch, n)[index * batch_size:(index + 1) * batch_size]


def flip_decision(seed: int, step: int, row: int, prob: float) -> bool:
    """Whether sample `row` is h-flipped at `step` (train.train_flip); a generator seeded with (seed, step, row)."""
    return bool(np.random.default_rng([seed, _FLIP_STREAM, step, row]).random() < prob)


def hflip_sample(sample: dict[str, np.ndarray], grid: tuple[int, int]) -> dict[str, np.ndarray]:
    """Mirror one cached sample left-right, consistently in every array (DESIGN.md §3.2 layouts).

    Patch n = r·w + c becomes r·w + (w−1−c): `features` (L×N×D) permute the token axis, `attn` (L×N×N) both
    token axes; `cams` (K×h×w), `image` (3×H×W) and `valid` (H×W) reverse their last axis.
    """
    h, w = grid
    perm = (np.arange(h)[:, None] * w + np.arange(w)[::-1][None, :]).reshape(-1)
    return {**sample,
            "features": sample["features"][:, perm],
            "attn": sample["attn"][:, perm][:, :, perm],
            "cams": sample["cams"][..., ::-1],
            "image": sample["image"][..., ::-1],
            "valid": sample["valid"][..., ::-1]}


# ---------------------------------------------------------------------------------------------------------------
# Step-indexed datasets: item i is the whole batch of global step `start + i` (DataLoader batch_size=None).

class CachedSteps(Dataset):
    """Batches of committed cache samples. The reader is opened lazily in each (worker) process."""

    def __init__(self, root: str, rows: np.ndarray, grid: tuple[int, int], start: int, stop: int, cfg: Config):
        self.root, self.rows, self.grid = root, rows, grid
        self.start, self.stop, self.cfg = start, stop, cfg
        self._reader: CacheReader | None = None
        self._pid = -1

    def __len__(self) -> int:
        return self.stop - self.start

    def _open(self) -> CacheReader:
        if self._reader is None or self._pid != os.getpid():
            self._reader, self._pid = CacheReader(self.root), os.getpid()
        return self._reader

    def __getitem__(self, i: int) -> dict[str, Any]:
        step = self.start + i
        train = self.cfg.train
        _, positions = batch_positions(step, len(self.rows), train.batch_size, train.seed)
        rows = self.rows[positions]
        arrays = self._open().read(rows)
        if train.train_flip:
            samples = [{name: values[j] for name, values in arrays.items()} for j in range(len(rows))]
            samples = [hflip_sample(s, self.grid) if flip_decision(train.seed, step, int(r), self.cfg.aug.flip_prob)
                       else s for s, r in zip(samples, rows)]
            arrays = {name: np.stack([s[name] for s in samples]) for name in arrays}
        return {"step": step, "rows": rows, **{k: np.ascontiguousarray(v) for k, v in arrays.items()}}


class OnlineCrops(Dataset):
    """Batches of fresh crops of manifest images: view `epoch` of each image, as `weclip extract` draws views."""

    def __init__(self, images: Sequence[PlannedImage], start: int, stop: int, cfg: Config):
        self.images, self.start, self.stop, self.cfg = list(images), start, stop, cfg

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> dict[str, Any]:
        step = self.start + i
        epoch, positions = batch_positions(step, len(self.images), self.cfg.train.batch_size, self.cfg.train.seed)
        crops, valid = [], []
        for image in (self.images[p] for p in positions):
            try:
                rgb = load_manifest_rgb(image.path, image.height, image.width)
            except ImageDecodeError as err:
                raise TrainError(f"online training cannot read image {image.image_id}: {err}; fix the file or "
                                 "rebuild the manifest") from err
            view = draw_view(self.cfg.extract.seed, image.image_id, epoch, image.height, image.width, self.cfg.aug)
            crops.append(apply_view(rgb, view).transpose(2, 0, 1))
            valid.append(valid_mask(view))
        return {"step": step, "positions": positions, "image": np.stack(crops), "valid": np.stack(valid)}


# ---------------------------------------------------------------------------------------------------------------
# Sources: what a step needs, on the device.

@dataclass
class StepBatch:
    """The inputs of one training step: features B×L×N×D, attn B×A×N×N, cams B×K×h×w, cam_classes B×K,
    image B×3×H×W (normalised), valid B×H×W (false on padding; reported, not ignored: §0.1 item 8)."""
    features: torch.Tensor
    attn: torch.Tensor
    cams: torch.Tensor
    cam_classes: torch.Tensor
    image: torch.Tensor
    valid: torch.Tensor
    grid: tuple[int, int]


@dataclass
class Source:
    """A data source: the fingerprint and class names a checkpoint records, the decoder's input shape, and
    `dataset(start, stop)` / `prepare(item)` turning step numbers into StepBatches."""
    kind: str  # "cache" or "online"
    fingerprint: dict[str, Any]
    class_names: tuple[str, ...]
    in_layers: int
    in_dim: int
    grid: tuple[int, int]
    n_samples: int


class CachedSource(Source):
    def __init__(self, cfg: Config, cache_path: str | Path, device: torch.device):
        reader = CacheReader(str(cache_path))  # NotACache names the path when it is not a cache
        rows = _training_rows(reader, cfg.train.views, cache_path)
        class_names = _check_cache_matches_config(cfg, reader.fingerprint, cache_path)
        spec = reader.spec
        super().__init__("cache", reader.fingerprint, class_names, spec.feature_layers, spec.dim, spec.grid, len(rows))
        if cfg.refine.static_layers > spec.attn_layers or cfg.refine.rfm_layers > spec.attn_layers:
            raise TrainError(f"refine.static_layers = {cfg.refine.static_layers} and refine.rfm_layers = "
                             f"{cfg.refine.rfm_layers} need that many attention maps, but the cache at {cache_path} "
                             f"stores {spec.attn_layers}; lower them or extract with more extract.attn_layers")
        self.root, self.rows, self.cfg, self.device = str(cache_path), rows, cfg, device

    def dataset(self, start: int, stop: int) -> Dataset:
        return CachedSteps(self.root, self.rows, self.grid, start, stop, self.cfg)

    def prepare(self, item: dict[str, Any]) -> StepBatch:
        def dev(name: str) -> torch.Tensor:
            return torch.as_tensor(item[name]).to(self.device, non_blocking=True)
        return StepBatch(features=dev("features"), attn=dev("attn"), cams=dev("cams"),
                         cam_classes=dev("cam_classes").long(),
                         image=normalise(dev("image"), self.cfg.model.normalisation), valid=dev("valid"),
                         grid=self.grid)


class OnlineSource(Source):
    def __init__(self, cfg: Config, manifest_path: str | Path, device: torch.device,
                 model_configs: Sequence[str | Path] = ()):
        if cfg.train.views is not None:
            raise TrainError(f"train.views = {cfg.train.views} selects views of a feature cache; online training "
                             "draws a fresh view every epoch. Leave train.views unset with --online")
        manifest = read_manifest(manifest_path)
        classes = class_set(cfg.text.classes)
        if manifest.class_names != classes.classes:
            raise TrainError(f"manifest {manifest_path} has the classes of dataset {manifest.dataset!r}, not those of "
                             f"text class set {cfg.text.classes!r}; use the matching preset")
        self.plan: ExtractPlan = make_plan(manifest, cfg.extract)
        self.backbone = load_backbone(cfg.model, str(device), tuple(str(Path(p).resolve()) for p in model_configs))
        check_layers(cfg.extract, self.backbone)
        grid = crop_grid(cfg.aug.crop, self.backbone.patch_size)
        fingerprint = fp.fingerprint_from_config(cfg, grid=grid, prompts=all_prompts(cfg), class_names=classes.classes,
                                                 manifest=[(i.image_id, i.labels) for i in self.plan.images],
                                                 checkpoint=self.backbone.identity)
        super().__init__("online", fingerprint, classes.classes, len(cfg.extract.feature_layers), self.backbone.width,
                         grid, len(self.plan.images))
        self.text = text_embeddings(self.backbone, classes, cfg.text.template)
        self.cfg, self.device = cfg, device

    def dataset(self, start: int, stop: int) -> Dataset:
        return OnlineCrops(self.plan.images, start, stop, self.cfg)

    def prepare(self, item: dict[str, Any]) -> StepBatch:
        image = normalise(torch.as_tensor(item["image"]).to(self.device), self.cfg.model.normalisation)
        labels = [self.plan.images[int(p)].labels for p in item["positions"]]
        cams = softmax_gradcam(self.backbone, image, labels, self.text, self.cfg.extract.feature_layers,
                               self.cfg.extract.attn_layers, k_max=self.plan.k_max)
        return StepBatch(features=cams.features, attn=cams.attn, cams=cams.cams, cam_classes=cams.cam_classes,
                         image=image, valid=torch.as_tensor(item["valid"]).to(self.device), grid=cams.grid)


def _training_rows(reader: CacheReader, views: int | None, cache_path: str | Path) -> np.ndarray:
    """The sorted committed rows the run trains on: all, or those of views 0..views-1 (`train.views`).

    Rows are numbered image-major (row = image · extract.views + view), so the rows of the first k views of a
    cache, in order, visit the images exactly as a k-view cache of the same images does: a run with
    train.views = k gets the batches of a run on that k-view cache."""
    index = reader.index
    if not index.num_rows:
        raise TrainError(f"the feature cache at {cache_path} has no committed samples; run `weclip extract` "
                         "to completion (it resumes) before training")
    rows, view = index.column("row").to_numpy(), index.column("view").to_numpy()
    if views is not None:
        stored = int(reader.fingerprint["views"])
        if not 1 <= views <= stored:
            raise TrainError(f"train.views = {views}, but the feature cache at {cache_path} holds {stored} views "
                             f"per image; choose 1..{stored} (or leave train.views unset to use them all)")
        rows = rows[view < views]
    return np.sort(rows)


def _check_cache_matches_config(cfg: Config, fingerprint: dict[str, Any], cache_path: str | Path) -> tuple[str, ...]:
    """The class names of the cache (from the config's class set, checked against the fingerprint's hash); the
    normalisation PAR's guide image gets must be the one the backbone saw."""
    names = class_set(cfg.text.classes).classes
    if fp.sha256_json(list(names)) != fingerprint.get("classes_sha256"):
        raise TrainError(f"the feature cache at {cache_path} was extracted for another class list than text class set "
                         f"{cfg.text.classes!r}; train with the preset the cache was extracted with")
    if fingerprint.get("normalisation") != cfg.model.normalisation:
        raise TrainError(f"the feature cache at {cache_path} holds crops normalised with "
                         f"{fingerprint.get('normalisation')!r} statistics but model.normalisation is "
                         f"{cfg.model.normalisation!r}; set model.normalisation to the cache's")
    return names


# ---------------------------------------------------------------------------------------------------------------
# One step.

def train_step(decoder: WeCLIPDecoder, optimizer: torch.optim.Optimizer, scheduler: PolyWarmup, par: PAR,
               batch: StepBatch, step: int, cfg: Config) -> dict[str, Any]:
    """One optimisation step (ALGORITHM.md §7.2) on a batch; returns the step's metrics (no timing)."""
    decoder.train()
    lr = optimizer.param_groups[0]["lr"]
    out = decoder(batch.features, batch.grid)
    use_rfm = rfm_active(step, cfg.refine)
    labels = online_pseudo_label(batch.cams, batch.cam_classes, batch.attn, out.affinity, batch.image,
                                 use_rfm=use_rfm, refine=cfg.refine, par=par)
    losses = total_loss(out.logits, out.affinity, labels, cfg.loss)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    optimizer.step()
    scheduler.step()
    values = {k: float(v.detach()) for k, v in losses.items()}
    if not np.isfinite(values["loss"]):
        raise FloatingPointError(f"non-finite loss {values} at step {step}; the last checkpoint is the one to resume")
    present = torch.unique(labels)
    return {"step": step, **values, "lr": lr, "rfm": use_rfm,
            "fg_fraction": float((labels > 0).float().mean()),
            "pad_fraction": float(1 - batch.valid.float().mean()),
            "classes": [int(v) - 1 for v in present.tolist() if v > 0]}


# ---------------------------------------------------------------------------------------------------------------
# The stage.

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        loss = "n/a" if self.last_loss is None else f"{self.last_loss:.4f}"
        speed = "n/a" if self.mean_s_per_step is None else f"{self.mean_s_per_step:.3f} s/step"
        return "\n".join([
            f"trained {self.steps_run} steps ({self.start_step} -> {self.final_step}) from the {self.source} "
            f"(fingerprint {self.fingerprint[:16]}) on {self.device}",
            f"  last loss {loss}, {speed}, RFM {'on' if self.rfm_on else 'off'}",
            f"  checkpoint {self.checkpoint}", f"  metrics {self.metrics}"])


def run(cfg: Config, cache_path: str | Path | None, out_dir: str | Path, resume: bool = False,
        online_manifest: str | Path | None = None, max_steps: int | None = None, progress: bool = True,
        device: str | None = None, model_configs: Sequence[str | Path] = ()) -> TrainSummary:
    """Train the decoder for `cfg.train.iterations` steps (or up to global step `max_steps`, if smaller).

    cache_path: the feature cache (ignored with `online_manifest`, which trains online from that manifest).
    out_dir: receives `checkpoint.pt` (latest), `step_XXXXXX.pt` (every `train.checkpoint_every` steps and at
    the end) and `metrics.jsonl` (one JSON object per step). resume: continue from `out_dir/checkpoint.pt`.
    device: "cpu", "cuda", ... (default: cuda when available). model_configs: extra open_clip model configs to
    register for the online backbone (e.g. a test's tiny ViT).
    """
    out_dir = Path(out_dir)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if online_manifest is None and cache_path is None:
        raise TrainError("give a feature cache (cache_path) or a manifest to train online (online_manifest)")
    source: CachedSource | OnlineSource = (OnlineSource(cfg, online_manifest, dev, model_configs)
                                           if online_manifest is not None else CachedSource(cfg, cache_path, dev))
    end = cfg.train.iterations if max_steps is None else min(max_steps, cfg.train.iterations)
    batch_positions(0, source.n_samples, cfg.train.batch_size, cfg.train.seed)  # fail now if one batch cannot fill

    torch.manual_seed(cfg.train.seed)  # decoder init, then dropout
    decoder = WeCLIPDecoder(source.in_layers, source.in_dim, len(source.class_names) + 1, cfg.decoder).to(dev)
    optimizer = build_optimizer(decoder.parameters(), cfg.train)
    scheduler = PolyWarmup(optimizer, cfg.train)
    start = 0
    latest = out_dir / CHECKPOINT_NAME
    if resume:
        start = _restore(load_checkpoint(latest, map_location="cpu"), cfg, source, decoder, optimizer, scheduler)
    elif latest.exists():
        raise TrainError(f"{out_dir} already holds a training run ({latest}); pass resume=True (--resume) to "
                         "continue it, or choose a new output folder")
    metrics_path = _open_metrics(out_dir / METRICS_NAME, start)

    par = PAR(cfg.par)
    loader = DataLoader(source.dataset(start, max(start, end)), batch_size=None, shuffle=False,
                        num_workers=cfg.train.loader_workers, pin_memory=dev.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.train.seed))
    last: dict[str, Any] | None = None
    times: list[float] = []
    bar = tqdm(total=max(0, end - start), desc=f"train ({source.kind})", unit="step", disable=not progress)
    with bar, open(metrics_path, "a") as metrics_file:
        tick = time.perf_counter()
        for item in loader:
            step = int(item["step"])
            batch = source.prepare(item)
            data_s = time.perf_counter() - tick  # waiting for the loader + preparing (online: backbone + Grad-CAM)
            last = train_step(decoder, optimizer, scheduler, par, batch, step, cfg)
            now = time.perf_counter()
            last.update(epoch=step // (source.n_samples // cfg.train.batch_size), s_per_step=now - tick,
                        data_s=data_s)
            tick = now
            times.append(last["s_per_step"])
            metrics_file.write(json.dumps(last) + "\n")
            metrics_file.flush()
            done = step + 1
            if done % cfg.train.checkpoint_every == 0 or done == end:
                _save(out_dir, done, cfg, source, decoder, optimizer, scheduler)
            bar.set_postfix(loss=f"{last['loss']:.4f}", rfm="on" if last["rfm"] else "off")
            bar.update(1)
    final = max(start, end)
    if not latest.exists():  # nothing to train (end <= start on a fresh folder): still leave a checkpoint
        _save(out_dir, final, cfg, source, decoder, optimizer, scheduler)
    return TrainSummary(out_dir=str(out_dir), source=source.kind, fingerprint=source.fingerprint["digest"],
                        device=str(dev), start_step=start, final_step=final, steps_run=len(times),
                        last_loss=None if last is None else last["loss"],
                        mean_s_per_step=float(np.mean(times)) if times else None,
                        rfm_on=rfm_active(final - 1, cfg.refine) if final else False,
                        checkpoint=str(latest), metrics=str(metrics_path))


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _save(out_dir: Path, step: int, cfg: Config, source: Source, decoder: WeCLIPDecoder,
          optimizer: torch.optim.Optimizer, scheduler: PolyWarmup) -> None:
    """`step_XXXXXX.pt` and `checkpoint.pt` (the latest), each written atomically."""
    kwargs = dict(decoder=decoder, optimizer=optimizer, scheduler=scheduler, step=step, config=cfg,
                  fingerprint=source.fingerprint, class_names=source.class_names,
                  rng_state=_rng_state(next(decoder.parameters()).device))
    save_checkpoint(out_dir / f"step_{step:06d}.pt", **kwargs)
    save_checkpoint(out_dir / CHECKPOINT_NAME, **kwargs)


def _restore(ckpt: Checkpoint, cfg: Config, source: Source, decoder: WeCLIPDecoder,
             optimizer: torch.optim.Optimizer, scheduler: PolyWarmup) -> int:
    """Load a checkpoint's states after checking it belongs to this data and config; returns its step."""
    if ckpt.fingerprint.get("digest") != source.fingerprint["digest"]:
        keys = fp.diff(ckpt.fingerprint, source.fingerprint)
        raise TrainError(f"checkpoint {ckpt.path} was trained on other data than the {source.kind} given now "
                         f"(fingerprint {str(ckpt.fingerprint.get('digest'))[:16]} vs "
                         f"{source.fingerprint['digest'][:16]}; differing: {', '.join(keys) or 'digest'}); resume "
                         "with the cache (or manifest) it was trained on")
    changed = [k for k in _flat_diff(ckpt.config.to_dict(), cfg.to_dict()) if k not in RESUMABLE_CHANGES]
    if changed:
        raise TrainError(f"checkpoint {ckpt.path} was trained with other settings: {', '.join(changed)} differ; an "
                         "exact resume needs the same config (only train.loader_workers and train.checkpoint_every may "
                         "change). Use the original settings, or train into a new folder")
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


def _open_metrics(path: Path, start: int) -> Path:
    """Keep the metric lines of steps < start (a resumed run rewrites the ones a killed run logged past its last
    checkpoint); a fresh run starts an empty file. Rewritten atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if start and path.exists():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] < start]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return path
