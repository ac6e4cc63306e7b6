"""Sources of training steps: the committed samples of a feature cache, or the frozen backbone online.

* cache (default): every epoch visits the committed samples in a new order (`pipeline.training.schedule`);
  `train.views = k` trains on views 0..k-1 of each image only — the batches a k-view cache of the same images would
  give — so one cache serves a views-per-image ablation.
* online: the released code's way — the frozen backbone and `softmax_gradcam` run in the loop on a fresh crop of
  every image each epoch: view `epoch` of the image, drawn from (extract.seed, image_id, view) exactly as `weclip
  extract` draws its views, so epoch 0 of an online run sees the crops of a 1-view cache. Its fingerprint is the one
  the equivalent cache would have. `train_flip` does not apply (every view has its own flip).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from weclip.pipeline.cache.store import CacheReader, first_few
from weclip.pipeline.config import Config
from weclip.pipeline.data.augment import apply_view, draw_view, normalise, valid_mask
from weclip.pipeline.data.images import ImageDecodeError, load_manifest_rgb
from weclip.pipeline.data.manifest import read_manifest
from weclip.pipeline.errors import TrainError
from weclip.pipeline.extract.plan import ExtractPlan, PlannedImage, cache_fingerprint, crop_grid, make_plan
from weclip.pipeline.model.backbone import load_backbone
from weclip.pipeline.model.cam import softmax_gradcam
from weclip.pipeline.model.text import ClassSet, text_embeddings
from weclip.pipeline.provenance import adopt, cache_provenance, check_moved_backbone
from weclip.pipeline.training.schedule import batch_positions, flip_decision, hflip_sample

# ---------------------------------------------------------------------------------------------------------------
# Step-indexed datasets: item i is the batch of global step `start + i` (DataLoader batch_size=None), or the rows
# `part` of it that one of several training processes reads (`schedule.rank_rows`).

class CachedSteps(Dataset):
    """Batches of committed cache samples. The reader is opened lazily in each (worker) process, so every DataLoader
    worker keeps its own shard indexes and decode threads (the CPUs shared among the workers); it skips the
    file-size check, which `CachedSource` made once when the run started."""

    def __init__(self, root: str, rows: np.ndarray, grid: tuple[int, int], start: int, stop: int, cfg: Config,
                 part: slice = slice(None)):
        self.root, self.rows, self.grid = root, rows, grid
        self.start, self.stop, self.cfg, self.part = start, stop, cfg, part
        self._reader: CacheReader | None = None
        self._pid = -1

    def __len__(self) -> int:
        return self.stop - self.start

    def _open(self) -> CacheReader:
        if self._reader is None or self._pid != os.getpid():
            worker = get_worker_info()
            threads = max(1, (os.cpu_count() or 1) // worker.num_workers) if worker is not None else None
            self._reader, self._pid = CacheReader(self.root, check_files=False, threads=threads), os.getpid()
        return self._reader

    def __getitem__(self, i: int) -> dict[str, Any]:
        step = self.start + i
        train = self.cfg.train
        _, positions = batch_positions(step, len(self.rows), train.batch_size, train.seed)
        rows = self.rows[positions[self.part]]
        arrays = self._open().read(rows)
        if train.train_flip:
            samples = [{name: values[j] for name, values in arrays.items()} for j in range(len(rows))]
            samples = [hflip_sample(s, self.grid) if flip_decision(train.seed, step, int(r), self.cfg.aug.flip_prob)
                       else s for s, r in zip(samples, rows)]
            arrays = {name: np.stack([s[name] for s in samples]) for name in arrays}
        return {"step": step, "rows": rows, **{k: np.ascontiguousarray(v) for k, v in arrays.items()}}


class OnlineCrops(Dataset):
    """Batches of fresh crops of manifest images: view `epoch` of each image, as `weclip extract` draws views."""

    def __init__(self, images: Sequence[PlannedImage], start: int, stop: int, cfg: Config, part: slice = slice(None)):
        self.images, self.start, self.stop, self.cfg, self.part = list(images), start, stop, cfg, part

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> dict[str, Any]:
        step = self.start + i
        epoch, positions = batch_positions(step, len(self.images), self.cfg.train.batch_size, self.cfg.train.seed)
        positions = positions[self.part]
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


@dataclass
class StepBatch:
    """The inputs of one training step: features B×L×N×D, attn B×A×N×N, cams B×K×h×w, cam_classes B×K,
    image B×3×H×W (normalised), valid B×H×W (false on padding; reported, not ignored: §0.1 item 8), and mask B×H×W
    int64, the GT mask crops (`gt_mask`, 255 = ignore and padding) of a cache that stores them (`extract.store_masks`)."""
    features: torch.Tensor
    attn: torch.Tensor
    cams: torch.Tensor
    cam_classes: torch.Tensor
    image: torch.Tensor
    valid: torch.Tensor
    grid: tuple[int, int]
    mask: torch.Tensor | None = None


class Source(Protocol):
    """Where a run's step inputs come from: what a checkpoint records (fingerprint, class names), the decoder's input
    shape, and `dataset(start, stop, part)` (item i = the rows `part` of the batch of step start + i, for a
    DataLoader with batch_size=None) / `prepare(item)` (that batch on the device as a StepBatch)."""
    kind: str  # "cache" or "online"
    cfg: Config  # the run's config (for a cache: with the settings the cache fixes)
    fingerprint: dict[str, Any]
    classes: ClassSet  # the class set the CAMs were prompted with
    in_layers: int
    in_dim: int
    grid: tuple[int, int]
    n_samples: int

    def dataset(self, start: int, stop: int, part: slice = slice(None)) -> Dataset: ...

    def prepare(self, item: dict[str, Any]) -> StepBatch: ...


class CachedSource:
    """The committed samples of a feature cache. The run's config is `cfg` with the settings the cache fixes
    (`pipeline.provenance.adopt`: a contradicting setting in `explicit` is an error; None = all of `cfg`).
    A cache with planned shards that have no commit record is refused unless `allow_partial`, which trains on the
    committed samples with a warning."""

    def __init__(self, cfg: Config, cache_path: str | Path, device: torch.device,
                 explicit: Iterable[str] | None = None, allow_partial: bool = False):
        reader = CacheReader(str(cache_path))  # NotACache names the path; damaged shard files raise CacheError
        source = f"the feature cache at {cache_path}"
        rows = _training_rows(reader, cfg.train.views, cache_path, allow_partial)
        recorded, self.classes = cache_provenance(reader.provenance, reader.fingerprint, source)
        cfg = adopt(cfg, recorded, explicit, source)
        check_moved_backbone(cfg, reader.fingerprint["checkpoint"], source)
        spec = reader.spec
        self.kind, self.fingerprint = "cache", reader.fingerprint
        self.in_layers, self.in_dim, self.grid, self.n_samples = spec.feature_layers, spec.dim, spec.grid, len(rows)
        if cfg.train.supervised and not spec.masks:
            raise TrainError(f"train.supervised (--supervised) learns from ground-truth mask crops, but the feature "
                             f"cache at {cache_path} stores none; extract it with --store-masks (extract.store_masks) "
                             "from a manifest with masks, or train without --supervised")
        if cfg.refine.static_layers > spec.attn_layers or cfg.refine.rfm_layers > spec.attn_layers:
            raise TrainError(f"refine.static_layers = {cfg.refine.static_layers} and refine.rfm_layers = "
                             f"{cfg.refine.rfm_layers} need that many attention maps, but the cache at {cache_path} "
                             f"stores {spec.attn_layers}; lower them or extract with more extract.attn_layers")
        self.root, self.rows, self.cfg, self.device = str(cache_path), rows, cfg, device

    def dataset(self, start: int, stop: int, part: slice = slice(None)) -> Dataset:
        return CachedSteps(self.root, self.rows, self.grid, start, stop, self.cfg, part)

    def prepare(self, item: dict[str, Any]) -> StepBatch:
        def dev(name: str) -> torch.Tensor:
            return torch.as_tensor(item[name]).to(self.device, non_blocking=True)
        return StepBatch(features=dev("features"), attn=dev("attn"), cams=dev("cams"),
                         cam_classes=dev("cam_classes").long(),
                         image=normalise(dev("image"), self.cfg.model.normalisation), valid=dev("valid"),
                         grid=self.grid, mask=dev("gt_mask").long() if "gt_mask" in item else None)


class OnlineSource:
    def __init__(self, cfg: Config, manifest_path: str | Path, device: torch.device,
                 model_configs: Sequence[str | Path] = ()):
        if cfg.train.views is not None:
            raise TrainError(f"train.views = {cfg.train.views} selects views of a feature cache; online training "
                             "draws a fresh view every epoch. Leave train.views unset with --online")
        if cfg.train.supervised:
            raise TrainError("train.supervised (--supervised) trains from the GT mask crops of a feature cache; "
                             "online training has none. Extract with --store-masks and train with --cache")
        # The backbone's outputs are used as they come, so the equivalent cache is one without 8-bit codings.
        cfg = cfg.replace(extract={"features_storage": "plain", "attn_storage": "plain"})
        self.plan: ExtractPlan = make_plan(read_manifest(manifest_path), cfg)
        self.classes = self.plan.classes
        self.backbone = load_backbone(cfg.model, device, model_configs)
        self.kind, self.n_samples = "online", len(self.plan.images)
        self.fingerprint = cache_fingerprint(cfg, self.plan, self.backbone)
        self.in_layers, self.in_dim = len(cfg.extract.feature_layers), self.backbone.width
        self.grid = crop_grid(cfg.aug.crop, self.backbone.patch_size)
        self.text = text_embeddings(self.backbone, self.classes, cfg.text.template)
        self.cfg, self.device = cfg, device

    def dataset(self, start: int, stop: int, part: slice = slice(None)) -> Dataset:
        return OnlineCrops(self.plan.images, start, stop, self.cfg, part)

    def prepare(self, item: dict[str, Any]) -> StepBatch:
        image = normalise(torch.as_tensor(item["image"]).to(self.device), self.cfg.model.normalisation)
        labels = [self.plan.images[int(p)].labels for p in item["positions"]]
        cams = softmax_gradcam(self.backbone, image, labels, self.text, self.cfg.extract.feature_layers,
                               self.cfg.extract.attn_layers, k_max=self.plan.k_max)
        return StepBatch(features=cams.features, attn=cams.attn, cams=cams.cams, cam_classes=cams.cam_classes,
                         image=image, valid=torch.as_tensor(item["valid"]).to(self.device), grid=cams.grid)


def _training_rows(reader: CacheReader, views: int | None, cache_path: str | Path,
                   allow_partial: bool = False) -> np.ndarray:
    """The sorted committed rows the run trains on: all, or those of views 0..views-1 (`train.views`).

    An incomplete cache (an extraction that stopped early) would silently train on fewer, unevenly drawn samples:
    it is refused, or with `allow_partial` used with a warning.

    Rows are numbered image-major (row = image · extract.views + view), so the rows of the first k views of a
    cache, in order, visit the images exactly as a k-view cache of the same images does: a run with
    train.views = k gets the batches of a run on that k-view cache."""
    index = reader.index
    if not index.num_rows:
        raise TrainError(f"the feature cache at {cache_path} has no committed samples; run `weclip extract` "
                         "to completion (it resumes) before training")
    _check_complete(reader, cache_path, allow_partial)
    rows, view = index.column("row").to_numpy(), index.column("view").to_numpy()
    if views is not None:
        stored = int(reader.fingerprint["views"])
        if not 1 <= views <= stored:
            raise TrainError(f"train.views = {views}, but the feature cache at {cache_path} holds {stored} views "
                             f"per image; choose 1..{stored} (or leave train.views unset to use them all)")
        rows = rows[view < views]
    return np.sort(rows)


def _check_complete(reader: CacheReader, cache_path: str | Path, allow_partial: bool) -> None:
    """Refuse a cache with uncommitted planned shards, naming them; with `allow_partial`, warn instead."""
    missing = sorted(set(range(reader.spec.n_shards)) - reader.committed())
    if not missing:
        return
    what = (f"the feature cache at {cache_path} is incomplete: {len(missing)} of {reader.spec.n_shards} planned "
            f"shards have no commit record (shards {first_few(missing)}), {reader.index.num_rows} of "
            f"{reader.spec.total_samples} planned samples are committed")
    if not allow_partial:
        raise TrainError(f"{what}; rerun `weclip extract` with the same settings and --out (it resumes), or pass "
                         "--allow-partial to train on the committed samples")
    warnings.warn(f"{what}; training on those (--allow-partial)", stacklevel=2)
