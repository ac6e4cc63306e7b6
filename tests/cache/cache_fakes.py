"""Fakes for the feature-cache tests (imported by tests/cache/test_cache_*.py): a tiny plan (5 images ×
2 views, 4 samples per shard -> shards of 4, 4 and 2 samples) and deterministic random shard contents,
so a rerun produces identical inputs."""
from __future__ import annotations

from typing import Any

import numpy as np

from weclip.pipeline.cache.fingerprint import make_fingerprint
from weclip.pipeline.cache.schema import CacheSpec

VIEWS = 2
IMAGES = 5
# The cache's arrays in storage order, written out here independently of `CacheSpec.arrays()`.
ARRAY_NAMES = ("features", "attn", "cams", "cam_classes", "image", "valid")


def tiny_spec(**overrides: Any) -> CacheSpec:
    base = dict(total_samples=IMAGES * VIEWS, samples_per_shard=4, feature_layers=2, attn_layers=3, grid=(4, 4),
                dim=8, k_max=3, crop=32, dtype="float16", compressor="blosc-zstd:1")
    return CacheSpec(**{**base, **overrides})


def tiny_fingerprint(**overrides: Any) -> dict[str, Any]:
    parts = dict(model="tiny", checkpoint="none", precision="fp32", input_size=32, grid=(4, 4),
                 feature_layers=(1, 2), attn_layers=(1, 2, 3), prompts_sha256="p", classes_sha256="c",
                 normalisation="imagenet", dtype="float16", features_storage="plain", attn_storage="plain",
                 views=VIEWS, seed=1,
                 augmentation={"crop": 32, "scale_range": (0.5, 2.0), "flip_prob": 0.5}, manifest_sha256="m")
    return make_fingerprint(**{**parts, **overrides})


def sample_arrays(spec: CacheSpec, row: int) -> dict[str, np.ndarray]:
    """One sample's arrays, a pure function of its row; floats are float32 (the writer casts). Includes
    `gt_mask` when the spec stores GT mask crops (`masks`)."""
    rng = np.random.default_rng(1000 + row)
    n = spec.grid[0] * spec.grid[1]
    classes = np.full(spec.k_max, -1, np.int16)
    classes[: 1 + row % spec.k_max] = rng.choice(20, 1 + row % spec.k_max, replace=False)
    arrays = {
        "features": rng.standard_normal((spec.feature_layers, n, spec.dim)).astype(np.float32) * 3,
        "attn": rng.dirichlet(np.ones(n), size=(spec.attn_layers, n)).astype(np.float32),
        "cams": rng.random((spec.k_max, *spec.grid)).astype(np.float32),
        "cam_classes": classes,
        "image": rng.integers(0, 256, (3, spec.crop, spec.crop), dtype=np.uint8),
        "valid": rng.random((spec.crop, spec.crop)) > 0.2,
    }
    if "gt_mask" in spec.arrays():
        arrays["gt_mask"] = rng.integers(0, 21, (spec.crop, spec.crop), dtype=np.uint8)
    return arrays


def sample_row(row: int) -> dict[str, Any]:
    image = row // VIEWS
    return {"sample_id": f"img{image}#{row % VIEWS}", "image_id": f"img{image}", "view": row % VIEWS, "row": row,
            "labels": [image % 3, 5], "scale": 0.5 + row / 7, "flip": bool(row % 2), "crop_top": row * 3}


ShardInputs = tuple[dict[str, np.ndarray], list[dict[str, Any]], list[dict[str, Any]]]


def shard_inputs(spec: CacheSpec, shard: int, skip: frozenset[str] = frozenset()) -> ShardInputs:
    """write_shard's arguments for a shard; images named in `skip` leave their rows out."""
    rows = [sample_row(r) for r in spec.shard_rows(shard) if sample_row(r)["image_id"] not in skip]
    per_sample = [sample_arrays(spec, r["row"]) for r in rows]
    template = sample_arrays(spec, 0)
    arrays = {k: np.stack([s[k] for s in per_sample]) if rows else np.zeros((0, *v.shape), v.dtype)
              for k, v in template.items()}
    images = sorted({sample_row(r)["image_id"] for r in spec.shard_rows(shard)} & skip)
    return arrays, rows, [{"image_id": i, "reason": "cannot decode"} for i in images]
