"""CacheWriter / CacheReader: round trips, exactly-once commits, resume, refusal of foreign or mismatched caches."""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import pickle
import re
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from zarr.storage import FsspecStore, LocalStore, MemoryStore, WrapperStore

from tests.cache import cache_fakes as fk
from tests.cache.cache_fakes import ARRAY_NAMES

from weclip.pipeline.cache.schema import INDEX_KEY, SHARDS_KEY, commit_key
from weclip.pipeline.cache.store import CacheReader, CacheWriter, FingerprintMismatch, NotACache
from weclip.pipeline.errors import CacheError, StorageError


def expected(spec, rows: list[int]) -> dict[str, np.ndarray]:
    """What the cache must return, computed without the cache: numpy casts of the fake samples."""
    cast = {"float16": np.float16, "float32": np.float32}
    out = {}
    for name in ARRAY_NAMES:
        stack = np.stack([fk.sample_arrays(spec, r)[name] for r in rows])
        if name in ("features", "attn", "cams") and spec.dtype != "bfloat16":
            stack = stack.astype(cast[spec.dtype])
        elif name in ("features", "attn", "cams"):
            stack = torch.from_numpy(stack).bfloat16().float().numpy()
        out[name] = stack
    return out


def write_all(root, spec, fingerprint, shards=None, skip=frozenset()) -> CacheWriter:
    writer = CacheWriter.create_or_open(root, spec, fingerprint)
    for s in range(spec.n_shards) if shards is None else shards:
        writer.write_shard(s, *fk.shard_inputs(spec, s, skip))
    return writer


def assert_reads_equal(reader: CacheReader, want: dict[str, np.ndarray], rows: list[int]) -> None:
    got = reader.read(rows)
    for name in ARRAY_NAMES:
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.fixture
def spec():
    return fk.tiny_spec()


@pytest.fixture
def fingerprint():
    return fk.tiny_fingerprint()


