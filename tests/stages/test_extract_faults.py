"""Stage `extract` under faults: a worker SIGKILLed inside a shard, then resumed, gives the cache an uninterrupted run
gives; unreadable images become recorded skips, not a crash (docs/design.md §3.3)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.stages import extract_fakes as xf

from weclip.pipeline.cache.schema import commit_key
from weclip.pipeline.cache.store import CacheReader
from weclip.stages import extract

CFG = xf.tiny_config()
KILLED_SHARD = 2
# 7 images, 14 samples, shards of 3 -> 5 shards. After the manifest is built, c's JPEG is overwritten with junk, e's is
# truncated to zero bytes and f's is deleted, so shards 1, 2, 3 and 4 each hold a skipped image.
IMAGES = {**xf.IMAGES, "f": [4], "g": [6, 7]}
BROKEN = {"c": "image_corrupt", "e": "image_empty", "f": "image_missing"}

# The inline extract in a child process that SIGKILLs itself inside shard KILLED_SHARD (extract_fakes.die_inside_shard).
CHILD = r"""
import json, sys
from tests.stages import extract_fakes as xf
from weclip.pipeline.config import Config
from weclip.stages import extract

args = json.loads(sys.argv[1])
xf.die_inside_shard(args["shard"], args["point"])
extract.run(Config.from_dict(args["cfg"]), args["manifest"], args["out"], executor="inline", progress=False,
            model_configs=[xf.TINY_CONFIG])
"""


@pytest.fixture(scope="module")
def broken_dataset(tmp_path_factory) -> tuple[Path, Path]:
    """(manifest with three unreadable images, cache of an uninterrupted run on it)."""
    root = tmp_path_factory.mktemp("extract_faults")
    manifest = xf.make_dataset(root, IMAGES)
    images = root / "voc" / "JPEGImages"
    (images / "c.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (images / "e.jpg").write_bytes(b"")
    (images / "f.jpg").unlink()
    reference = root / "reference"
    extract.run(CFG, manifest, reference, executor="inline", progress=False, model_configs=[xf.TINY_CONFIG])
    return manifest, reference


def test_unreadable_images_are_recorded_skips(broken_dataset):
    _, reference = broken_dataset
    reader = CacheReader(reference)
    assert reader.verify() == {}
    skipped = reader.tables.skipped.to_pylist()
    assert {(s["image_id"], s["reason"]) for s in skipped} == set(BROKEN.items())
    # c: rows 4-5 (shard 1); e: rows 8-9, straddling shards 2 and 3, so skipped in both; f: rows 10-11 (shard 3)
    assert sorted((s["image_id"], s["shard"]) for s in skipped) == [("c", 1), ("e", 2), ("e", 3), ("f", 3)]
    assert all(s["detail"] for s in skipped)
    ids = reader.index.column("sample_id").to_pylist()
    assert ids == [f"{i}#{v}" for i in IMAGES if i not in BROKEN for v in (0, 1)]
    rows = reader.index.column("row").to_pylist()
    assert rows == [r for r in range(14) if r // 2 not in (2, 4, 5)]


@pytest.mark.parametrize("point", ["after_some_arrays", pytest.param("before_commit", marks=pytest.mark.slow)])
def test_sigkill_inside_a_shard_then_resume_equals_uninterrupted_run(broken_dataset, tmp_path, point):
    manifest, reference = broken_dataset
    out = tmp_path / "cache"
    args = {"cfg": CFG.to_dict(), "manifest": str(manifest), "out": str(out), "shard": KILLED_SHARD, "point": point}
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], cwd=xf.TESTS.parent,
                           env={**os.environ, "PYTHONPATH": str(xf.TESTS.parent)}, capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert (out / "attn" / "c" / str(KILLED_SHARD)).exists()  # the dead shard left arrays behind ...
    assert not (out / commit_key(KILLED_SHARD)).exists()  # ... but no commit
    assert CacheReader(out).committed() == set(range(KILLED_SHARD))
    if point == "after_some_arrays":
        assert not (out / "cams" / "c" / str(KILLED_SHARD)).exists()

    summary = extract.run(CFG, manifest, out, executor="inline", progress=False, model_configs=[xf.TINY_CONFIG])
    assert (summary.shards_resumed, summary.shards_written) == (KILLED_SHARD, 5 - KILLED_SHARD)
    reader = CacheReader(out)
    assert reader.verify() == {}
    sums, index = xf.checksums(out)
    expected_sums, expected_index = xf.checksums(reference)
    assert sums == expected_sums and index.equals(expected_index)
    ids = index.column("sample_id").to_pylist()
    assert len(ids) == len(set(ids)) == 8  # none lost, none duplicated
    assert reader.tables.skipped.equals(CacheReader(reference).tables.skipped)
