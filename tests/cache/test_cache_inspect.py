"""`stages.inspect.run` on a small cache with a skipped image and a missing shard."""
from __future__ import annotations

import json
import os
from pathlib import Path

from tests.cache import cache_fakes as fk
from tests.cache.cache_fakes import ARRAY_NAMES

from weclip.pipeline.cache.store import CacheWriter
from weclip.stages import inspect


def test_inspect_small_cache(tmp_path):
    root = tmp_path / "cache"
    spec, fp = fk.tiny_spec(), fk.tiny_fingerprint()
    writer = CacheWriter.create_or_open(str(root), spec, fp)
    for s in (0, 1):
        writer.write_shard(s, *fk.shard_inputs(spec, s, skip=frozenset({"img1"})))
    writer.finalize()

    summary = inspect.run(str(root))
    assert (summary.images, summary.views, summary.samples, summary.planned_samples) == (3, 2, 6, 10)
    assert summary.shards_committed == 2 and summary.shards_missing == [2]
    assert summary.skipped == [{"image_id": "img1", "reason": "cannot decode", "shard": 0}]
    for name in ARRAY_NAMES:  # sizes from the commit records equal the shard files on disk
        files = [p for p in (root / name / "c").rglob("*") if p.is_file()]
        assert summary.bytes_on_disk[name] == sum(os.path.getsize(p) for p in files), name
    assert summary.raw_bytes_per_sample["attn"] == 3 * 16 * 16 * 2
    assert summary.bytes_per_sample == sum(summary.bytes_on_disk.values()) / 6
    assert json.loads(json.dumps(summary.to_dict()))["samples"] == 6
    text = summary.format()
    assert str(root) in text and "img1: cannot decode" in text and "2 committed, 1 missing [2]" in text
    assert fp["digest"][:16] in text


def test_inspect_lists_every_array_the_spec_declares(tmp_path):
    root = tmp_path / "cache"
    spec = fk.tiny_spec(masks=True)
    writer = CacheWriter.create_or_open(str(root), spec, fk.tiny_fingerprint())
    for s in range(spec.n_shards):
        writer.write_shard(s, *fk.shard_inputs(spec, s))
    writer.finalize()

    summary = inspect.run(str(root))
    assert list(summary.bytes_on_disk) == [*ARRAY_NAMES, "gt_mask"]
    files = [p for p in (root / "gt_mask" / "c").rglob("*") if p.is_file()]
    assert len(files) == 3 and summary.bytes_on_disk["gt_mask"] == sum(os.path.getsize(p) for p in files)
    assert summary.raw_bytes_per_sample["gt_mask"] == 32 * 32
    line = next(l for l in summary.format().splitlines() if l.strip().startswith("gt_mask"))
    assert f"{32 * 32 / 1e6:.3f} MB/sample raw" in line


def test_inspect_shows_each_arrays_storage_codec_and_bytes(tmp_path):
    root = tmp_path / "cache"
    spec = fk.tiny_spec(features_storage="fp8", features_compressor="none", attn_storage="log8",
                        attn_compressor="zstd:1")
    writer = CacheWriter.create_or_open(str(root), spec, fk.tiny_fingerprint(features_storage="fp8",
                                                                             attn_storage="log8"))
    writer.write_shard(0, *fk.shard_inputs(spec, 0))
    summary = inspect.run(str(root))
    assert summary.storage == {"features": "fp8", "attn": "log8", "cams": "plain", "cam_classes": "plain",
                               "image": "plain", "valid": "plain"}
    assert summary.compressors["features"] == "none" and summary.compressors["image"] == "blosc-zstd:1"
    # one byte per value and one float32 scale per vector: 8-wide tokens, 16-wide attention rows
    assert summary.raw_bytes_per_sample["features"] == 2 * 16 * (8 + 4)
    assert summary.raw_bytes_per_sample["attn"] == 3 * 16 * (16 + 4)
    # uncompressed: 4 samples' codes, a crc32c each, and the shard index of 4 slots of 16 bytes and its crc32c
    assert summary.bytes_on_disk["features"] == 4 * (2 * 16 * 12 + 4) + 4 * 16 + 4
    line = next(l for l in summary.format().splitlines() if l.strip().startswith("features"))
    assert line.split()[:3] == ["features", "fp8", "none"]
    assert next(l for l in summary.format().splitlines() if l.strip().startswith("attn")).split()[:3] == [
        "attn", "log8", "zstd:1"]