@pytest.fixture(params=["memory", "local"])
def root(request, tmp_path):
    return MemoryStore() if request.param == "memory" else str(tmp_path / "cache")


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_round_trip_exact(root, dtype):
    spec, fp = fk.tiny_spec(dtype=dtype), fk.tiny_fingerprint(dtype=dtype)
    write_all(root, spec, fp).finalize()
    reader = CacheReader(root)
    rows = [7, 0, 9, 3, 3, 5]  # any order, repeats allowed
    assert_reads_equal(reader, expected(spec, rows), rows)
    assert reader.read([])["features"].shape == (0, *spec.arrays()["features"].shape)
    one = reader.read_sample(4)
    np.testing.assert_array_equal(one["attn"], expected(spec, [4])["attn"][0])
    assert reader.fingerprint == fp and reader.spec == spec
    assert reader.index.column("row").to_pylist() == list(range(10))
    assert reader.index.column("sample_id").to_pylist() == [fk.sample_row(r)["sample_id"] for r in range(10)]
    assert reader.index.column("shard").to_pylist() == [r // 4 for r in range(10)]
    assert reader.index.column("labels").to_pylist()[3] == fk.sample_row(3)["labels"]
    assert reader.index.column("scale").to_pylist() == [fk.sample_row(r)["scale"] for r in range(10)]
    assert reader.verify() == {}


def test_commit_checksums_are_sha256_of_stored_rows(spec, fingerprint):
    writer = CacheWriter.create_or_open(MemoryStore(), spec, fingerprint)
    commit = writer.write_shard(1, *fk.shard_inputs(spec, 1))
    want = expected(spec, [4, 5, 6, 7])
    for name in ARRAY_NAMES:
        assert commit.checksums[name] == hashlib.sha256(want[name].tobytes()).hexdigest(), name
    assert [r["row"] for r in commit.rows] == [4, 5, 6, 7]


def test_shard_without_commit_record_is_invisible(root, spec, fingerprint, monkeypatch):
    writer = write_all(root, spec, fingerprint, shards=[0, 2])
    monkeypatch.setattr(CacheWriter, "_write_commit", lambda self, commit: None)  # arrays written, no commit
    writer.write_shard(1, *fk.shard_inputs(spec, 1))
    assert writer.committed() == {0, 2}
    reader = CacheReader(root)
    assert reader.index.column("row").to_pylist() == [0, 1, 2, 3, 8, 9]
    assert reader.tables.shards.column("status").to_pylist() == ["committed", "missing", "committed"]
    with pytest.raises(KeyError, match="not committed"):
        reader.read([2, 5])


def test_simulated_crash_then_rerun_matches_uninterrupted(tmp_path, spec, fingerprint, monkeypatch):
    clean = str(tmp_path / "clean")
    write_all(clean, spec, fingerprint).finalize()

    crashed = str(tmp_path / "crashed")
    writer = write_all(crashed, spec, fingerprint, shards=[0])

    def crash(self, commit):
        raise RuntimeError("worker killed")
    with monkeypatch.context() as m:
        m.setattr(CacheWriter, "_write_commit", crash)
        arrays, rows, skipped = fk.shard_inputs(spec, 1)
        garbage = {k: np.ones_like(v) for k, v in arrays.items()}  # the failed attempt wrote other data
        with pytest.raises(RuntimeError, match="worker killed"):
            writer.write_shard(1, garbage, rows, skipped)
    assert writer.committed() == {0}

    resumed = CacheWriter.create_or_open(crashed, spec, fingerprint)
    for s in sorted(set(range(spec.n_shards)) - resumed.committed()):
        resumed.write_shard(s, *fk.shard_inputs(spec, s))
    resumed.finalize()

    a, b = CacheReader(clean), CacheReader(crashed)
    assert a.tables.shards.equals(b.tables.shards)  # per-shard checksums and sizes
    assert a.index.equals(b.index)
    assert b.verify() == {}
    assert_reads_equal(b, expected(spec, list(range(10))), list(range(10)))
    for s in range(spec.n_shards):
        assert (Path(clean) / commit_key(s)).read_bytes() == (Path(crashed) / commit_key(s)).read_bytes()


def test_rewriting_a_shard_is_idempotent(tmp_path, spec, fingerprint):
    root = tmp_path / "cache"
    writer = write_all(str(root), spec, fingerprint, shards=[0])
    files = {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and "zarr.json" not in p.name}
    again = writer.write_shard(0, *fk.shard_inputs(spec, 0))
    assert again.to_json() == (root / commit_key(0)).read_bytes()
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and "zarr.json" not in p.name} == files
    assert writer.committed() == {0}


def test_rewrite_replaces_earlier_rows_instead_of_merging(root, spec, fingerprint):
    writer = write_all(root, spec, fingerprint, shards=[1])
    writer.write_shard(1, *fk.shard_inputs(spec, 1, skip=frozenset({"img3"})))  # rows 6, 7 now absent
    reader = CacheReader(root)
    assert reader.index.column("row").to_pylist() == [4, 5]
    raw = zarr.open_group(reader.store, mode="r")
    assert (raw["cam_classes"][6:8] == -1).all() and not raw["valid"][6:8].any()
    assert not raw["features"][6:8].any()
    assert reader.verify() == {}


def test_skipped_images_are_recorded(root, spec, fingerprint):
    writer = write_all(root, spec, fingerprint, skip=frozenset({"img3"}))
    tables = writer.finalize()
    assert tables.skipped.to_pylist() == [{"image_id": "img3", "reason": "cannot decode", "shard": 1}]
    assert tables.shards.column("n_samples").to_pylist() == [4, 2, 2]
    assert tables.shards.column("n_skipped").to_pylist() == [0, 1, 0]
    reader = CacheReader(root)
    assert reader.index.column("row").to_pylist() == [0, 1, 2, 3, 4, 5, 8, 9]
    with pytest.raises(KeyError):
        reader.read([6])
    assert_reads_equal(reader, expected(spec, [5, 8]), [5, 8])


