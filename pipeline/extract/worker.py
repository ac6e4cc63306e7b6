"""The work of `weclip extract`, without orchestration (DESIGN.md §3.2, §3.3; Ray lives in stages/extract.py).

* The **plan**: images of the manifest (manifest order) × `views` views; sample `row = image_index · views + view`;
  shard `s` holds rows `[s · samples_per_shard, (s + 1) · samples_per_shard)`. It depends only on the manifest and
  the config, never on the workers, so a shard's name and content are fixed before any work starts.
* The **per-process backbone cache**: a worker process loads the frozen model once (`load_backbone`) and reuses it
  for every shard it runs.
* **One shard**: decode each image (a missing / empty / corrupt file becomes a recorded skip), draw its views from
  (seed, image_id, view) (ALGORITHM.md §7.1), crop, normalise, run `softmax_gradcam` in batches, convert to the cache
  dtype and hand everything to `CacheWriter.write_shard`, which commits last.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from pipeline.data.augment import ViewParams, apply_view, draw_view, normalise, valid_mask
from pipeline.model.backbone import FrozenCLIP, register_model_configs
from pipeline.cache.fingerprint import fingerprint_from_config
from pipeline.cache.schema import CacheSpec
from pipeline.cache.store import CacheWriter
from pipeline.model.cam import softmax_gradcam
from pipeline.config import Config, ExtractConfig, ModelConfig
from pipeline.data.images import ImageDecodeError, load_manifest_rgb
from pipeline.data.manifest import Manifest
from pipeline.model.text import TextEmbeddings, class_set, prompts, text_embeddings


@dataclass(frozen=True)
class PlannedImage:
    """One manifest image as the plan sees it. `path` is absolute (workers may run elsewhere)."""
    image_id: str
    path: str
    labels: tuple[int, ...]
    height: int
    width: int


@dataclass(frozen=True)
class PlannedSample:
    row: int
    image: PlannedImage
    view: int

    @property
    def sample_id(self) -> str:
        return f"{self.image.image_id}#{self.view}"


@dataclass(frozen=True)
class ShardTask:
    """The unit of work: one planned shard and its samples, in increasing `row` order."""
    shard: int
    samples: tuple[PlannedSample, ...]


@dataclass(frozen=True)
class ExtractPlan:
    images: tuple[PlannedImage, ...]
    views: int
    samples_per_shard: int

    def __post_init__(self) -> None:
        if not self.images:
            raise ValueError("the extract plan has no image; check the manifest (and --limit)")
        if self.views < 1 or self.samples_per_shard < 1:
            raise ValueError(f"extract.views and extract.samples_per_shard must be positive, got "
                             f"{self.views} and {self.samples_per_shard}")

    @property
    def total_samples(self) -> int:
        return len(self.images) * self.views

    @property
    def n_shards(self) -> int:
        return -(-self.total_samples // self.samples_per_shard)

    @property
    def k_max(self) -> int:
        """CAM slots per sample: the most classes one image carries."""
        return max(len(image.labels) for image in self.images)

    def task(self, shard: int) -> ShardTask:
        if not 0 <= shard < self.n_shards:
            raise IndexError(f"shard {shard} outside the plan's 0..{self.n_shards - 1}")
        start = shard * self.samples_per_shard
        rows = range(start, min(start + self.samples_per_shard, self.total_samples))
        return ShardTask(shard, tuple(PlannedSample(r, self.images[r // self.views], r % self.views) for r in rows))


def make_plan(manifest: Manifest, cfg: ExtractConfig, limit: int | None = None) -> ExtractPlan:
    """The plan of a manifest: its first `limit` images (all when None), in manifest order."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of images, got {limit}")
    rows = manifest.rows[:limit]
    images = tuple(PlannedImage(r.image_id, str(manifest.image_abspath(r).resolve()), tuple(r.labels), r.height,
                                r.width) for r in rows)
    return ExtractPlan(images, cfg.views, cfg.samples_per_shard)


