"""Damaged and incomplete feature caches, as a user meets them: a deleted shard file, garbage bytes inside a shard
file, an uncommitted shard. Train refuses them, inspect reports them, an extract rerun repairs them."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.stages import extract_fakes as xf

from weclip.pipeline.cache.schema import commit_key
from weclip.pipeline.cache.store import CacheReader
from weclip.pipeline.errors import CacheError, TrainError
from weclip.stages import extract, inspect, train

CFG = xf.tiny_config()
# Training settings that fit the tiny cache (attention of 2 blocks) and run a step in a moment.
TRAIN_CFG = CFG.replace(refine={"static_layers": 2, "rfm_layers": 2, "rfm_start_iter": 2},
                        par={"num_iter": 2, "dilations": [1, 2]},
                        decoder={"embed_dim": 32, "layers": 1, "heads": 2, "mlp_dim": 64},
                        train={"iterations": 2, "batch_size": 2, "checkpoint_every": 2, "loader_workers": 0,
                               "warmup_iters": 1})
SHARD = 1


@pytest.fixture(scope="module")
def manifest_path(tmp_path_factory) -> Path:
    return xf.make_dataset(tmp_path_factory.mktemp("integrity_data"))


@pytest.fixture(scope="module")
def clean(manifest_path, tmp_path_factory) -> Path:
    """One uninterrupted cache; each test damages a copy."""
    out = tmp_path_factory.mktemp("integrity") / "cache"
    extract_run(manifest_path, out)
    return out


def extract_run(manifest_path: Path, out: Path, verify: bool = False) -> extract.ExtractSummary:
    return extract.run(CFG, manifest_path, out, executor="inline", progress=False, model_configs=[xf.TINY_CONFIG],
                       verify=verify)


def shard_file(cache: Path, array: str, shard: int) -> Path:
    reader = CacheReader(cache, check_files=False)
    return cache / array / "c" / str(shard) / "/".join("0" * len(reader.schemas[array].shape))


@pytest.fixture
def copy(clean, tmp_path) -> Path:
    return Path(shutil.copytree(clean, tmp_path / "cache"))


def test_every_chunk_and_shard_index_carry_a_crc32c(clean):
    reader = CacheReader(clean)
    for name, array in reader._arrays.items():
        (sharding,) = array.metadata.codecs
        assert sharding.codecs[-1].to_dict() == {"name": "crc32c"}, name
        assert sharding.index_codecs[-1].to_dict() == {"name": "crc32c"}, name


def test_deleted_shard_file(copy, clean, manifest_path, tmp_path):
    shard_file(copy, "features", SHARD).unlink()
    with pytest.raises(CacheError, match=rf"shard {SHARD} \(features\).*weclip extract"):
        train.run(TRAIN_CFG, copy, tmp_path / "run", max_steps=1, progress=False)
    report = inspect.run(copy)
    assert report.shards_damaged == {SHARD: ["features"]}
    assert f"DAMAGED: shard {SHARD} (features)" in report.format() and "complete" not in report.format()

    summary = extract_run(manifest_path, copy)
    assert (summary.shards_repaired, summary.shards_written, summary.shards_resumed) == (1, 1, 3)
    assert "1 repaired" in summary.format()
    fresh, index = xf.checksums(copy)
    want, want_index = xf.checksums(clean)
    assert fresh == want and index.equals(want_index)
    assert CacheReader(copy).verify() == {} and inspect.run(copy, verify=True).shards_damaged == {}


def test_garbage_bytes_inside_a_shard_file(copy, clean, manifest_path):
    path = shard_file(copy, "attn", SHARD)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(range(64))
    path.write_bytes(bytes(data))

    reader = CacheReader(copy)  # the size is right: opening succeeds, the read fails
    rows = list(reader.spec.shard_rows(SHARD))
    with pytest.raises(CacheError, match=rf"array 'attn' of shard {SHARD}.*damaged"):
        reader.read(rows)
    assert reader.read(list(reader.spec.shard_rows(0)))["attn"].shape[0] == 3  # other shards still read
    assert inspect.run(copy).shards_damaged == {}  # the cheap check cannot see it
    report = inspect.run(copy, verify=True)
    assert report.shards_damaged == {SHARD: ["attn"]} and "DAMAGED" in report.format()

    assert extract_run(manifest_path, copy).shards_repaired == 0  # sizes only: not found
    summary = extract_run(manifest_path, copy, verify=True)
    assert (summary.shards_repaired, summary.shards_written) == (1, 1)
    assert xf.checksums(copy)[0] == xf.checksums(clean)[0] and CacheReader(copy).verify() == {}


def test_uncommitted_shard(copy, tmp_path):
    (copy / commit_key(SHARD)).unlink()
    with pytest.raises(TrainError, match=rf"1 of 4 planned shards have no commit record \(shards {SHARD}\).*"
                                         r"weclip extract.*--allow-partial"):
        train.run(TRAIN_CFG, copy, tmp_path / "refused", max_steps=1, progress=False)
    with pytest.warns(UserWarning, match="incomplete"):
        summary = train.run(TRAIN_CFG, copy, tmp_path / "partial", max_steps=1, progress=False, allow_partial=True)
    assert summary.samples == 7 and summary.steps_run == 1 and "7 samples" in summary.format()
    report = inspect.run(copy)
    assert report.shards_missing == [SHARD] and "incomplete" in report.format()


def test_complete_cache_trains_and_inspects_as_complete(clean, tmp_path):
    summary = train.run(TRAIN_CFG, clean, tmp_path / "run", max_steps=1, progress=False)
    assert summary.samples == 10
    text = inspect.run(clean, verify=True).format()
    assert "complete: checksums verified" in text and "DAMAGED" not in text
