"""Cache fingerprints: everything that determines what the extract stage writes, plus a stable digest.

A fingerprint is a plain JSON-able dict. Two caches hold the same content exactly when their digests match;
the storage of the float arrays (plain or an 8-bit coding) changes the values read, so it is part of it; the
compressors and the shard size change only the layout (lossless) and live in `CacheSpec` instead, which a resumed
extraction must match too (docs/design.md §3.2).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from weclip.pipeline.cache.schema import CONTENT_VERSION
from weclip.pipeline.errors import CacheError
from weclip.pipeline.files import sha256_file
from weclip.pipeline.config import Config

# How the stored CAMs are normalised: ReLU, then min-max twice (`pipeline/model/cam.py`, docs/algorithm.md §4
# step 4). A property of the code, not of the config: change it whenever the CAM formula changes, so that caches
# holding the old CAMs are refused. Caches made before it was recorded hold one-pass CAMs.
CAM_NORMALISATION = "minmax-twice"

FINGERPRINT_KEYS = (
    "model",  # open_clip model name
    "checkpoint",  # "sha256:<hex>" of a local checkpoint file, or the open_clip pretrained tag
    "precision",  # backbone compute precision (fp32 / bf16 / fp16)
    "input_size",  # crop side the backbone sees
    "grid",  # patch grid (h, w)
    "feature_layers",  # 1-based blocks stored in `features`
    "attn_layers",  # 1-based blocks stored in `attn`
    "prompts_sha256",  # hash of the prompt strings (template applied to class and background names)
    "classes_sha256",  # hash of the canonical class names (class id order)
    "normalisation",
    "dtype",
    "features_storage",  # plain / int8 / fp8: what the decoder reads differs by the coding's error
    "attn_storage",  # plain / uint8 / log8
    "views",
    "seed",
    "augmentation",  # the AugConfig as a dict
    "manifest_sha256",  # hash of the manifest's (image_id, labels) list, so a changed dataset is a new cache
    "schema_version",  # CONTENT_VERSION: what the arrays hold (not the store format, SCHEMA_VERSION)
    "cam_normalisation",  # CAM_NORMALISATION of the code that made the cache
)
# Keys present only when their setting is on, so that the digests of caches made without it (and the checkpoints
# trained on them) stay what they were.
OPTIONAL_FINGERPRINT_KEYS = (
    "gt_masks",  # true: every view's ground-truth mask crop is stored (extract.store_masks)
)


def canonical_json(value: Any) -> str:
    """Key-sorted, whitespace-free JSON; tuples become lists, dataclasses dicts."""
    return json.dumps(_plain(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def sha256_json(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def make_fingerprint(**parts: Any) -> dict[str, Any]:
    """The fingerprint dict: every key of FINGERPRINT_KEYS (schema_version and cam_normalisation, the code's,
    filled in), those of OPTIONAL_FINGERPRINT_KEYS that are given, plus `digest`.

    Missing or unknown keys raise, so a new content-determining setting cannot be silently left out.
    """
    parts = {"schema_version": CONTENT_VERSION, "cam_normalisation": CAM_NORMALISATION, **parts}
    missing = [k for k in FINGERPRINT_KEYS if k not in parts]
    unknown = sorted(set(parts) - set(FINGERPRINT_KEYS) - set(OPTIONAL_FINGERPRINT_KEYS))
    if missing or unknown:
        raise TypeError(f"make_fingerprint: missing keys {missing}, unknown keys {unknown}")
    plain = _plain(parts)
    return {**plain, "digest": sha256_json(plain)}


def diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys whose values differ (or that only one side has), sorted; `digest` itself is not reported."""
    a, b = _plain(a), _plain(b)
    return sorted(k for k in set(a) | set(b) if k != "digest" and a.get(k, _ABSENT) != b.get(k, _ABSENT))


def require_current_cams(fingerprint: dict[str, Any], where: str) -> None:
    """Refuse a cache whose CAMs this code does not make (see CAM_NORMALISATION): training on it would learn from
    the other formula's pseudo labels, resuming its extraction would mix two formulas in one cache. Readers compare
    no fingerprint, and a writer's diff would only list the key among changed settings, hence this check."""
    stored = fingerprint.get("cam_normalisation")
    if stored == CAM_NORMALISATION:
        return
    made = "before CAMs were min-max normalised twice" if stored is None else f"with CAM normalisation {stored!r}"
    raise CacheError(f"the cache at {where} was made {made}, but this code makes {CAM_NORMALISATION!r} CAMs "
                     "(docs/algorithm.md §4 step 4); re-extract with `weclip extract` into a new --out "
                     "(or delete the old cache first)")


def checkpoint_identity(pretrained: str | None) -> str:
    """"sha256:<hex>" for a local checkpoint file, else the open_clip pretrained tag ("none" = random init)."""
    if pretrained is None:
        return "none"
    path = Path(pretrained)
    return f"sha256:{sha256_file(path)}" if path.is_file() else pretrained


def fingerprint_from_config(cfg: Config, *, grid: tuple[int, int], prompts: Sequence[str],
                            class_names: Sequence[str], manifest: Sequence[tuple[str, Sequence[int]]],
                            checkpoint: str | None = None) -> dict[str, Any]:
    """The fingerprint of an extract run: `prompts` = every prompt string the CAMs use, in order;
    `manifest` = (image_id, labels) per image, in plan order; `checkpoint` = the loaded backbone's identity
    (`FrozenCLIP.identity`, which tells random initialisations apart), default `checkpoint_identity(pretrained)`."""
    return make_fingerprint(
        model=cfg.model.name,
        checkpoint=checkpoint if checkpoint is not None else checkpoint_identity(cfg.model.pretrained),
        precision=cfg.model.precision,
        input_size=cfg.aug.crop,
        grid=grid,
        feature_layers=cfg.extract.feature_layers,
        attn_layers=cfg.extract.attn_layers,
        prompts_sha256=sha256_json(list(prompts)),
        classes_sha256=sha256_json(list(class_names)),
        normalisation=cfg.model.normalisation,
        dtype=cfg.extract.dtype,
        features_storage=cfg.extract.features_storage,
        attn_storage=cfg.extract.attn_storage,
        views=cfg.extract.views,
        seed=cfg.extract.seed,
        augmentation=cfg.aug,
        manifest_sha256=manifest_sha256(manifest),
        **({"gt_masks": True} if cfg.extract.store_masks else {}),
    )


def manifest_sha256(manifest: Sequence[tuple[str, Sequence[int]]]) -> str:
    """`sha256_json([[image_id, list(labels)], ...])` without copying 100k pairs into lists first: JSON writes tuples
    as arrays, and ids and labels are plain str and int."""
    return hashlib.sha256(json.dumps(list(manifest), separators=(",", ":"), ensure_ascii=True).encode()).hexdigest()


_ABSENT = object()
_SCALARS = frozenset({str, int, float, bool, type(None)})  # exact types: numpy's float64 subclasses float


def _plain(value: Any) -> Any:
    if type(value) in _SCALARS:  # first: a manifest hash walks 100k ids and labels
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
