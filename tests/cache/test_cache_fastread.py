"""The batch read path (`pipeline.cache.fastread`) against zarr's own reads of the same store: every float dtype and
compressor of the cache, chunks and shards zarr left out (fill value), other codec chains, damage, and the number of
store requests a batch costs."""
from __future__ import annotations

import multiprocessing
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, GzipCodec, TransposeCodec
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.storage import LocalStore, MemoryStore, WrapperStore

from tests.cache import cache_fakes as fk
from tests.cache.cache_fakes import ARRAY_NAMES

from weclip.pipeline.cache.fastread import EMPTY, BatchReader, coalesce
from weclip.pipeline.cache.store import CacheReader, CacheWriter
from weclip.pipeline.errors import CacheError

COMPRESSORS = ("none", "zstd", "blosc-lz4", "blosc-zstd:1", "blosc-lz4-bit", "blosc-zstd-bit")


def zarr_rows(store, name: str, rows) -> np.ndarray:
    """zarr's own read, row by row: the independent reference."""
    array = zarr.open_group(store, mode="r")[name]
    return np.stack([np.asarray(array[r]) for r in rows])


def write_cache(root, spec, skip=frozenset(), edit=None) -> None:
    writer = CacheWriter.create_or_open(root, spec, fk.tiny_fingerprint(dtype=spec.dtype))
    for shard in range(spec.n_shards):
        arrays, rows, skipped = fk.shard_inputs(spec, shard, skip)
        if edit is not None:
            edit(arrays, rows)
        writer.write_shard(shard, arrays, rows, skipped)
    writer.finalize()


@pytest.mark.parametrize("compressor", COMPRESSORS)
@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["local", "memory"])  # os.pread, or the Store API
def test_reads_equal_zarr_for_every_dtype_and_compressor(tmp_path, kind, dtype, compressor):
    spec = fk.tiny_spec(dtype=dtype, compressor=compressor)
    store = LocalStore(tmp_path / "cache") if kind == "local" else MemoryStore()
    write_cache(store, spec, skip=frozenset({"img3"}))  # rows 6, 7 are never written
    reader = CacheReader(store, threads=2)
    assert (reader._batch._local is not None) == (kind == "local")
    rows = [9, 0, 5, 5, 8, 1]
    stored = reader._read_stored(rows)
    batch = BatchReader(reader.store, reader._arrays, "here")
    skipped = batch.read([6, 7, 2])
    for name in ARRAY_NAMES:
        want = zarr_rows(store, name, rows)
        assert stored[name].dtype == want.dtype == reader.schemas[name].storage_dtype, name
        np.testing.assert_array_equal(stored[name], want, err_msg=name)
        np.testing.assert_array_equal(skipped[name], zarr_rows(store, name, [6, 7, 2]), err_msg=name)
        assert (skipped[name][:2] == reader.schemas[name].fill).all(), name


def test_a_sample_equal_to_the_fill_value_reads_back(tmp_path):
    """zarr stores no chunk for a sample that equals the fill value (all-zero CAMs), and no file for a shard of
    such samples; both read as the fill value, for committed rows too."""
    spec = fk.tiny_spec()

    def zero_cams(arrays, rows):
        for i, row in enumerate(rows):
            if row["row"] in (1, 8, 9):
                arrays["cams"][i] = 0
    root = tmp_path / "cache"
    write_cache(str(root), spec, edit=zero_cams)
    assert not (root / "cams" / "c" / "2" / "0" / "0").exists()  # shard 2 holds rows 8, 9 only
    reader = CacheReader(str(root))
    batch = reader._batch
    got = reader.read([1, 8, 2, 9])
    assert batch._indexes[("cams", 0)][1].tolist() == [EMPTY, EMPTY] and batch._indexes[("cams", 2)] is None
    for name in ARRAY_NAMES:
        np.testing.assert_array_equal(got[name], zarr_rows(LocalStore(root), name, [1, 8, 2, 9]), err_msg=name)
    assert not got["cams"][[0, 1, 3]].any() and got["cams"][2].any()


@pytest.mark.filterwarnings("ignore::UserWarning")  # numcodecs.zarr3 codecs are not in the zarr v3 spec
@pytest.mark.parametrize("chain", ["gzip", "transpose-big-endian", "index-at-start", "numcodecs-async", "bytes-only",
                                   "big-endian-crc32c"])
@pytest.mark.parametrize("kind", ["local", "memory"])
def test_other_codec_chains_decode_like_zarr(tmp_path, kind, chain):
    """Decoding follows the array's metadata, whatever chain it declares."""
    from zarr.codecs.numcodecs import Delta, Shuffle
    kwargs = {
        "gzip": {"compressors": (GzipCodec(level=1), Crc32cCodec())},
        "transpose-big-endian": {"filters": (TransposeCodec(order=(0, 2, 1)),), "serializer": BytesCodec(endian="big"),
                                 "compressors": (BloscCodec(cname="lz4", clevel=3),)},
        "index-at-start": {"compressors": (Crc32cCodec(),)},
        "numcodecs-async": {"filters": (Delta(dtype="int32"),), "compressors": (Shuffle(elementsize=4),)},
        "bytes-only": {"compressors": ()},
        "big-endian-crc32c": {"serializer": BytesCodec(endian="big"), "compressors": (Crc32cCodec(),)},
    }[chain]
    dtype = "int32" if chain == "numcodecs-async" else "float32"  # a float delta is not exact
    shards = {"shape": (4, 3, 5), "index_location": "start"} if chain == "index-at-start" else (4, 3, 5)
    store = LocalStore(tmp_path / "x") if kind == "local" else MemoryStore()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        array = zarr.create_array(store, name="x", shape=(10, 3, 5), chunks=(1, 3, 5), shards=shards, dtype=dtype,
                                  fill_value=-1, **kwargs)
    assert array.metadata.codecs[0].index_location.value == ("start" if chain == "index-at-start" else "end")
    values = (np.random.default_rng(0).standard_normal((10, 3, 5)) * 100).astype(dtype)
    values[[2, 6]] = -1  # left out by zarr
    array[:] = values
    rows = [9, 2, 4, 0, 6, 3]
    reader = BatchReader(store, {"x": array}, "here", threads=2)
    raw = {"index-at-start": True, "bytes-only": False}.get(chain)  # read straight into the output when local
    assert reader.layouts["x"].raw is raw
    got = reader.read(rows)["x"]
    np.testing.assert_array_equal(got, zarr_rows(store, "x", rows))
    np.testing.assert_array_equal(got, values[rows])


