"""Fingerprints: stable digest of canonical JSON, key diff, config mapping."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from tests.cache import cache_fakes as fk

from weclip.pipeline.cache.fingerprint import (canonical_json, checkpoint_identity, diff, fingerprint_from_config,
                                        make_fingerprint, manifest_sha256)
from weclip.pipeline.cache.store import CacheReader, CacheWriter
from weclip.pipeline.config import preset
from weclip.pipeline.errors import CacheError
from weclip.stages import train


def sorted_json_sha256(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_digest_is_sha256_of_sorted_json_and_order_free():
    fp = fk.tiny_fingerprint()
    body = {k: v for k, v in fp.items() if k != "digest"}
    assert fp["digest"] == sorted_json_sha256(body)
    reordered = make_fingerprint(**dict(reversed([(k, v) for k, v in body.items()])))
    assert reordered == fp
    assert fp["grid"] == [4, 4] and fp["schema_version"] == 2 and fp["cam_normalisation"] == "minmax-twice"
    assert json.loads(json.dumps(fp)) == fp


def test_diff_names_keys():
    a, b = fk.tiny_fingerprint(), fk.tiny_fingerprint(seed=7, dtype="bfloat16")
    assert diff(a, b) == ["dtype", "seed"]
    assert diff(a, a) == []
    assert diff(a, {k: v for k, v in a.items() if k != "views"}) == ["views"]


def test_missing_or_unknown_keys_raise():
    body = {k: v for k, v in fk.tiny_fingerprint().items() if k not in ("digest", "seed")}
    with pytest.raises(TypeError, match="seed"):
        make_fingerprint(**body)
    with pytest.raises(TypeError, match="colour"):
        make_fingerprint(**body, seed=1, colour="red")


def test_checkpoint_identity(tmp_path):
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"weights" * 1000)
    assert checkpoint_identity(str(ckpt)) == "sha256:" + hashlib.sha256(b"weights" * 1000).hexdigest()
    assert checkpoint_identity("openai") == "openai"
    assert checkpoint_identity(None) == "none"


def test_fingerprint_from_config_tracks_content_not_layout():
    cfg = preset("voc")
    kw = dict(grid=(20, 20), prompts=["a clean origami cat."], class_names=["cat"], manifest=[("2007_000032", [0])])
    base = fingerprint_from_config(cfg, **kw)
    assert base["model"] == cfg.model.name and base["views"] == cfg.extract.views
    layout = cfg.replace(extract={"compressor": "none", "samples_per_shard": 7, "batch_size": 1})
    assert fingerprint_from_config(layout, **kw)["digest"] == base["digest"]
    for changed, key in [(cfg.replace(extract={"seed": 2}), "seed"), (cfg.replace(aug={"crop": 224}), "augmentation"),
                         (cfg.replace(model={"precision": "bf16"}), "precision")]:
        assert key in diff(base, fingerprint_from_config(changed, **kw))
    assert diff(base, fingerprint_from_config(cfg, **{**kw, "manifest": [("2007_000032", [1])]})) == ["manifest_sha256"]
    assert diff(base, fingerprint_from_config(cfg, **{**kw, "prompts": ["x"]})) == ["prompts_sha256"]


def old_fingerprint(**stored) -> dict:
    """The fingerprint a cache made before the two-pass CAM normalisation carries: no cam_normalisation key (or the
    value `stored` gives), and the digest of exactly that body, as the code of the time wrote it."""
    body = {k: v for k, v in fk.tiny_fingerprint().items() if k not in ("digest", "cam_normalisation")} | stored
    return {**body, "digest": sorted_json_sha256(body)}


def test_config_fingerprint_records_the_cam_normalisation():
    kw = dict(grid=(20, 20), prompts=["a clean origami cat."], class_names=["cat"], manifest=[("2007_000032", [0])])
    assert fingerprint_from_config(preset("voc"), **kw)["cam_normalisation"] == "minmax-twice"
    assert diff(old_fingerprint(), fk.tiny_fingerprint()) == ["cam_normalisation"]


OLD_CACHE = r"the cache at .*old.* was made before CAMs were min-max normalised twice.*re-extract with `weclip extract`"


def test_a_cache_made_before_the_fix_is_refused_by_reader_writer_and_trainer(tmp_path):
    old = tmp_path / "old"
    CacheWriter.create_or_open(str(old), fk.tiny_spec(), old_fingerprint())  # what the earlier code wrote
    with pytest.raises(CacheError, match=OLD_CACHE):
        CacheReader(str(old))
    with pytest.raises(CacheError, match=OLD_CACHE):  # resuming the extraction, not a generic settings diff
        CacheWriter.create_or_open(str(old), fk.tiny_spec(), fk.tiny_fingerprint())
    for resume in (False, True):  # training on it, or resuming a run on it
        with pytest.raises(CacheError, match=OLD_CACHE):
            train.run(preset("shapes"), old, tmp_path / "run", resume=resume, device="cpu")


def test_a_cache_with_another_cam_normalisation_is_refused(tmp_path):
    other = tmp_path / "other"
    CacheWriter.create_or_open(str(other), fk.tiny_spec(), old_fingerprint(cam_normalisation="minmax-once"))
    with pytest.raises(CacheError, match="made with CAM normalisation 'minmax-once'.*re-extract with `weclip extract`"):
        CacheReader(str(other))
    current = tmp_path / "current"
    CacheWriter.create_or_open(str(current), fk.tiny_spec(), fk.tiny_fingerprint())
    assert CacheReader(str(current)).fingerprint["cam_normalisation"] == "minmax-twice"


def test_canonical_json_of_numpy_scalars_and_tuples_is_that_of_the_python_values():
    value = {"b": (1, np.int64(2), [np.float64(0.1), np.float32(0.5)]), "a": [np.bool_(True), None, "x", 1.5, False]}
    plain = {"b": [1, 2, [0.1, 0.5]], "a": [True, None, "x", 1.5, False]}
    assert canonical_json(value) == json.dumps(plain, sort_keys=True, separators=(",", ":"))
    assert type(json.loads(canonical_json(np.float64(0.25)))) is float


def test_manifest_hash_is_the_canonical_json_of_id_label_pairs():
    manifest = [("2008_000123", (1, 14)), ("é-unicode", ()), ("x", [3])]
    assert manifest_sha256(manifest) == hashlib.sha256(
        json.dumps([[i, list(l)] for i, l in manifest], separators=(",", ":")).encode()).hexdigest()


def test_stored_masks_add_a_key_and_leave_other_digests_alone():
    kw = dict(grid=(20, 20), prompts=["a clean origami cat."], class_names=["cat"], manifest=[("2007_000032", [0])])
    cfg = preset("voc")
    base = fingerprint_from_config(cfg, **kw)
    assert "gt_masks" not in base  # a cache without masks keeps the digest it had before the option existed
    assert base["digest"] == sorted_json_sha256({k: v for k, v in base.items() if k != "digest"})
    masked = fingerprint_from_config(cfg.replace(extract={"store_masks": True}), **kw)
    assert masked["gt_masks"] is True and diff(base, masked) == ["gt_masks"]
