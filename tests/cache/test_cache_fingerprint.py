"""Fingerprints: stable digest of canonical JSON, key diff, config mapping."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.cache import cache_fakes as fk

from pipeline.cache.fingerprint import (checkpoint_identity, diff, fingerprint_from_config,
                                        make_fingerprint)
from pipeline.config import preset


def test_digest_is_sha256_of_sorted_json_and_order_free():
    fp = fk.tiny_fingerprint()
    body = {k: v for k, v in fp.items() if k != "digest"}
    want = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert fp["digest"] == want
    reordered = make_fingerprint(**dict(reversed([(k, v) for k, v in body.items()])))
    assert reordered == fp
    assert fp["grid"] == [4, 4] and fp["schema_version"] == 1
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
