"""The bill of `weclip extract --dry-run`: what a plan will write and how long it will take, before any of it runs.

Nothing here loads weights, decodes an image or touches the output location. The backbone geometry (patch size,
token width, number of blocks) comes from the model's open_clip config, so a ViT-B/16 plan can be sized on a laptop
without the checkpoint; the cache spec is then the one `pipeline.extract.plan.cache_layout` builds for the run.

Bytes per view of an uncompressed array are exact: the spec's `sample_nbytes` (the stored codes, scales included,
for an 8-bit storage) plus zarr's shard index. A compressed array's size depends on its values, which only a run
produces; it is estimated with the ratio that `benchmarks/cache_storage.py` measured for that array, storage and
compressor (benchmarks/results/cache_storage.json), and shown at its raw size, marked "not measured", where that
benchmark has no figure for it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import open_clip
from open_clip.model import CLIPVisionCfg

from weclip.pipeline.cache.schema import ArraySchema, CacheSpec, compressor_codecs
from weclip.pipeline.config import Config
from weclip.pipeline.errors import BackboneError, ConfigError
from weclip.pipeline.extract.plan import ExtractPlan, cache_layout
from weclip.pipeline.model.backbone import MODEL_CONFIG_DIR, register_model_configs

# zarr v3 sharding: each shard file ends in an index of one (offset, length) uint64 pair per chunk slot (= sample;
# a short last shard still has `samples_per_shard` slots) and the index's crc32c; every chunk ends in its own crc32c
# (pipeline/cache/store.py). An uncompressed array takes exactly its samples' sample_nbytes plus their checksums plus
# that index per shard (tests/stages/test_extract_dry_run.py checks it on disk).
INDEX_BYTES_PER_SLOT = 16
INDEX_CHECKSUM_BYTES = 4
CHUNK_CHECKSUM_BYTES = 4

# raw / stored bytes per sample (shard index included) per "<array>:<storage>" and compressor, from
# benchmarks/results/cache_storage.json: ViT-B-16-quickgelu with random weights, crop 320, float16, 8 samples per shard.
# tests/extract/test_estimate.py keeps it equal to the file; rerun the benchmark and update both together.
MEASURED_RATIOS: dict[str, dict[str, float]] = {
    "features:plain": {"zstd:1": 1.0889, "zstd:3": 1.0889, "blosc-zstd:1": 1.0866, "blosc-lz4": 1.0001},
    "features:int8": {"zstd:1": 1.0865, "zstd:3": 1.0865, "blosc-zstd:1": 1.0839, "blosc-lz4": 1},
    "features:fp8": {"zstd:1": 1.2143, "zstd:3": 1.2145, "blosc-zstd:1": 1.2144, "blosc-lz4": 1},
    "attn:plain": {"zstd:1": 1.4204, "zstd:3": 1.4358, "blosc-zstd:1": 1.5654, "blosc-lz4": 1.3395},
    "attn:uint8": {"zstd:1": 1.2119, "zstd:3": 1.2124, "blosc-zstd:1": 1.221, "blosc-lz4": 1},
    "attn:log8": {"zstd:1": 2.1873, "zstd:3": 2.0891, "blosc-zstd:1": 2.1945, "blosc-lz4": 1.106},
    "cams:plain": {"zstd:1": 3.3229, "zstd:3": 3.6364, "blosc-zstd:1": 3.2213, "blosc-lz4": 2.8492},
    "cam_classes:plain": {"zstd:1": 0.2388, "zstd:3": 0.2388, "blosc-zstd:1": 0.1975, "blosc-lz4": 0.1975},
    "image:plain": {"zstd:1": 1.096, "zstd:3": 1.0965, "blosc-zstd:1": 1.102, "blosc-lz4": 1.0158},
    "valid:plain": {"zstd:1": 2592.41, "zstd:3": 2592.41, "blosc-zstd:1": 723.036, "blosc-lz4": 225.799},
}
MEASURED_DTYPE = "float16"  # the ratios of float arrays stored plain hold for this cache dtype only
MEASURED_ON = ("benchmarks/cache_storage.py (benchmarks/results/cache_storage.json): ViT-B-16-quickgelu with random "
               "weights, crop 320, float16; real weights and other shapes may compress differently")

Basis = Literal["exact", "measured", "not measured"]


@dataclass(frozen=True)
class ConfigGeometry:
    """A model's patch geometry read from its open_clip config: what the cache spec needs of a backbone, without
    building it. `identity` only satisfies `cache_layout`'s fingerprint, which the dry run never shows (the real one
    needs the weights: a checkpoint's sha256 or a digest of the random init)."""
    name: str
    patch_size: int
    width: int
    num_blocks: int

    @property
    def identity(self) -> str:
        return f"{self.name}:weights-not-read"


