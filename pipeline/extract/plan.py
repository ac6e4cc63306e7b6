"""The plan of `weclip extract`: which samples exist and which shard holds each (docs/design.md §3.2, §3.3).

Images of the manifest (manifest order) × `views` views; sample `row = image_index · views + view`; shard `s` holds
rows `[s · samples_per_shard, (s + 1) · samples_per_shard)`. The plan depends only on the manifest and the config,
never on the workers, so a shard's name and content are fixed before any work starts. The cache's fingerprint and
spec follow from the plan and the backbone.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from weclip.pipeline.cache.fingerprint import fingerprint_from_config
from weclip.pipeline.cache.schema import CacheSpec
from weclip.pipeline.cache.store import first_few
from weclip.pipeline.config import Config, ExtractConfig
from weclip.pipeline.data.manifest import Manifest
from weclip.pipeline.errors import BackboneError, ConfigError, DataError
from weclip.pipeline.files import is_url, join_location
from weclip.pipeline.model.protocol import Backbone
from weclip.pipeline.model.text import ClassSet, manifest_class_set


@dataclass(frozen=True)
class PlannedImage:
    """One manifest image as the plan sees it. `path` is absolute (workers may run elsewhere), and so is `mask_path`,
    the ground-truth mask, set only when the run stores mask crops (`extract.store_masks`)."""
    image_id: str
    path: str
    labels: tuple[int, ...]
    height: int
    width: int
    mask_path: str | None = None


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
    """The samples of a cache and their shards; `classes` is the class set the CAMs prompt (the manifest's)."""
    images: tuple[PlannedImage, ...]
    views: int
    samples_per_shard: int
    classes: ClassSet

    def __post_init__(self) -> None:
        if not self.images:
            raise DataError("the extract plan has no image; check the manifest (and --limit)")
        if self.views < 1 or self.samples_per_shard < 1:
            raise ConfigError(f"extract.views and extract.samples_per_shard must be positive, got "
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


def make_plan(manifest: Manifest, cfg: Config, limit: int | None = None) -> ExtractPlan:
    """The plan of a manifest: its first `limit` images (all when None), in manifest order, prompted with the
    manifest's class set (`pipeline.model.text.manifest_class_set`)."""
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive number of images, got {limit}")
    table = manifest.table.slice(0, limit)  # read column by column: no row objects for 100k-image manifests
    ids, relative, labels, heights, widths, masks = (
        table.column(name).to_pylist() for name in ("image_id", "image_path", "labels", "height", "width", "mask_path"))
    if cfg.extract.store_masks:
        require_masks(manifest, ids, masks)
        masks = resolved_paths(manifest.root, masks)
    else:
        masks = [None] * len(ids)
    images = tuple(PlannedImage(i, path, tuple(lab), h, w, mask) for i, path, lab, h, w, mask
                   in zip(ids, resolved_paths(manifest.root, relative), labels, heights, widths, masks))
    return ExtractPlan(images, cfg.extract.views, cfg.extract.samples_per_shard, manifest_class_set(manifest, cfg.text))


def require_masks(manifest: Manifest, ids: Sequence[str], masks: Sequence[str | None]) -> None:
    """`extract.store_masks` needs a ground-truth mask for every planned image; name the manifest and the first few
    images without one."""
    lacking = [i for i, mask in zip(ids, masks) if mask is None]
    if lacking:
        raise DataError(f"extract.store_masks (--store-masks) needs a mask for every image, but manifest "
                        f"{manifest.path} has none for {len(lacking)} of {len(ids)} images ({first_few(lacking)}); "
                        "build the manifest from a dataset with masks, or extract without --store-masks")


def resolved_paths(root: str | Path, relative: Sequence[str]) -> list[str]:
    """`str((root / path).resolve())` of every ("/"-separated) path, resolving each distinct folder once (a dataset has
    a few, its images 100k): the folders' symlinks and `..` are resolved, an image file that is itself a symlink is
    kept as named (opening it reads the same file). Under a URL root (images on an object store): `root/path`."""
    if is_url(root):
        return [str(join_location(root, path)) for path in relative]
    root = Path(root)
    prefixes: dict[str, str] = {}
    paths = []
    for path in relative:
        folder, sep, name = path.rpartition("/")
        folder = folder or sep  # "a.jpg": the root itself; "/a.jpg": "/"
        if folder not in prefixes:
            resolved = str((root / folder).resolve())
            prefixes[folder] = resolved if resolved.endswith("/") else resolved + "/"
        paths.append(prefixes[folder] + name)
    return paths


def check_layers(cfg: ExtractConfig, backbone: Backbone) -> None:
    """Stored layers are absolute 1-based blocks (docs/design.md §3.2); refuse ones the model does not have."""
    n = backbone.num_blocks
    for name in ("feature_layers", "attn_layers"):
        layers = getattr(cfg, name)
        if list(layers) != sorted(set(layers)) or not all(1 <= layer <= n for layer in layers):
            raise BackboneError(f"extract.{name} = {list(layers)}: layers must be distinct ascending 1-based blocks in "
                             f"1..{n} of model {backbone.name!r} ({n} blocks). Set extract.{name} for this model "
                             f"(its preset, or --set extract.{name}=[...])")


def crop_grid(crop: int, patch_size: int) -> tuple[int, int]:
    """Patch grid of a crop; the crop must be a multiple of the patch size (docs/algorithm.md §1: 320 → 20×20)."""
    if crop % patch_size:
        raise BackboneError(f"aug.crop = {crop} is not a multiple of the model's patch size {patch_size}")
    return crop // patch_size, crop // patch_size


def cache_fingerprint(cfg: Config, plan: ExtractPlan, backbone: Backbone) -> dict[str, Any]:
    """The fingerprint of the cache of a plan, after checking the layers and the crop; online training records the
    same one, so a checkpoint names the cache it is equivalent to. Its `checkpoint` is the backbone's identity,
    which tells random initialisations apart too."""
    check_layers(cfg.extract, backbone)
    return fingerprint_from_config(cfg, grid=crop_grid(cfg.aug.crop, backbone.patch_size),
                                   prompts=plan.classes.prompts(cfg.text.template), class_names=plan.classes.classes,
                                   manifest=[(i.image_id, i.labels) for i in plan.images],
                                   checkpoint=backbone.identity)


def cache_layout(cfg: Config, plan: ExtractPlan, backbone: Backbone) -> tuple[dict[str, Any], CacheSpec]:
    """Fingerprint and spec of the cache of a plan (docs/design.md §3.2)."""
    fingerprint = cache_fingerprint(cfg, plan, backbone)
    grid = crop_grid(cfg.aug.crop, backbone.patch_size)
    spec = CacheSpec(total_samples=plan.total_samples, samples_per_shard=plan.samples_per_shard,
                     feature_layers=len(cfg.extract.feature_layers), attn_layers=len(cfg.extract.attn_layers),
                     grid=grid, dim=backbone.width, k_max=plan.k_max, crop=cfg.aug.crop, dtype=cfg.extract.dtype,
                     compressor=cfg.extract.compressor, features_storage=cfg.extract.features_storage,
                     features_compressor=cfg.extract.features_compressor, attn_storage=cfg.extract.attn_storage,
                     attn_compressor=cfg.extract.attn_compressor, masks=cfg.extract.store_masks)
    return fingerprint, spec