def test_shard_whose_images_are_all_skipped(spec, fingerprint):
    writer = CacheWriter.create_or_open(MemoryStore(), spec, fingerprint)
    commit = writer.write_shard(2, *fk.shard_inputs(spec, 2, skip=frozenset({"img4"})))
    assert commit.rows == [] and commit.nbytes == {n: 0 for n in ARRAY_NAMES}
    assert writer.committed() == {2}
    assert writer.finalize().skipped.column("image_id").to_pylist() == ["img4"]


def test_finalize_is_idempotent_and_equal_after_resume(root, spec, fingerprint):
    one_shot = MemoryStore()
    want = write_all(one_shot, spec, fingerprint).finalize()

    writer = write_all(root, spec, fingerprint, shards=[2, 0])
    first = writer.finalize()
    assert first.index.column("row").to_pylist() == [0, 1, 2, 3, 8, 9]
    second = writer.finalize()
    for a, b in zip((first.index, first.shards, first.skipped), (second.index, second.shards, second.skipped)):
        assert a.equals(b)

    resumed = CacheWriter.create_or_open(root, spec, fingerprint)
    resumed.write_shard(1, *fk.shard_inputs(spec, 1))
    # index.parquet is stale now: the reader notices and rebuilds from the commit records
    assert CacheReader(root).index.equals(want.index)
    final = resumed.finalize()
    assert final.index.equals(want.index) and final.shards.equals(want.shards)
    assert CacheReader(root).tables.shards.equals(want.shards)


def test_fingerprint_mismatch_names_the_keys(root, spec, fingerprint):
    write_all(root, spec, fingerprint, shards=[0])
    with pytest.raises(FingerprintMismatch) as e:
        CacheWriter.create_or_open(root, spec, fk.tiny_fingerprint(seed=2, views=3))
    assert "fingerprint.seed" in str(e.value) and "fingerprint.views" in str(e.value)
    assert "--out" in str(e.value) and "fingerprint.model" not in str(e.value)
    with pytest.raises(FingerprintMismatch, match="spec.samples_per_shard"):
        CacheWriter.create_or_open(root, fk.tiny_spec(samples_per_shard=5), fingerprint)
    assert CacheWriter.create_or_open(root, spec, fingerprint).committed() == {0}  # same settings resume


def test_reader_refuses_what_is_not_a_cache(tmp_path, spec, fingerprint):
    missing = tmp_path / "nope"
    with pytest.raises(NotACache, match=str(missing)):
        CacheReader(str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NotACache, match=str(empty)):
        CacheReader(str(empty))
    plain = tmp_path / "plain"
    zarr.create_group(LocalStore(plain)).create_array("x", shape=(2,), dtype="int8")
    with pytest.raises(NotACache, match="not a weclip feature cache"):
        CacheReader(str(plain))
    future = tmp_path / "future"
    write_all(str(future), spec, fingerprint, shards=[])
    group = zarr.open_group(LocalStore(future), mode="r+")
    meta = group.attrs["weclip_cache"]
    group.attrs["weclip_cache"] = {**meta, "schema_version": 99}
    with pytest.raises(NotACache, match=r"schema version 99.*") as e:
        CacheReader(str(future))
    assert str(future) in str(e.value)


def test_writer_refuses_a_foreign_location(tmp_path, spec, fingerprint):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"not ours")
    with pytest.raises(NotACache, match="holiday.jpg"):
        CacheWriter.create_or_open(str(foreign), spec, fingerprint)
    assert (foreign / "holiday.jpg").read_bytes() == b"not ours"


def test_interrupted_create_is_completed(tmp_path, spec, fingerprint):
    root = tmp_path / "cache"
    group = zarr.create_group(LocalStore(root))  # crash after the first array, before the root attribute
    group.create_array(**spec.arrays()["features"].zarr_kwargs(spec))
    writer = write_all(str(root), spec, fingerprint)
    writer.finalize()
    assert_reads_equal(CacheReader(str(root)), expected(spec, [0, 9]), [0, 9])


