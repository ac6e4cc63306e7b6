"""The feature cache schema, in one place (docs/design.md §3.2).

A cache is one Zarr v3 group. Each stored quantity is one array whose leading axis is the global sample
position (`row`); chunk = one sample, shard = one work unit of `samples_per_shard` consecutive rows, so a
work unit writes exactly one shard file per array. Next to the arrays the store holds:

    _commits/shard-000012.json   one commit record per finished shard, written last (§3.3)
    index.parquet                one row per committed sample      (written by `CacheWriter.finalize`)
    shards.parquet               one row per planned shard
    skipped.parquet              one row per image that failed to decode
    config.json                  the resolved config of the extract run that created the cache

Per-sample arrays, declared by `CacheSpec.arrays()` (ViT-B/16, crop 320: grid 20×20, N=400, D=768):

    features     L_dec × N × D      float   patch tokens of the decoder's blocks (CLS dropped)
    attn         L_attn × N × N     float   head-averaged patch-to-patch attention
    cams         K_max × h × w      float   Softmax-Grad-CAM per present class, min-max normalised
    cam_classes  K_max              int16   class id per CAM slot, −1 = empty
    image        3 × crop × crop    uint8   the augmented crop
    valid        crop × crop        bool    false on padding
    gt_mask      crop × crop        uint8   ground-truth mask crop, 255 = ignore and padding (only with `masks`)

"float" is the cache dtype: float16 (default), float32 or bfloat16, which is what `features` and `attn` are stored as
with storage "plain". Their other storages are 8-bit codings along the last axis (`pipeline.cache.quantize`):
`features` int8 or fp8 (e4m3) per token, `attn` uint8 or log8 per row, each vector followed by its float32 scale, so
the stored array is (..., D + 4) of 8-bit codes (`ArraySchema.stored_shape`) and still one chunk per sample; reading
decodes them to float32 (`ArraySchema.from_storage`). Each array has its own compressor (`CacheSpec`). Zarr 3 has no bfloat16 data type, so
bfloat16 is stored as its raw bits in uint16 (array attribute `weclip_dtype: bfloat16`) and decoded to
float32 on read, which is exact. Rows of a skipped image are never written and read as the fill value.

Every chunk ends with a crc32c checksum (the store appends that codec to each array's chain, `store._create`),
verified on every read (by `pipeline/cache/fastread.py` for batch reads, by zarr for `verify` and any other zarr
reader); the shard index carries its own (zarr's default index codecs). A damaged chunk
or index then fails to decode instead of reading as wrong values.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import BloscCodec, ZstdCodec

from weclip.pipeline.cache import quantize
from weclip.pipeline.config import IGNORE_INDEX
from weclip.pipeline.errors import CacheError, ConfigError

# The store's format (root attribute, commit records). 2: a crc32c checksum ends every chunk's codec chain.
# 3: a storage and a compressor per float array (8-bit codings with their scales inside the chunk).
SCHEMA_VERSION = 3
KNOWN_SCHEMA_VERSIONS = frozenset({3})
# The fingerprint's `schema_version`: what the arrays hold. A change of the bytes on disk only (format 2) leaves it,
# so the digest, and with it a checkpoint trained on the old cache, stays valid for the re-extracted cache.
# 2: features and attention may hold 8-bit codings (fingerprint keys features_storage, attn_storage).
CONTENT_VERSION = 2

ROOT_ATTR = "weclip_cache"  # root group attribute holding {schema_version, fingerprint, spec}
DTYPE_ATTR = "weclip_dtype"  # array attribute: the logical dtype when it differs from the stored one
STORAGE_ATTR = "weclip_storage"  # array attribute: "plain" or the 8-bit coding (ArraySchema.storage)
COMMIT_PREFIX = "_commits/"
INDEX_KEY = "index.parquet"
SHARDS_KEY = "shards.parquet"
SKIPPED_KEY = "skipped.parquet"
CONFIG_KEY = "config.json"  # the extract run's resolved config, readable

FloatDtype = Literal["float16", "float32", "bfloat16"]
FLOAT_DTYPES: tuple[FloatDtype, ...] = ("float16", "float32", "bfloat16")
# How an array is stored: "plain" = its own dtype (the cache dtype for floats), else a `quantize` coding.
Storage = Literal["plain", "int8", "fp8", "uint8", "log8"]
FEATURE_STORAGES: tuple[Storage, ...] = ("plain", "int8", "fp8")  # per token (D-vector)
ATTN_STORAGES: tuple[Storage, ...] = ("plain", "uint8", "log8")  # per attention row (probabilities)

# Keys every sample row given to `CacheWriter.write_shard` must carry; other keys (augmentation parameters)
# become extra index columns. `row` is the global sample position fixed by the plan.
REQUIRED_ROW_KEYS = ("sample_id", "image_id", "view", "row", "labels")
REQUIRED_SKIP_KEYS = ("image_id", "reason")
ROW_TYPES: dict[str, pa.DataType] = {
    "sample_id": pa.string(),
    "image_id": pa.string(),
    "view": pa.int32(),
    "shard": pa.int32(),
    "row": pa.int64(),
    "labels": pa.list_(pa.int16()),
}
SHARD_TYPES: dict[str, pa.DataType] = {  # then one `bytes_<array>` column per array (`shard_types`)
    "shard": pa.int32(),
    "status": pa.string(),  # "committed" | "missing"
    "n_samples": pa.int32(),
    "n_skipped": pa.int32(),
    "checksum": pa.string(),  # sha256 over the per-array checksums, in the spec's array order
    "bytes": pa.int64(),  # shard files on disk, all arrays
}
SKIPPED_TYPES: dict[str, pa.DataType] = {"image_id": pa.string(), "reason": pa.string(), "shard": pa.int32()}

# Compressor names: "<family>[:level]". Blosc families apply a byte shuffle (or bit shuffle, "-bit") of the
# element size before compressing, which groups the exponent bytes of float16 values together.
_COMPRESSOR_FAMILIES = {
    "none": None,
    "zstd": 3,
    "blosc-lz4": 5,
    "blosc-zstd": 3,
    "blosc-lz4-bit": 5,
    "blosc-zstd-bit": 3,
}


@dataclass(frozen=True)
class CacheSpec:
    """Shapes and layout of one cache; stored in the root attributes and compared on reopen.

    `grid` is the patch grid (h, w) of the crop; `dim` the token width D; `k_max` the most classes an image
    of the dataset carries; `masks` whether the GT mask crop of every view is stored (`extract.store_masks`). The
    plan puts sample `row` in shard `row // samples_per_shard`. `features` and `attn` have their own storage and
    compressor; `compressor` is every other array's.
    """
    total_samples: int
    samples_per_shard: int
    feature_layers: int
    attn_layers: int
    grid: tuple[int, int]
    dim: int
    k_max: int
    crop: int
    dtype: FloatDtype
    compressor: str
    features_storage: Storage = "plain"
    features_compressor: str | None = None  # None: `compressor`
    attn_storage: Storage = "plain"
    attn_compressor: str | None = None  # None: `compressor`
    masks: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in FLOAT_DTYPES:
            raise ConfigError(f"cache dtype {self.dtype!r} (extract.dtype) is not one of {list(FLOAT_DTYPES)}; "
                              "pick one of those")
        if self.total_samples < 1 or self.samples_per_shard < 1:
            raise ConfigError(f"total_samples {self.total_samples} and samples_per_shard {self.samples_per_shard} "
                              "(extract.samples_per_shard) must be positive; extract at least one image")
        for name, allowed in (("features_storage", FEATURE_STORAGES), ("attn_storage", ATTN_STORAGES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} {getattr(self, name)!r} (extract.{name}) is not one of {list(allowed)}")
        for name in ("compressor", "features_compressor", "attn_compressor"):
            if getattr(self, name) is not None:
                compressor_codecs(getattr(self, name), f"extract.{name}")  # fail early on a bad name

    @property
    def n_shards(self) -> int:
        return -(-self.total_samples // self.samples_per_shard)

    def shard_rows(self, shard_index: int) -> range:
        """Global sample positions held by a shard."""
        if not 0 <= shard_index < self.n_shards:
            raise IndexError(f"shard {shard_index} outside the plan's 0..{self.n_shards - 1}")
        start = shard_index * self.samples_per_shard
        return range(start, min(start + self.samples_per_shard, self.total_samples))

    def arrays(self) -> dict[str, "ArraySchema"]:
        """The cache's per-sample arrays, in storage order: the one declaration the writer, the reader, the
        shard table's `bytes_<array>` columns and `weclip inspect` all iterate, so a new array is one entry here.
        The order fixes the shard checksum; the names, shapes, dtypes and codecs fix the files on disk."""
        n = self.grid[0] * self.grid[1]
        codec = self.compressor
        declared = (
            ArraySchema("features", (self.feature_layers, n, self.dim), self.dtype, 0,
                        self.features_compressor or codec, self.features_storage),
            ArraySchema("attn", (self.attn_layers, n, n), self.dtype, 0, self.attn_compressor or codec,
                        self.attn_storage),
            ArraySchema("cams", (self.k_max, *self.grid), self.dtype, 0, codec),
            ArraySchema("cam_classes", (self.k_max,), "int16", -1, codec),
            ArraySchema("image", (3, self.crop, self.crop), "uint8", 0, codec),
            ArraySchema("valid", (self.crop, self.crop), "bool", False, codec),
        )
        if self.masks:
            declared += (ArraySchema("gt_mask", (self.crop, self.crop), "uint8", IGNORE_INDEX, codec),)
        return {a.name: a for a in declared}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["grid"] = list(self.grid)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CacheSpec":
        return cls(**{**d, "grid": tuple(d["grid"])})


@dataclass(frozen=True)
class ArraySchema:
    """One per-sample array: `shape` excludes the leading sample axis; `dtype` is the logical dtype (one of
    FLOAT_DTYPES for the arrays stored in the cache's float dtype); `compressor` a `compressor_codecs` name;
    `storage` "plain" (stored as `dtype`) or a `quantize` coding of a float array along its last axis, whose
    stored samples are `stored_shape` (one scale more per vector) and decode to float32."""
    name: str
    shape: tuple[int, ...]
    dtype: str
    fill: int | bool
    compressor: str
    storage: Storage = "plain"

    def __post_init__(self) -> None:
        if self.storage != "plain" and not self.floating:
            raise ConfigError(f"array {self.name!r} of dtype {self.dtype} cannot have storage {self.storage!r}: "
                              "8-bit codings are for float arrays; use 'plain'")

    @property
    def floating(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    @property
    def quantised(self) -> bool:
        return self.storage != "plain"

    @property
    def storage_dtype(self) -> np.dtype:
        if self.quantised:
            return quantize.code_dtype(self.storage)
        return np.dtype("uint16") if self.dtype == "bfloat16" else np.dtype(self.dtype)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """One stored sample: `shape`, with the scale's bytes after each vector of a quantised array."""
        if not self.quantised:
            return self.shape
        return (*self.shape[:-1], self.shape[-1] + quantize.SCALE_BYTES)

    @property
    def sample_nbytes(self) -> int:
        """Bytes of one stored sample before compression."""
        return int(np.prod(self.stored_shape)) * self.storage_dtype.itemsize

    def to_storage(self, values: np.ndarray) -> np.ndarray:
        """Cast a stack of samples to the stored dtype. Floats are rounded to nearest-even; other arrays
        must already have their exact dtype (a silent int64 -> int16 cast could wrap)."""
        if values.shape[1:] != self.shape:
            raise CacheError(f"array {self.name!r}: per-sample shape {values.shape[1:]}, the cache spec says "
                             f"{self.shape}; stack samples of the spec's shape")
        if self.floating:
            if values.dtype.kind != "f":
                raise TypeError(f"array {self.name!r} must be floating point, got {values.dtype}")
            if self.quantised:
                try:
                    return quantize.encode(self.storage, values)
                except CacheError as e:
                    raise CacheError(f"array {self.name!r}: {e}") from None
            if self.dtype == "bfloat16":
                return bfloat16_bits(values)
            return np.ascontiguousarray(values, dtype=self.storage_dtype)
        if values.dtype != self.storage_dtype:
            raise TypeError(f"array {self.name!r} must have dtype {self.storage_dtype}, got {values.dtype}")
        return np.ascontiguousarray(values)

    def from_storage(self, stored: np.ndarray) -> np.ndarray:
        """Stored samples -> their values: quantised codes and bfloat16 bits to float32, the rest as stored."""
        if self.quantised:
            return quantize.decode(self.storage, stored)
        return bfloat16_to_float32(stored) if self.dtype == "bfloat16" else stored

    def zarr_kwargs(self, spec: CacheSpec) -> dict[str, Any]:
        """Arguments of `zarr.Group.create_array` for this array: chunk = one sample, shard = one work unit. The
        store appends its checksum codec to `compressors` (`store._create`)."""
        return {
            "name": self.name,
            "shape": (spec.total_samples, *self.stored_shape),
            "chunks": (1, *self.stored_shape),
            "shards": (spec.samples_per_shard, *self.stored_shape),
            "dtype": self.storage_dtype,
            "fill_value": self.fill,
            "compressors": compressor_codecs(self.compressor),
            "attributes": {DTYPE_ATTR: self.dtype, STORAGE_ATTR: self.storage},
        }


def compressor_codecs(name: str, field: str = "extract.compressor") -> tuple[BytesBytesCodec, ...]:
    """Zarr v3 codecs for a compressor name such as "zstd:3", "blosc-zstd:1", "blosc-lz4" or "none"; `field` is
    the setting that gave the name, for the error message.

    Default levels: zstd 3, blosc-zstd 3, blosc-lz4 5. Blosc's byte shuffle groups the exponent bytes of float16
    values (attention: ×1.6 with blosc-zstd:1 against ×1.45 with zstd:1) and does nothing for 8-bit codes, which
    plain zstd:1 compresses as well (fp8 features ×1.21, log8 attention ×2.19). The per-array choices and their
    figures: benchmarks/cache_storage.py (results/cache_storage.json) and the presets in pipeline/config.py.
    """
    family, _, level_text = name.partition(":")
    if family not in _COMPRESSOR_FAMILIES:
        raise ConfigError(f"unknown compressor {name!r} ({field}); use one of "
                          f"{sorted(_COMPRESSOR_FAMILIES)}, optionally with ':<level>' (e.g. 'zstd:3')")
    default_level = _COMPRESSOR_FAMILIES[family]
    if default_level is None:
        if level_text:
            raise ConfigError(f"compressor 'none' ({field}) takes no level, got {name!r}; write 'none'")
        return ()
    if level_text and not level_text.isdigit():
        raise ConfigError(f"compressor {name!r} ({field}): the level after ':' must be a whole number, "
                          "e.g. 'zstd:3'")
    level = int(level_text) if level_text else default_level
    if family == "zstd":
        return (ZstdCodec(level=level),)
    _, cname, *bit = family.split("-")
    return (BloscCodec(cname=cname, clevel=level, shuffle="bitshuffle" if bit else "shuffle"),)


def bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float -> bfloat16 bit patterns (uint16), rounding to nearest-even like `torch.Tensor.bfloat16()`."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    nan = np.isnan(values)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    out[nan] = 0x7FC0  # a quiet NaN; the rounding add could otherwise carry a NaN into infinity
    return out


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def shard_types(spec: CacheSpec) -> dict[str, pa.DataType]:
    """Columns of `shards.parquet`: SHARD_TYPES, then the on-disk bytes of each array of the spec."""
    return {**SHARD_TYPES, **{f"bytes_{name}": pa.int64() for name in spec.arrays()}}


def commit_key(shard_index: int) -> str:
    return f"{COMMIT_PREFIX}shard-{shard_index:06d}.json"