def check_layers(cfg: ExtractConfig, backbone: FrozenCLIP) -> None:
    """Stored layers are absolute 1-based blocks (DESIGN.md §3.2); refuse ones the model does not have."""
    n = backbone.num_blocks
    for name in ("feature_layers", "attn_layers"):
        layers = getattr(cfg, name)
        if list(layers) != sorted(set(layers)) or not all(1 <= layer <= n for layer in layers):
            raise ValueError(f"extract.{name} = {list(layers)}: layers must be distinct ascending 1-based blocks in "
                             f"1..{n} of model {backbone.name!r} ({n} blocks). Set extract.{name} for this model "
                             f"(its preset, or --set extract.{name}=[...])")


def crop_grid(crop: int, patch_size: int) -> tuple[int, int]:
    """Patch grid of a crop; the crop must be a multiple of the patch size (ALGORITHM.md §1: 320 → 20×20)."""
    if crop % patch_size:
        raise ValueError(f"aug.crop = {crop} is not a multiple of the model's patch size {patch_size}")
    return crop // patch_size, crop // patch_size


def all_prompts(cfg: Config) -> list[str]:
    """Every prompt the CAMs use, in order: the class names (with synonyms), then the background names."""
    classes = class_set(cfg.text.classes)
    return prompts(classes.prompt_names, cfg.text.template) + prompts(classes.background, cfg.text.template)


def cache_layout(cfg: Config, plan: ExtractPlan, backbone: FrozenCLIP) -> tuple[dict[str, Any], CacheSpec]:
    """Fingerprint and spec of the cache of a plan (DESIGN.md §3.2), after checking the layers and the crop.

    The fingerprint's `checkpoint` is the backbone's identity, which tells random initialisations apart too.
    """
    check_layers(cfg.extract, backbone)
    grid = crop_grid(cfg.aug.crop, backbone.patch_size)
    fingerprint = fingerprint_from_config(cfg, grid=grid, prompts=all_prompts(cfg),
                                          class_names=class_set(cfg.text.classes).classes,
                                          manifest=[(i.image_id, i.labels) for i in plan.images],
                                          checkpoint=backbone.identity)
    spec = CacheSpec(total_samples=plan.total_samples, samples_per_shard=plan.samples_per_shard,
                     feature_layers=len(cfg.extract.feature_layers), attn_layers=len(cfg.extract.attn_layers),
                     grid=grid, dim=backbone.width, k_max=plan.k_max, crop=cfg.aug.crop, dtype=cfg.extract.dtype,
                     compressor=cfg.extract.compressor)
    return fingerprint, spec


_BACKBONES: dict[tuple[Any, ...], FrozenCLIP] = {}


def load_backbone(model: ModelConfig, device: str, model_configs: Sequence[str] = ()) -> FrozenCLIP:
    """The frozen backbone of this process, loaded on first use and reused (one load per worker process).

    `model_configs` are extra open_clip config JSONs to register first (e.g. a test's tiny ViT; `FrozenCLIP.load`
    registers the project's own). A random init (`pretrained=None`) is seeded with `model.init_seed`, so every
    process builds the same weights.
    """
    if model_configs:
        register_model_configs(*model_configs)
    key = (model.name, model.pretrained, model.precision, model.init_seed, device)
    if key not in _BACKBONES:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model.init_seed)
            _BACKBONES[key] = FrozenCLIP.load(model.name, model.pretrained, device=device, precision=model.precision)
    return _BACKBONES[key]


@dataclass(frozen=True)
class ExtractJob:
    """What every shard of one run shares; small and picklable (sent to each worker)."""
    cfg: Config
    out: str  # cache root: absolute local path or fsspec URL
    spec: CacheSpec
    fingerprint: dict[str, Any]
    model_configs: tuple[str, ...] = ()
    device: str = "cpu"


@dataclass
class ShardData:
    """`CacheWriter.write_shard`'s arguments for one shard."""
    arrays: dict[str, np.ndarray]
    rows: list[dict[str, Any]]
    skipped: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class ShardOutcome:
    shard: int
    samples: int  # views written
    skipped_views: int  # planned views of skipped images
    nbytes: int  # shard files on disk, all arrays