def config_geometry(name: str, model_configs: Sequence[str | Path] = ()) -> ConfigGeometry:
    """The geometry of open_clip model `name`, after registering the project's configs and `model_configs` the way
    `pipeline.model.backbone.load_backbone` does, so a dry run knows the same models as the run."""
    register_model_configs()
    if model_configs:
        register_model_configs(*model_configs)
    config = open_clip.get_model_config(name)
    if config is None:
        raise BackboneError(f"unknown model {name!r} (model.name): not an open_clip config nor a JSON in "
                            f"{MODEL_CONFIG_DIR}; set model.name to a CLIP ViT config")
    vision = CLIPVisionCfg(**config.get("vision_cfg", {}))
    if vision.timm_model_name or not isinstance(vision.layers, int):
        raise BackboneError(f"model {name!r} (model.name) has a timm or ResNet image tower, not an open_clip "
                            "VisionTransformer; set model.name to a CLIP ViT config")
    return ConfigGeometry(name, int(vision.patch_size), int(vision.width), vision.layers)


@dataclass(frozen=True)
class ArrayEstimate:
    """One cache array over the whole plan: `raw_bytes_per_view` decoded (exact), `stored_bytes` on disk for all
    views (exact, or estimated with `ratio`, see `basis`)."""
    name: str
    shape: tuple[int, ...]
    dtype: str
    storage: str
    compressor: str
    raw_bytes_per_view: int
    stored_bytes: float
    basis: Basis
    ratio: float | None  # raw / stored, when `basis` is "measured"


def measured_ratio(array: ArraySchema) -> float | None:
    """The benchmark's ratio for this array, storage and compressor (any spelling of the same codecs, e.g. "zstd"
    for "zstd:3"); None where it measured none, including float arrays stored plain in another dtype than float16."""
    if array.floating and not array.quantised and array.dtype != MEASURED_DTYPE:
        return None
    codecs = compressor_codecs(array.compressor)
    ratios = MEASURED_RATIOS.get(f"{array.name}:{array.storage}", {})
    return next((ratio for name, ratio in ratios.items() if compressor_codecs(name) == codecs), None)


def array_estimate(array: ArraySchema, spec: CacheSpec) -> ArrayEstimate:
    """Bytes of one array for the plan of `spec`: exact without a compressor, else by the measured ratio, else raw
    (with the shard index, as if uncompressed)."""
    raw = array.sample_nbytes
    basis: Basis = "exact"
    named = (array.name, array.shape, array.dtype, array.storage, array.compressor, raw)
    if compressor_codecs(array.compressor):
        ratio = measured_ratio(array)
        if ratio is not None:
            return ArrayEstimate(*named, spec.total_samples * raw / ratio, "measured", ratio)
        basis = "not measured"
    index = spec.n_shards * (spec.samples_per_shard * INDEX_BYTES_PER_SLOT + INDEX_CHECKSUM_BYTES)
    stored = spec.total_samples * (raw + CHUNK_CHECKSUM_BYTES) + index
    return ArrayEstimate(*named, stored, basis, None)