def test_a_layout_other_than_one_sample_per_chunk_is_refused():
    array = zarr.create_array(MemoryStore(), name="x", shape=(8, 4), chunks=(2, 4), shards=(4, 4), dtype="uint8")
    with pytest.raises(CacheError, match=r"the feature cache at somewhere: array 'x' is not sharded along the "
                                         r"sample axis with one sample per chunk"):
        BatchReader(array.store, {"x": array}, "somewhere")


class CountingStore(WrapperStore):
    """Records every `get` (key, byte range)."""

    def __init__(self, store):
        super().__init__(store)
        self.gets = []

    async def get(self, key, prototype, byte_range=None):
        self.gets.append((key, byte_range))
        return await self._store.get(key, prototype, byte_range)


def damage(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def shard_file(root: Path, name: str, shard: int) -> Path:
    return root / name / "c" / str(shard) / "/".join("0" * len(fk.tiny_spec().arrays()[name].shape))


@pytest.mark.parametrize("compressor", ["none", "blosc-zstd:1"])  # read into the output / decoded
@pytest.mark.parametrize("kind", ["local", "store"])
@pytest.mark.parametrize("where", ["chunk", "index", "truncated"])
def test_damage_raises_a_cache_error_naming_array_and_shard(tmp_path, where, kind, compressor):
    spec = fk.tiny_spec(compressor=compressor)
    root = tmp_path / "cache"
    write_cache(str(root), spec)
    path = shard_file(root, "features", 1)
    if where == "chunk":
        damage(path, 10)  # inside the first chunk of shard 1: row 4
    elif where == "index":
        damage(path, path.stat().st_size - 8)
    else:
        path.write_bytes(path.read_bytes()[:20])
    reader = CacheReader(str(root) if kind == "local" else CountingStore(LocalStore(root)), check_files=False)
    assert reader.read([0, 8])["features"].shape[0] == 2  # other shards read
    with pytest.raises(CacheError, match=rf"at .*{root}.*: array 'features' of shard 1 \(row [4-7]\) is damaged "
                                         r"\(.+\); rerun `weclip extract --verify`"):
        reader.read([0, 4, 5])
    if where == "chunk":
        reader.read([5])  # the other chunks of the shard are intact


def test_a_batch_costs_one_request_per_run_of_rows_and_each_index_is_read_once():
    spec = fk.tiny_spec()
    base = MemoryStore()
    write_cache(base, spec)
    store = CountingStore(base)
    reader = CacheReader(store)
    shard_files = {name: f"{name}/c/1/" + "/".join("0" * len(s.shape)) for name, s in spec.arrays().items()}
    store.gets.clear()
    reader.read([4, 5, 6, 7])  # all of shard 1: per array, one index read, then one merged chunk read
    for name, key in shard_files.items():
        index, chunks = [r for k, r in store.gets if k == key]
        assert index == SuffixByteRequest(reader._batch.layouts[name].index_nbytes), name
        assert isinstance(chunks, RangeByteRequest) and chunks.start == 0, name
    assert len(store.gets) == 2 * len(ARRAY_NAMES)
    store.gets.clear()
    reader.read([6, 4])  # indexes cached; rows 4 and 6 do not touch: two chunk requests per array
    assert len(store.gets) == 2 * len(ARRAY_NAMES)
    assert {key for key, _ in store.gets} == set(shard_files.values())


def test_coalesce_merges_touching_ranges():
    assert coalesce([(30, 40), (0, 10), (10, 20), (50, 60), (20, 25)]) == [(0, 25, [1, 2, 4]), (30, 40, [0]),
                                                                            (50, 60, [3])]
    assert coalesce([(0, 10), (5, 8)]) == [(0, 10, [0, 1])]
    assert coalesce([]) == []


def _read_in_child(reader, rows, queue):
    queue.put({k: v.tolist() for k, v in reader.read(rows).items()})


def test_a_used_reader_pickles_and_forks(tmp_path):
    """DataLoader workers get the reader forked or pickled after the parent may have used its pool."""
    spec = fk.tiny_spec()
    root = str(tmp_path / "cache")
    write_cache(root, spec)
    reader = CacheReader(root, threads=2)
    want = reader.read([9, 1, 4])
    again = pickle.loads(pickle.dumps(reader))
    assert again._batch._indexes == {} and again._batch._pool is None
    for name in ARRAY_NAMES:
        np.testing.assert_array_equal(again.read([9, 1, 4])[name], want[name])
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_read_in_child, args=(reader, [9, 1, 4], queue))
    child.start()
    got = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    for name in ARRAY_NAMES:
        np.testing.assert_array_equal(np.asarray(got[name], dtype=want[name].dtype), want[name])