def test_verify_detects_changed_data(root, spec, fingerprint):
    write_all(root, spec, fingerprint).finalize()
    reader = CacheReader(root)
    group = zarr.open_group(reader.store if isinstance(root, MemoryStore) else LocalStore(root), mode="r+")
    group["image"][5, 0, 0, 0] = group["image"][5, 0, 0, 0] ^ 1
    assert reader.verify() == {1: ["image"]}


def test_fsspec_url(spec, fingerprint):
    url = f"memory://weclip-{uuid.uuid4().hex}"
    write_all(url, spec, fingerprint).finalize()
    assert_reads_equal(CacheReader(url), expected(spec, [2, 8]), [2, 8])


def test_commit_record_and_files_on_disk(tmp_path, spec, fingerprint):
    root = tmp_path / "cache"
    commit = write_all(str(root), spec, fingerprint, shards=[0]).write_shard(0, *fk.shard_inputs(spec, 0))
    shard_files = {n: root / n / "c" / "0" / "/".join("0" * (len(spec.arrays()[n].shape))) for n in ARRAY_NAMES}
    assert commit.nbytes == {n: os.path.getsize(p) for n, p in shard_files.items()}
    assert not list(root.rglob("*.partial"))


def test_write_shard_rejects_inputs_outside_the_plan(spec, fingerprint):
    writer = CacheWriter.create_or_open(MemoryStore(), spec, fingerprint)
    arrays, rows, skipped = fk.shard_inputs(spec, 0)
    with pytest.raises(ValueError, match="inside the plan"):
        writer.write_shard(1, arrays, rows, skipped)
    with pytest.raises(ValueError, match="strictly increasing"):
        writer.write_shard(0, {k: v[::-1] for k, v in arrays.items()}, rows[::-1], skipped)
    with pytest.raises(ValueError, match="exactly"):
        writer.write_shard(0, {k: v for k, v in arrays.items() if k != "valid"}, rows, skipped)
    with pytest.raises(TypeError, match="cam_classes"):
        writer.write_shard(0, {**arrays, "cam_classes": arrays["cam_classes"].astype(np.int64)}, rows, skipped)
    with pytest.raises(ValueError, match="lacks keys"):
        writer.write_shard(0, arrays, [{k: v for k, v in r.items() if k != "labels"} for r in rows], skipped)
    with pytest.raises(IndexError):
        writer.write_shard(3, *fk.shard_inputs(spec, 2))
    assert writer.committed() == set()


def test_crash_while_rewriting_a_committed_shard_uncommits_it(root, spec, fingerprint, monkeypatch):
    writer = write_all(root, spec, fingerprint, shards=[0, 1])
    arrays, rows, skipped = fk.shard_inputs(spec, 0)

    def crash(self, shard_index, positions, stored):
        raise RuntimeError("killed mid-write")
    monkeypatch.setattr(CacheWriter, "_write_arrays", crash)
    with pytest.raises(RuntimeError):
        writer.write_shard(0, {k: np.zeros_like(v) for k, v in arrays.items()}, rows, skipped)
    assert writer.committed() == {1}  # the old commit no longer vouches for data that may have changed
    assert CacheReader(root).index.column("row").to_pylist() == [4, 5, 6, 7]


def test_writer_and_reader_pickle(tmp_path, spec, fingerprint):
    """Ray tasks and DataLoader workers receive these objects pickled."""
    root = str(tmp_path / "cache")
    writer = pickle.loads(pickle.dumps(CacheWriter.create_or_open(root, spec, fingerprint)))
    writer.write_shard(2, *fk.shard_inputs(spec, 2))
    reader = pickle.loads(pickle.dumps(CacheReader(root)))
    assert_reads_equal(reader, expected(spec, [9, 8]), [9, 8])


class RecordingStore(WrapperStore):
    """Records the keys written; with `refuse` every write fails the way a read-only file system fails."""

    def __init__(self, store, refuse: bool = False):
        super().__init__(store)
        self.refuse, self.written = refuse, []

    async def set(self, key, value):
        self._attempt(key)
        await self._store.set(key, value)

    async def delete(self, key):
        self._attempt(key)
        await self._store.delete(key)

    def _attempt(self, key):
        self.written.append(key)
        if self.refuse:
            raise OSError(errno.EROFS, "Read-only file system", key)