def decode_images(task: ShardTask) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """RGB arrays of the task's images by id, and the skips ({image_id, reason, detail}) of those that fail."""
    decoded, skipped = {}, []
    for image in dict.fromkeys(s.image for s in task.samples):
        try:
            decoded[image.image_id] = load_manifest_rgb(image.path, image.height, image.width)
        except ImageDecodeError as err:  # reasons: image_missing, image_corrupt, ..., image_size_mismatch
            skipped.append({"image_id": image.image_id, "reason": f"image_{err.reason}", "detail": str(err)})
    return decoded, skipped


def sample_row(sample: PlannedSample, params: ViewParams) -> dict[str, Any]:
    """The index row of a sample: identity, labels (the image's, for every view) and the view parameters."""
    return {"sample_id": sample.sample_id, "image_id": sample.image.image_id, "view": sample.view,
            "row": sample.row, "labels": list(sample.image.labels), **params.to_dict()}


def extract_shard(backbone: FrozenCLIP, text: TextEmbeddings, task: ShardTask, cfg: Config,
                  spec: CacheSpec) -> ShardData:
    """Compute one shard: views → normalised crops → batched Softmax-Grad-CAM → cache dtype."""
    decoded, skipped = decode_images(task)
    samples = [s for s in task.samples if s.image.image_id in decoded]
    params = [draw_view(cfg.extract.seed, s.image.image_id, s.view, s.image.height, s.image.width, cfg.aug)
              for s in samples]
    schemas = spec.arrays()
    arrays = {name: np.empty((len(samples), *schema.shape), _host_dtype(schema.dtype))
              for name, schema in schemas.items()}
    for i, (sample, view) in enumerate(zip(samples, params)):
        arrays["image"][i] = apply_view(decoded[sample.image.image_id], view).transpose(2, 0, 1)
        arrays["valid"][i] = valid_mask(view)
    step = cfg.extract.batch_size
    for start in range(0, len(samples), step):
        batch = slice(start, start + step)
        images = normalise(torch.from_numpy(arrays["image"][batch]).to(backbone.device), cfg.model.normalisation)
        cams = softmax_gradcam(backbone, images, [s.image.labels for s in samples[batch]], text,
                               cfg.extract.feature_layers, cfg.extract.attn_layers, k_max=spec.k_max)
        for name in ("features", "attn", "cams", "cam_classes"):  # cast and copy in one (threaded) torch pass
            torch.from_numpy(arrays[name][batch]).copy_(getattr(cams, name))
    return ShardData(arrays, [sample_row(s, p) for s, p in zip(samples, params)], skipped)


def _host_dtype(dtype: str) -> np.dtype:
    """The numpy dtype an array is assembled in: the cache's logical dtype; bfloat16 as float32, which the cache
    rounds to nearest-even (numpy has no bfloat16), so `ArraySchema.to_storage` otherwise only re-lays arrays out."""
    return np.dtype("float32" if dtype == "bfloat16" else dtype)


def run_shard(job: ExtractJob, task: ShardTask) -> ShardOutcome:
    """Compute and commit one shard in this process (the body of a Ray task, or of the inline loop)."""
    backbone = load_backbone(job.cfg.model, job.device, job.model_configs)
    if backbone.identity != job.fingerprint["checkpoint"]:
        raise RuntimeError(f"the backbone in this worker ({backbone.identity}) is not the one the cache at {job.out} "
                           f"was planned with ({job.fingerprint['checkpoint']}); give every worker the same "
                           "checkpoint file")
    text = text_embeddings(backbone, class_set(job.cfg.text.classes), job.cfg.text.template)
    data = extract_shard(backbone, text, task, job.cfg, job.spec)
    writer = CacheWriter.create_or_open(job.out, job.spec, job.fingerprint)
    commit = writer.write_shard(task.shard, data.arrays, data.rows, data.skipped)
    skipped_ids = {s["image_id"] for s in data.skipped}
    return ShardOutcome(shard=task.shard, samples=len(data.rows),
                        skipped_views=sum(s.image.image_id in skipped_ids for s in task.samples),
                        nbytes=sum(commit.nbytes.values()))
