"""One shard of `weclip extract`, computed and committed in this process (the body of a Ray task or of the inline
loop; Ray itself lives in stages/extract.py).

Decode each image (a missing / empty / corrupt file becomes a recorded skip), draw its views from (seed, image_id,
view) (docs/algorithm.md §7.1), crop, normalise, run `softmax_gradcam` in batches, convert to the cache dtype and hand
everything to `CacheWriter.write_shard`, which commits last. A worker process loads the frozen model once
(`pipeline.model.backbone.load_backbone`) and reuses it for every shard it runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from weclip.pipeline.cache.schema import CacheSpec
from weclip.pipeline.cache.store import CacheWriter
from weclip.pipeline.config import IGNORE_INDEX, Config
from weclip.pipeline.data.augment import ViewParams, apply_view, draw_view, normalise, valid_mask
from weclip.pipeline.data.images import ImageDecodeError, load_manifest_mask, load_manifest_rgb
from weclip.pipeline.errors import ExtractError
from weclip.pipeline.extract.plan import PlannedSample, ShardTask
from weclip.pipeline.model.backbone import load_backbone
from weclip.pipeline.model.cam import softmax_gradcam
from weclip.pipeline.model.protocol import CLIPBackbone
from weclip.pipeline.model.text import ClassSet, TextEmbeddings, text_embeddings
from weclip.pipeline.storage import use_storage_options


@dataclass(frozen=True)
class ExtractJob:
    """What every shard of one run shares; small and picklable (sent to each worker)."""
    cfg: Config
    out: str  # cache root: absolute local path or fsspec URL
    spec: CacheSpec
    fingerprint: dict[str, Any]
    classes: ClassSet  # the class set the CAMs prompt
    model_configs: tuple[str, ...] = ()
    device: str = "cpu"
    # the driver's fsspec storage options (`pipeline.storage`): sent to the workers with the job, never printed
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)


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


# What runs one shard task: computes the shard, commits it through `CacheWriter.write_shard`, reports the outcome.
# Ray pickles it into every task. `run_shard` is the real one; benchmarks/driver_scale.py drives the stage with a
# stand-in that writes small arrays.
ShardWorker = Callable[[ExtractJob, ShardTask], ShardOutcome]


@dataclass(frozen=True)
class Decoded:
    """One image of a shard, decoded: RGB H×W×3, and its H×W ground-truth mask when the run stores mask crops."""
    rgb: np.ndarray
    mask: np.ndarray | None = None


def decode_images(task: ShardTask) -> tuple[dict[str, Decoded], list[dict[str, Any]]]:
    """The task's images by id (with their masks, where the plan has mask paths), and the skips ({image_id, reason,
    detail}) of those whose image or mask fails to decode."""
    decoded, skipped = {}, []
    for image in dict.fromkeys(s.image for s in task.samples):
        try:
            rgb = load_manifest_rgb(image.path, image.height, image.width)
        except ImageDecodeError as err:  # reasons: image_missing, image_corrupt, ..., image_size_mismatch
            skipped.append({"image_id": image.image_id, "reason": f"image_{err.reason}", "detail": str(err)})
            continue
        try:
            mask = None if image.mask_path is None else load_manifest_mask(image.mask_path, image.height, image.width)
        except ImageDecodeError as err:  # mask_missing, mask_corrupt, ..., mask_size_mismatch
            skipped.append({"image_id": image.image_id, "reason": f"mask_{err.reason}", "detail": str(err)})
            continue
        decoded[image.image_id] = Decoded(rgb, mask)
    return decoded, skipped


def sample_row(sample: PlannedSample, params: ViewParams) -> dict[str, Any]:
    """The index row of a sample: identity, labels (the image's, for every view) and the view parameters."""
    return {"sample_id": sample.sample_id, "image_id": sample.image.image_id, "view": sample.view,
            "row": sample.row, "labels": list(sample.image.labels), **params.to_dict()}


def extract_shard(backbone: CLIPBackbone, text: TextEmbeddings, task: ShardTask, cfg: Config,
                  spec: CacheSpec) -> ShardData:
    """Compute one shard: views → normalised crops (and GT mask crops, `spec.masks`) → batched Softmax-Grad-CAM →
    cache dtype."""
    decoded, skipped = decode_images(task)
    samples = [s for s in task.samples if s.image.image_id in decoded]
    params = [draw_view(cfg.extract.seed, s.image.image_id, s.view, s.image.height, s.image.width, cfg.aug)
              for s in samples]
    schemas = spec.arrays()
    arrays = {name: np.empty((len(samples), *schema.shape), _host_dtype(schema.dtype))
              for name, schema in schemas.items()}
    for i, (sample, view) in enumerate(zip(samples, params)):
        image = decoded[sample.image.image_id]
        arrays["image"][i] = apply_view(image.rgb, view).transpose(2, 0, 1)
        arrays["valid"][i] = valid_mask(view)
        if spec.masks:  # the same geometry, nearest neighbour, padding = ignore (docs/algorithm.md §8.2)
            arrays["gt_mask"][i] = apply_view(image.mask, view, nearest=True, fill=IGNORE_INDEX)
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
    """Compute and commit one shard in this process (the body of a Ray task, or of the inline loop): the default
    `ShardWorker`."""
    if job.storage_options:
        use_storage_options(job.storage_options)  # a Ray worker on another node: the driver's, for images and cache
    backbone = load_backbone(job.cfg.model, job.device, job.model_configs)
    if backbone.identity != job.fingerprint["checkpoint"]:
        raise ExtractError(f"the backbone in this worker ({backbone.identity}) is not the one the cache at {job.out} "
                           f"was planned with ({job.fingerprint['checkpoint']}); give every worker the same "
                           "checkpoint file")
    text = text_embeddings(backbone, job.classes, job.cfg.text.template)
    data = extract_shard(backbone, text, task, job.cfg, job.spec)
    writer = CacheWriter.create_or_open(job.out, job.spec, job.fingerprint)
    commit = writer.write_shard(task.shard, data.arrays, data.rows, data.skipped)
    skipped_ids = {s["image_id"] for s in data.skipped}
    return ShardOutcome(shard=task.shard, samples=len(data.rows),
                        skipped_views=sum(s.image.image_id in skipped_ids for s in task.samples),
                        nbytes=sum(commit.nbytes.values()))