def files_of(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_finalize_of_a_complete_cache_on_read_only_storage_writes_nothing(tmp_path, spec, fingerprint):
    root = tmp_path / "cache"
    want = write_all(str(root), spec, fingerprint, skip=frozenset({"img3"})).finalize()
    before = files_of(root)
    refusing = RecordingStore(LocalStore(root), refuse=True)
    for store in (LocalStore(root, read_only=True), refusing):
        writer = CacheWriter.create_or_open(store, spec, fingerprint)
        assert writer.committed() == {0, 1, 2}
        tables = writer.finalize()
        assert tables.index.equals(want.index) and tables.shards.equals(want.shards)
        assert tables.skipped.equals(want.skipped)
    assert refusing.written == []
    assert files_of(root) == before


def test_finalize_rewrites_only_the_stale_tables(tmp_path, spec, fingerprint):
    want = write_all(MemoryStore(), spec, fingerprint).finalize()
    root = tmp_path / "cache"
    write_all(str(root), spec, fingerprint, shards=[0, 2]).finalize()
    store = RecordingStore(LocalStore(root))
    writer = CacheWriter.create_or_open(store, spec, fingerprint)
    writer.finalize()
    assert store.written == []
    (root / INDEX_KEY).write_bytes(b"damaged")
    writer.finalize()
    assert store.written == [INDEX_KEY]
    writer.write_shard(1, *fk.shard_inputs(spec, 1))
    store.written.clear()
    tables = writer.finalize()
    assert store.written == [INDEX_KEY, SHARDS_KEY]  # no image is skipped, so skipped.parquet is unchanged
    assert tables.index.equals(want.index) and tables.shards.equals(want.shards)
    reader = CacheReader(str(root))
    assert reader.index.equals(want.index) and reader.tables.shards.equals(want.shards)


def test_stale_index_on_read_only_storage_names_the_location(tmp_path, spec, fingerprint):
    root = tmp_path / "cache"
    write_all(str(root), spec, fingerprint, shards=[0, 1])  # committed, never finalized
    before = files_of(root)
    refusing = RecordingStore(LocalStore(root), refuse=True)
    with pytest.raises(StorageError, match=re.escape(f"at {refusing!r}: Read-only file system; choose a writable")):
        CacheWriter.create_or_open(refusing, spec, fingerprint).finalize()
    assert refusing.written == [INDEX_KEY]  # the first write failed, nothing else was tried
    read_only = CacheWriter.create_or_open(LocalStore(root, read_only=True), spec, fingerprint)
    with pytest.raises(StorageError, match=f"{root}: the store is opened read-only"):
        read_only.finalize()
    with pytest.raises(StorageError, match=f"{root}: the store is opened read-only"):
        read_only.write_shard(2, *fk.shard_inputs(spec, 2))
    assert files_of(root) == before


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.EPERM])
def test_refused_shard_write_is_a_storage_error(tmp_path, spec, fingerprint, monkeypatch, code):
    root = tmp_path / "cache"
    writer = CacheWriter.create_or_open(str(root), spec, fingerprint)

    async def refuse(self, key, value):
        raise OSError(code, os.strerror(code), key)
    monkeypatch.setattr(LocalStore, "set", refuse)
    with pytest.raises(StorageError, match=f"cannot write the feature cache at {root}: {os.strerror(code)};") as e:
        writer.write_shard(0, *fk.shard_inputs(spec, 0))
    assert "\n" not in str(e.value) and e.value.__cause__.errno == code


def test_other_storage_failures_keep_their_error(tmp_path, spec, fingerprint, monkeypatch):
    writer = CacheWriter.create_or_open(str(tmp_path / "cache"), spec, fingerprint)

    async def full(self, key, value):
        raise OSError(errno.ENOSPC, "No space left on device", key)
    monkeypatch.setattr(LocalStore, "set", full)
    with pytest.raises(OSError, match="No space left") as e:
        writer.write_shard(0, *fk.shard_inputs(spec, 0))
    assert not isinstance(e.value, StorageError)