@dataclass(frozen=True)
class DryRunSummary:
    """What `weclip extract --dry-run` prints: the plan, the cache's size per array and in all, and the time at a
    given throughput (None: unknown)."""
    out: str
    model: str
    patch_size: int
    width: int
    num_blocks: int
    images: int
    views_per_image: int
    views: int
    samples_per_shard: int
    shards: int
    k_max: int
    crop: int
    grid: tuple[int, int]
    dtype: str
    arrays: tuple[ArrayEstimate, ...]
    views_per_s: float | None

    @property
    def raw_bytes_per_view(self) -> int:
        return sum(a.raw_bytes_per_view for a in self.arrays)

    @property
    def stored_bytes(self) -> float:
        return sum(a.stored_bytes for a in self.arrays)

    @property
    def stored_bytes_per_view(self) -> float:
        return self.stored_bytes / self.views

    @property
    def exact(self) -> bool:
        return all(a.basis == "exact" for a in self.arrays)

    @property
    def seconds(self) -> float | None:
        return None if self.views_per_s is None else self.views / self.views_per_s

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "raw_bytes_per_view": self.raw_bytes_per_view,
                "stored_bytes": self.stored_bytes, "stored_bytes_per_view": self.stored_bytes_per_view,
                "exact": self.exact, "seconds": self.seconds}

    def format(self) -> str:
        size = "exact" if self.exact else "estimated"
        lines = [
            f"dry run of feature cache {self.out}: nothing read from or written there",
            f"  plan: {self.images} images x {self.views_per_image} views = {self.views} views in {self.shards} "
            f"shards of {self.samples_per_shard} (up to {self.k_max} classes per image)",
            f"  model {self.model} (its open_clip config, no weights read): patch {self.patch_size}, width "
            f"{self.width}, {self.num_blocks} blocks; crop {self.crop} -> grid {self.grid[0]}x{self.grid[1]}",
            f"  cache dtype {self.dtype}; raw = stored codes before compression, 8-bit storages with their scales",
            f"  {'array':<12} {'shape':<16} {'dtype':<8} {'storage':<7} {'compressor':<13} {'raw B/view':>12} "
            f"{'disk B/view':>12}  size",
        ]
        lines += [f"  {a.name:<12} {'x'.join(map(str, a.shape)):<16} {a.dtype:<8} {a.storage:<7} {a.compressor:<13} "
                  f"{a.raw_bytes_per_view:>12,} {a.stored_bytes / self.views:>12,.0f}  {_basis_text(a)}"
                  for a in self.arrays]
        lines += [
            f"  per view: {self.raw_bytes_per_view / 1e6:.3f} MB raw, {self.stored_bytes_per_view / 1e6:.3f} MB on "
            f"disk ({size})",
            f"  in all: {self.raw_bytes_per_view * self.views / 1e9:.2f} GB raw, {self.stored_bytes / 1e9:.2f} GB on "
            f"disk ({size})",
            f"  time: {self._time_text()}",
        ]
        if any(a.basis == "measured" for a in self.arrays):
            lines.append(f"  measured ratios: {MEASURED_ON}")
        return "\n".join(lines)

    def _time_text(self) -> str:
        if self.seconds is None:
            return ("unknown; give --views-per-s N (a short `weclip extract --limit N` run prints the views/s of "
                    "this machine)")
        hours, rest = divmod(round(self.seconds), 3600)
        return f"{hours}:{rest // 60:02d}:{rest % 60:02d} (h:mm:ss) at {self.views_per_s:g} views/s"


def _basis_text(array: ArrayEstimate) -> str:
    if array.basis == "measured":
        return f"estimated (measured ratio {array.ratio:g})"
    if array.basis == "not measured":
        return "raw size shown (compression not measured for this storage, compressor and dtype)"
    return "exact"


def dry_run(cfg: Config, plan: ExtractPlan, out: str, model_configs: Sequence[str | Path] = (),
            views_per_s: float | None = None) -> DryRunSummary:
    """The bill of extracting `plan` into `out`, from the config alone: the spec `cache_layout` would build for the
    run (its layer and crop checks included), each array's bytes, and the time at `views_per_s` views/s."""
    if views_per_s is not None and not views_per_s > 0:
        raise ConfigError(f"--views-per-s must be a positive number of views per second, got {views_per_s}")
    geometry = config_geometry(cfg.model.name, model_configs)
    _, spec = cache_layout(cfg, plan, geometry)  # the fingerprint, which needs the weights, is dropped
    return DryRunSummary(
        out=out, model=geometry.name, patch_size=geometry.patch_size, width=geometry.width,
        num_blocks=geometry.num_blocks, images=len(plan.images), views_per_image=plan.views, views=spec.total_samples,
        samples_per_shard=spec.samples_per_shard, shards=spec.n_shards, k_max=spec.k_max, crop=spec.crop,
        grid=spec.grid, dtype=spec.dtype,
        arrays=tuple(array_estimate(a, spec) for a in spec.arrays().values()), views_per_s=views_per_s)
