"""Settings that travel with the data: what a cache fixes, and a later command adopting them.

A cache is the source of truth for everything it was made with: the backbone (name, weights, precision,
normalisation), the prompts and class names, the crop and views, the stored layers. `weclip extract` records its
resolved config and class set in the cache (`CacheWriter.create_or_open(provenance=...)`); `weclip train` takes
those sections from there, so nothing given to `extract` has to be repeated, and a checkpoint inherits them for
`evaluate`, `infer` and `pseudo`. A setting the user gives that contradicts the cache is an error naming both values.
"""
from __future__ import annotations

from typing import Any, Iterable

from weclip.pipeline.cache import fingerprint as fp
from weclip.pipeline.config import Config, apply_overrides, leaves
from weclip.pipeline.errors import CacheError, ConfigError
from weclip.pipeline.files import sha256_file, local_path
from weclip.pipeline.model.text import ClassSet

FIXED_SECTIONS = ("model", "text", "aug", "extract")  # what a cache fixes
MOVABLE = ("model.pretrained",)  # may point elsewhere, if the file there is the recorded one


def adopt(cfg: Config, fixed: Config, explicit: Iterable[str] | None, source: str) -> Config:
    """`cfg` with the FIXED_SECTIONS of `fixed` (the config `source` was made with).

    A fixed field the user set (`explicit`: the dotted names given with --set / --config; None: every field of
    `cfg` counts as set, as for a library call) that differs from `source`'s is a ConfigError naming both values;
    a differing field the user did not set (a preset default) is replaced by `source`'s. `model.pretrained` may be
    given a new path: `check_moved_backbone` then holds it to the recorded identity."""
    given = leaves({s: cfg.to_dict()[s] for s in FIXED_SECTIONS})
    recorded = leaves({s: fixed.to_dict()[s] for s in FIXED_SECTIONS})
    chosen = set(given) if explicit is None else set(explicit)
    keep: dict[str, dict[str, Any]] = {}
    for key, value in given.items():
        if fp.canonical_json(value) == fp.canonical_json(recorded[key]) or key not in chosen:
            continue
        if key in MOVABLE:
            section, field = key.split(".", 1)
            keep.setdefault(section, {})[field] = value
            continue
        raise ConfigError(f"{source} was made with {key} = {recorded[key]!r}, but this run asks for {value!r}; "
                          f"drop that setting (the data fixes it) or make new data with it")
    return apply_overrides(cfg, {s: fixed.to_dict()[s] for s in FIXED_SECTIONS}).replace(**keep)


def check_moved_backbone(cfg: Config, identity: str, source: str) -> None:
    """A `model.pretrained` that names a local file must hold the weights `source` recorded (its sha256)."""
    path = cfg.model.pretrained
    if path is None or not local_path(path).is_file():
        return
    found = f"{cfg.model.name}@sha256:{sha256_file(local_path(path))}"
    if found != identity:
        raise ConfigError(f"model.pretrained = {path} holds other weights ({found}) than {source} was made with "
                          f"({identity}); point it to the same checkpoint file")


def cache_provenance(provenance: dict[str, Any], fingerprint: dict[str, Any], source: str) -> tuple[Config, ClassSet]:
    """The config and class set a cache recorded, checked against its fingerprint."""
    if "config" not in provenance or "class_set" not in provenance:
        raise CacheError(f"{source} does not record the settings it was made with (an older weclip made it); "
                         "re-extract it with `weclip extract`")
    cfg = Config.from_dict(provenance["config"])
    classes = ClassSet.from_dict(provenance["class_set"])
    if fp.sha256_json(list(classes.classes)) != fingerprint.get("classes_sha256"):
        raise CacheError(f"{source} records a class set that does not match its fingerprint; the cache is "
                         "inconsistent, re-extract it")
    return cfg, classes