def test_create_on_a_read_only_file_system_names_the_path(tmp_path, spec, fingerprint, monkeypatch):
    root = tmp_path / "cache"

    def refuse(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))
    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(StorageError, match=f"cannot write the feature cache at {root}: Read-only file system"):
        CacheWriter.create_or_open(str(root), spec, fingerprint)
    assert not root.exists()


def test_create_in_a_read_only_store_is_refused(spec, fingerprint):
    with pytest.raises(StorageError, match="the store is opened read-only"):
        CacheWriter.create_or_open(MemoryStore(read_only=True), spec, fingerprint)
    name = f"weclip-{uuid.uuid4().hex}"
    with pytest.raises(StorageError, match=f"at memory:///{name}: the store is opened read-only; choose a writable"):
        CacheWriter.create_or_open(FsspecStore.from_url(f"memory://{name}", read_only=True), spec, fingerprint)


@pytest.mark.parametrize("url", [False, True])
def test_writer_refuses_a_regular_file(tmp_path, spec, fingerprint, url):
    somefile = tmp_path / "somefile"
    somefile.write_bytes(b"not a cache")
    with pytest.raises(StorageError, match=f"{somefile} is a file, but a feature cache is a folder; choose a new"):
        CacheWriter.create_or_open(f"file://{somefile}" if url else str(somefile), spec, fingerprint)
    assert somefile.read_bytes() == b"not a cache"


def test_cache_refusals_are_cache_errors(tmp_path, spec, fingerprint):
    root = str(tmp_path / "cache")
    write_all(root, spec, fingerprint, shards=[0])
    with pytest.raises(CacheError, match="fingerprint.seed"):
        CacheWriter.create_or_open(root, spec, fk.tiny_fingerprint(seed=2))
    with pytest.raises(CacheError, match="not a weclip feature cache"):
        CacheReader(str(tmp_path))
    with pytest.raises(CacheError, match="arrays must be exactly"):
        CacheWriter.create_or_open(root, spec, fingerprint).write_shard(1, {}, [], [])


def test_shard_checksum_covers_the_arrays_in_spec_order(root, spec, fingerprint):
    writer = write_all(root, spec, fingerprint, shards=[1])
    commit = writer.write_shard(0, *fk.shard_inputs(spec, 0))
    want = hashlib.sha256("".join(commit.checksums[n] for n in ARRAY_NAMES).encode()).hexdigest()
    assert CacheReader(root).tables.shards.column("checksum").to_pylist()[0] == want


def test_an_array_declared_by_the_spec_is_written_indexed_and_read(tmp_path, fingerprint):
    spec = fk.tiny_spec(masks=True)  # the optional GT mask crops
    root = tmp_path / "cache"
    write_all(str(root), spec, fingerprint, skip=frozenset({"img3"})).finalize()
    reader = CacheReader(str(root))
    rows = [9, 0, 5]
    got = reader.read(rows)
    assert list(got) == [*ARRAY_NAMES, "gt_mask"]
    np.testing.assert_array_equal(got["gt_mask"], np.stack([fk.sample_arrays(spec, r)["gt_mask"] for r in rows]))
    assert_reads_equal(reader, expected(spec, rows), rows)
    sizes = [os.path.getsize(root / "gt_mask" / "c" / str(s) / "0" / "0") for s in range(spec.n_shards)]
    assert reader.tables.shards.column("bytes_gt_mask").to_pylist() == sizes
    commit = CacheWriter.create_or_open(str(root), spec, fingerprint).write_shard(2, *fk.shard_inputs(spec, 2))
    shard_masks = np.stack([fk.sample_arrays(spec, r)["gt_mask"] for r in (8, 9)])
    assert commit.checksums["gt_mask"] == hashlib.sha256(shard_masks.tobytes()).hexdigest()
    assert not (np.asarray(zarr.open_group(LocalStore(root), mode="r")["gt_mask"][6:8]) != 255).any()  # skipped img3
    assert reader.verify() == {}


@pytest.mark.parametrize("version", [1, 2])  # 2: one compressor and float storage for every array
def test_an_older_schema_version_is_refused_with_re_extract(tmp_path, spec, fingerprint, version):
    old = tmp_path / "old"
    write_all(str(old), spec, fingerprint, shards=[])
    group = zarr.open_group(LocalStore(old), mode="r+")
    group.attrs["weclip_cache"] = {**group.attrs["weclip_cache"], "schema_version": version}
    for open_it in (lambda: CacheReader(str(old)), lambda: CacheWriter.create_or_open(str(old), spec, fingerprint)):
        with pytest.raises(NotACache, match=rf"{re.escape(str(old))} has cache schema version {version}.*re-extract"):
            open_it()


def test_quantised_arrays_are_one_chunk_per_sample_and_read_decoded(tmp_path):
    """int8 features and log8 attention: codes and scales in one chunk per sample, decoded on read within the
    codings' bounds (computed here from the float32 inputs), the other arrays exactly as before."""
    root = tmp_path / "cache"
    spec = fk.tiny_spec(features_storage="int8", features_compressor="none", attn_storage="log8",
                        attn_compressor="zstd:1")
    fp = fk.tiny_fingerprint(features_storage="int8", attn_storage="log8")
    write_all(str(root), spec, fp, skip=frozenset({"img3"})).finalize()
    group = zarr.open_group(LocalStore(root), mode="r")
    n, d = spec.grid[0] * spec.grid[1], spec.dim
    assert group["features"].dtype == np.int8 and group["features"].chunks == (1, 2, n, d + 4)
    assert group["attn"].dtype == np.uint8 and group["attn"].chunks == (1, 3, n, n + 4)
    assert group["features"].attrs["weclip_storage"] == "int8"
    reader = CacheReader(str(root))
    rows = [9, 0, 4]
    got, source = reader.read(rows), {k: np.stack([fk.sample_arrays(spec, r)[k] for r in rows]) for k in ARRAY_NAMES}
    x = source["features"]
    assert got["features"].dtype == np.float32 and got["features"].shape == x.shape
    assert (np.abs(got["features"] - x) <= np.abs(x).max(-1, keepdims=True) / 127 / 2 * (1 + 1e-5)).all()
    a, back = source["attn"], got["attn"]  # 16-wide Dirichlet rows: no value below the row's max · 2^-15.9
    assert (np.abs(back / a - 1) <= 2 ** (1 / 16) - 1).all()  # twice the half step (the sum correction)
    np.testing.assert_allclose(back.sum(-1), a.sum(-1), rtol=1e-5)
    want = expected(spec, rows)
    for name in ("cams", "cam_classes", "image", "valid"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert reader.read([])["attn"].shape == (0, 3, n, n)
    assert not np.asarray(group["features"][6:8]).any()  # img3's skipped rows: the fill value, decoding to zeros
    assert reader.verify() == {}
    with pytest.raises(FingerprintMismatch, match="features_storage"):
        CacheWriter.create_or_open(str(root), spec, fk.tiny_fingerprint(features_storage="fp8", attn_storage="log8"))
    with pytest.raises(FingerprintMismatch, match="spec.attn_compressor"):
        CacheWriter.create_or_open(str(root), dataclasses.replace(spec, attn_compressor="zstd:3"), fp)


def test_a_short_shard_file_is_refused_at_open_and_listed(tmp_path, spec, fingerprint):
    root = tmp_path / "cache"
    write_all(str(root), spec, fingerprint).finalize()
    path = root / "image" / "c" / "2" / "0" / "0" / "0"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CacheError, match=r"shard 2 \(image\).*rerun `weclip extract`"):
        CacheReader(str(root))
    assert CacheReader(str(root), check_files=False).damaged() == {2: ["image"]}
    writer = CacheWriter.create_or_open(str(root), spec, fingerprint)
    assert writer.uncommit_damaged() == {2: ["image"]} and writer.committed() == {0, 1}
