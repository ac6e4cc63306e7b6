"""Feature cache writer and reader over one Zarr v3 store (docs/design.md §3.2, §3.3).

Exactly-once shard commits. A shard's name comes from the plan (`shard_index`), never from the worker.
`write_shard` (1) deletes the shard's commit record if one exists, (2) deletes and rewrites the shard's file
of every array (one file per array: chunk = one sample, shard = one work unit), (3) writes the commit record
`_commits/shard-NNNNNN.json` last, in one atomic step. Readers see only shards with a commit record, so a
crash at any instant leaves either no commit (the rerun rewrites the shard) or a complete shard.

Atomicity of each single write: zarr 3's `LocalStore.set` writes every key (shard files and our commit
records alike) to a temp file `<key stem>.<uuid>.partial` beside it and renames it over the key
(`zarr/storage/_local.py`, `_atomic_write`), so a reader never sees a half-written file; a SIGKILL
mid-write can leave a stray `.partial` file, which no reader looks at. There is no fsync, so this holds for
process crashes, not power loss (`CacheReader.verify` re-checks the checksums). On object stores
(`FsspecStore`) every key is one PUT, which is atomic. `file://` URLs are routed to `LocalStore`, because
fsspec's local `pipe_file` is not atomic. Two attempts of the same shard running *concurrently* are not
supported (Ray retries a task after its failure).

Storage that refuses writes (a store opened read-only, a read-only file system, a missing permission) is
reported as one StorageError naming the location, and only when a write is needed: reopening and finalizing
a complete cache writes nothing.
"""
from __future__ import annotations

import asyncio
import errno
import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import zarr
from zarr.abc.store import Store
from zarr.codecs import Crc32cCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.errors import GroupNotFoundError
from zarr.storage import FsspecStore, LocalStore

from weclip.pipeline.cache import fingerprint as fp
from weclip.pipeline.cache.fastread import BatchReader
from weclip.pipeline.cache.index import (CacheTables, ShardCommit, build_tables, committed_shards, parquet_to_table,
                                  parse_commits, table_to_parquet, validate_rows)
from weclip.pipeline.cache.schema import (COMMIT_PREFIX, CONFIG_KEY, INDEX_KEY, KNOWN_SCHEMA_VERSIONS, ROOT_ATTR,
                                   SCHEMA_VERSION, SHARDS_KEY, SKIPPED_KEY, ArraySchema, CacheSpec, commit_key)
from weclip.pipeline.errors import CacheError, StorageError
from weclip.pipeline.files import is_url, local_path
from weclip.pipeline.storage import url_store

CacheRoot = str | Path | Store


class NotACache(CacheError):
    """The path holds no weclip feature cache (or one this code cannot read)."""


class FingerprintMismatch(CacheError):
    """An existing cache was made with different settings than the ones asked for."""


class CacheWriter:
    """Writes shards of one cache; safe to construct in every worker (`create_or_open` is idempotent)."""

    def __init__(self, store: Store, group: zarr.Group, spec: CacheSpec, fingerprint: dict[str, Any]):
        self.store, self.spec, self.fingerprint = store, spec, fingerprint
        self._schemas = spec.arrays()
        self._arrays = {name: group[name] for name in self._schemas}

    @classmethod
    def create_or_open(cls, root: CacheRoot, spec: CacheSpec, fingerprint: dict[str, Any],
                       provenance: dict[str, Any] | None = None) -> "CacheWriter":
        """Create the cache at `root`, or reopen it to resume when fingerprint and spec are identical.

        `provenance` ({"config": the extract run's resolved config, "class_set": the prompted class set}) is
        recorded at creation, in the root attribute and as a readable `config.json`: the settings a cache fixes
        travel from there to `weclip train` and on to its checkpoints.

        Call it once in the driver before starting workers; workers may call it again (on an existing cache it
        only reads, so a complete cache on read-only storage opens) or receive the pickled writer. Raises
        FingerprintMismatch listing the differing keys; NotACache when `root` holds something else;
        StorageError when `root` is a file, or the cache must be created where nothing may be written.
        """
        if "digest" not in fingerprint:
            raise CacheError("fingerprint lacks 'digest'; build it with pipeline.cache.fingerprint.make_fingerprint")
        store = open_store(root, read_only=False)
        with _refused_writes(_name(root)):  # opening a local store creates its folder
            meta = _root_meta(store)
            if not meta:  # nothing there, or a group whose creation was interrupted
                _refuse_foreign_content(store, spec, root)
                with _writing(store, _name(root)):
                    group = _create(store, spec, fingerprint, provenance or {})
            else:
                _check_version(meta, root)
                _check_same(meta, spec, fingerprint, root)
                group = zarr.open_group(store, mode="r" if store.read_only else "r+")
        return cls(store, group, spec, fingerprint)

    def committed(self) -> set[int]:
        return set(_list_commits(self.store))

    def uncommit_damaged(self, verify: bool = False) -> dict[int, list[str]]:
        """Delete the commit record of every committed shard whose files are missing or of another size than the
        record says (with `verify`, also of every shard whose rows fail their checksums), so that the run that
        follows rewrites it like any uncommitted shard; {shard: damaged arrays}."""
        commits = _load_commits(self.store, self.fingerprint["digest"], self._schemas, rows=verify)
        bad = _file_damage(self.store, self._arrays, _commit_sizes(commits))
        if verify:
            bad = _merge_damage(bad, _checksum_damage(self._arrays, self.spec, commits), self._schemas)
        if bad:
            with _writing(self.store, _name(self.store)):
                for shard in bad:
                    _delete(self.store, commit_key(shard))
        return bad

    def write_shard(self, shard_index: int, arrays: dict[str, np.ndarray], rows: list[dict[str, Any]],
                    skipped: Sequence[dict[str, Any]] = ()) -> ShardCommit:
        """Write (or rewrite) one planned shard and commit it. `rows` are the samples that exist, in increasing
        `row` order, with keys `sample_id, image_id, view, row, labels` plus any augmentation parameters;
        `arrays[name]` stacks those samples in the same order; `skipped` lists `{image_id, reason}` of the
        shard's images that could not be used. Idempotent: a rerun with the same inputs gives the same commit.
        """
        skipped = list(skipped)
        positions = validate_rows(self.spec, shard_index, rows, skipped)
        if set(arrays) != set(self._schemas):
            raise CacheError(f"shard {shard_index}: arrays must be exactly {list(self._schemas)} (the cache spec's), "
                             f"got {sorted(arrays)}")
        stored = {}
        for name, schema in self._schemas.items():
            if len(arrays[name]) != len(rows):
                raise CacheError(f"shard {shard_index}: array {name!r} stacks {len(arrays[name])} samples "
                                 f"for {len(rows)} rows; give one sample per row")
            stored[name] = schema.to_storage(arrays[name])
        with _writing(self.store, _name(self.store)):
            _delete(self.store, commit_key(shard_index))  # the shard is invisible from here until its commit
            nbytes = self._write_arrays(shard_index, positions, stored)
            commit = ShardCommit(shard=shard_index, fingerprint=self.fingerprint["digest"], rows=rows,
                                 skipped=skipped, checksums={n: sha256_array(a) for n, a in stored.items()},
                                 nbytes=nbytes)
            self._write_commit(commit)
        return commit

    def finalize(self) -> CacheTables:
        """Rebuild `index.parquet`, `skipped.parquet` and `shards.parquet` from the commit records, writing only
        those whose stored copy is missing, unreadable or different: rerunning extract on a complete cache then
        writes nothing, which read-only storage allows. `shards.parquet` goes last (`CacheTables.keyed`).
        """
        tables = build_tables(self.spec, _load_commits(self.store, self.fingerprint["digest"], self._schemas))
        stale = [(key, table) for key, table in tables.keyed() if not _stored_equals(self.store, key, table)]
        if stale:
            with _writing(self.store, _name(self.store)):
                for key, table in stale:
                    _set(self.store, key, table_to_parquet(table))
        return tables

    def _write_arrays(self, shard_index: int, positions: np.ndarray,
                      stored: dict[str, np.ndarray]) -> dict[str, int]:
        """Replace the shard file of every array (one whole-shard write per array); return the files' sizes.

        Rows of skipped images are written as the fill value, which zarr does not store (empty chunks are
        left out of the shard), so they cost no space and read back as the fill value.
        """
        planned = self.spec.shard_rows(shard_index)
        nbytes = {}
        for name, values in stored.items():
            array, schema = self._arrays[name], self._schemas[name]
            if len(positions) < len(planned):
                block = np.full((len(planned), *schema.stored_shape), schema.fill, dtype=schema.storage_dtype)
                block[positions - planned.start] = values
                values = block
            key = _shard_key(array, shard_index)
            _delete(self.store, key)  # a rewrite never merges with what an earlier attempt left
            array[planned.start:planned.stop] = values
            nbytes[name] = _size(self.store, key)
        return nbytes

    def _write_commit(self, commit: ShardCommit) -> None:
        _set(self.store, commit_key(commit.shard), commit.to_json())


class CacheReader:
    """Read-only view of the committed part of a cache.

    Opening checks that every committed shard's files exist with the sizes their commit records state (one size
    request per file) and raises a CacheError naming the damaged shards; `check_files=False` opens a damaged
    cache anyway, for `weclip inspect`, which lists `damaged()` instead. Every chunk read is checksummed (crc32c):
    a damaged chunk raises a CacheError naming the array and the shard. `threads` decode a batch's chunks in
    parallel (default: one per CPU)."""

    def __init__(self, root: CacheRoot, check_files: bool = True, threads: int | None = None):
        self.root = root
        self.store = open_store(root, read_only=True)
        meta = _root_meta(self.store)
        if meta is None:
            raise NotACache(f"{_name(root)} is not a weclip feature cache (no zarr group there); "
                            "check the path or run `weclip extract` to build one")
        _check_version(meta, root)
        self.fingerprint: dict[str, Any] = meta["fingerprint"]
        self.provenance: dict[str, Any] = meta.get("provenance", {})  # see CacheWriter.create_or_open
        self.spec = CacheSpec.from_dict(meta["spec"])
        self.schemas: dict[str, ArraySchema] = self.spec.arrays()
        group = zarr.open_group(self.store, mode="r")
        self._arrays = {name: group[name] for name in self.schemas}
        self._batch = BatchReader(self.store, self._arrays, _name(root), threads)
        self._tables: CacheTables | None = None
        self._visible: np.ndarray | None = None  # committed rows, built on the first read
        if check_files and (bad := self.damaged()):
            raise CacheError(f"the feature cache at {_name(root)} has committed shards whose files are missing or "
                             f"of the wrong size: {describe_damage(bad)}; rerun `weclip extract` with the same "
                             "settings and --out to rewrite them")

    @property
    def tables(self) -> CacheTables:
        """`finalize`'s tables when they match the commit records present now, else rebuilt from them."""
        if self._tables is None:
            self._tables = self._load_tables()
        return self._tables

    @property
    def index(self) -> pa.Table:
        return self.tables.index

    def committed(self) -> set[int]:
        return self.tables.committed()

    def read(self, rows: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """Arrays of the given global sample positions, stacked in the given order, decoded (`from_storage`:
        8-bit codes and bfloat16 -> float32)."""
        return {name: self.schemas[name].from_storage(stored) for name, stored in self._read_stored(rows).items()}

    def read_sample(self, row: int) -> dict[str, np.ndarray]:
        return {name: values[0] for name, values in self.read([row]).items()}

    def verify(self) -> dict[int, list[str]]:
        """Re-read every committed shard and compare with its commit checksums; {shard: bad arrays}."""
        return _checksum_damage(self._arrays, self.spec,
                                _load_commits(self.store, self.fingerprint["digest"], self.schemas))

    def damaged(self, verify: bool = False) -> dict[int, list[str]]:
        """Committed shards with a missing or wrong-size file (no data read), and with `verify` also those whose
        rows fail their checksums (`verify()`); {shard: damaged arrays}. `weclip extract` rewrites them."""
        bad = _file_damage(self.store, self._arrays, _recorded_sizes(self.tables.shards, self.schemas))
        return _merge_damage(bad, self.verify(), self.schemas) if verify else bad

    def _read_stored(self, rows: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """The stored arrays of committed rows: one byte-range read and one decode per (array, row), shard
        indexes kept (`pipeline.cache.fastread`)."""
        positions = np.asarray(rows, dtype=np.int64).reshape(-1)
        self._check_committed(positions)
        return self._batch.read(positions)

    def _check_committed(self, positions: np.ndarray) -> None:
        if self._visible is None:
            self._visible = np.zeros(self.spec.total_samples, dtype=bool)
            self._visible[self.index.column("row").to_numpy()] = True
        visible = self._visible
        inside = (positions >= 0) & (positions < self.spec.total_samples)
        missing = positions[~inside | ~visible[np.clip(positions, 0, self.spec.total_samples - 1)]]
        if len(missing):
            raise KeyError(f"rows {missing[:10].tolist()} of {_name(self.root)} are not committed samples "
                           "(skipped image, unfinished shard, or outside the plan)")

    def _load_tables(self) -> CacheTables:
        listed = set(_list_commits(self.store))
        shards_bytes = _get(self.store, SHARDS_KEY)
        if shards_bytes is not None:
            shards = parquet_to_table(shards_bytes)
            if committed_shards(shards) == listed:
                return CacheTables(index=parquet_to_table(_get_required(self.store, INDEX_KEY, self.root)),
                                   shards=shards,
                                   skipped=parquet_to_table(_get_required(self.store, SKIPPED_KEY, self.root)))
        return build_tables(self.spec, _load_commits(self.store, self.fingerprint["digest"], self.schemas))


def open_store(root: CacheRoot, read_only: bool) -> Store:
    """A zarr store for a local path, an fsspec URL (s3://, gs://, memory://, ...; `pipeline.storage.url_store`
    probes its bucket and names a storage failure) or a store instance."""
    if isinstance(root, Store):
        return root
    if is_url(root):
        return url_store(str(root), read_only=read_only)
    path = local_path(root)
    if read_only and not path.is_dir():
        raise NotACache(f"{path} does not exist or is not a directory; expected a weclip feature cache")
    if path.exists() and not path.is_dir():
        raise StorageError(f"{path} is a file, but a feature cache is a folder; choose a new --out (a new or "
                           "empty folder, or an existing cache to resume)")
    return LocalStore(path, read_only=read_only)


def sha256_array(values: np.ndarray) -> str:
    """sha256 of an array's C-order bytes."""
    return hashlib.sha256(np.ascontiguousarray(values).view(np.uint8).data).hexdigest()


def _create(store: Store, spec: CacheSpec, fingerprint: dict[str, Any], provenance: dict[str, Any]) -> zarr.Group:
    """Arrays first, the root attribute last: a crash in between leaves a group the next call recreates. Each
    array's codec chain ends with crc32c, which zarr checks on every chunk read (schema version 2)."""
    group = zarr.create_group(store, overwrite=True)
    for schema in spec.arrays().values():
        kwargs = schema.zarr_kwargs(spec)
        group.create_array(**{**kwargs, "compressors": (*kwargs["compressors"], Crc32cCodec())}, overwrite=True)
    if "config" in provenance:
        _set(store, CONFIG_KEY, (json.dumps(provenance["config"], indent=2) + "\n").encode())
    group.attrs.update({ROOT_ATTR: {"schema_version": SCHEMA_VERSION, "fingerprint": fingerprint,
                                    "spec": spec.to_dict(), "provenance": provenance}})
    return group


def _root_meta(store: Store) -> dict[str, Any] | None:
    """The root attribute of a cache; None when there is no zarr group at all."""
    try:
        group = zarr.open_group(store, mode="r")
    except (GroupNotFoundError, FileNotFoundError):
        return None
    return group.attrs.asdict().get(ROOT_ATTR, {})


def _refuse_foreign_content(store: Store, spec: CacheSpec, root: CacheRoot) -> None:
    """Only an empty location, or one holding our arrays from an interrupted create, may be (re)created.
    Looks at the top level only (a foreign directory may be huge); `.partial` names are zarr's temp files."""
    ours = {"zarr.json", CONFIG_KEY, *spec.arrays()}
    foreign = next((k for k in _collect(store.list_dir("")) if k not in ours and not k.endswith(".partial")), None)
    if foreign is not None:
        raise NotACache(f"{_name(root)} is not empty and is not a weclip feature cache (found {foreign!r}); "
                        "choose a new --out or empty that location")


def _check_version(meta: dict[str, Any], root: CacheRoot) -> None:
    """Refuse what this code cannot read as its own cache: an unknown schema version, or CAMs of another formula."""
    version = meta.get("schema_version")
    if version is None:
        raise NotACache(f"{_name(root)} is a zarr group but not a weclip feature cache (no {ROOT_ATTR!r} root "
                        "attribute); check the path")
    if isinstance(version, int) and version < min(KNOWN_SCHEMA_VERSIONS):
        raise NotACache(f"{_name(root)} has cache schema version {version}, an older format than this code's "
                        f"{SCHEMA_VERSION} (version 3 added per-array storage and compressors); re-extract it with "
                        "`weclip extract` into a new --out (or delete the old cache first)")
    if version not in KNOWN_SCHEMA_VERSIONS:
        raise NotACache(f"{_name(root)} has cache schema version {version}; this code reads versions "
                        f"{sorted(KNOWN_SCHEMA_VERSIONS)}. Re-extract with this version or use a matching weclip")
    fp.require_current_cams(meta["fingerprint"], _name(root))


def _check_same(meta: dict[str, Any], spec: CacheSpec, fingerprint: dict[str, Any], root: CacheRoot) -> None:
    keys = [f"fingerprint.{k}" for k in fp.diff(meta["fingerprint"], fingerprint)]
    # read back through CacheSpec, so a field added since (with its default) differs only when it was set
    keys += [f"spec.{k}" for k in fp.diff(CacheSpec.from_dict(meta["spec"]).to_dict(), spec.to_dict())]
    if keys:
        raise FingerprintMismatch(f"the cache at {_name(root)} was made with different settings: {', '.join(keys)} "
                                  "differ. Resuming needs identical settings; write to a new --out, or delete "
                                  f"{_name(root)} to start over")


def _load_commits(store: Store, digest: str, names: Iterable[str], rows: bool = True) -> pa.Table:
    """The cache's commit records (`parse_commits`, by shard), fetched concurrently; refuses one of another cache."""
    shards = _list_commits(store)
    keys = [commit_key(s) for s in shards]
    commits = parse_commits(list(zip(keys, _get_all_required(store, keys, store))), names, rows)
    for key, shard, record_shard, record_digest in zip(keys, shards, commits.column("shard").to_pylist(),
                                                        commits.column("fingerprint").to_pylist()):
        if record_digest != digest or record_shard != shard:
            raise CacheError(f"commit record {key} belongs to another cache (fingerprint {record_digest}, "
                             f"shard {record_shard}); delete it and rerun extract to rewrite the shard")
    return commits


def _commit_sizes(commits: pa.Table) -> dict[int, dict[str, int]]:
    """{committed shard: {array: file size its commit record states}}."""
    return dict(zip(commits.column("shard").to_pylist(), commits.column("nbytes").to_pylist()))


def describe_damage(bad: dict[int, list[str]]) -> str:
    """'shard 3 (features, attn), shard 7 (image)' for the first few damaged shards, then how many more."""
    return first_few([f"shard {s} ({', '.join(names)})" for s, names in sorted(bad.items())])


def first_few(items: Sequence[Any], shown: int = 5) -> str:
    """The first `shown` items, comma-separated, and how many more there are: messages stay one readable line."""
    more = len(items) - shown
    return ", ".join(map(str, items[:shown])) + (f" and {more} more" if more > 0 else "")


def _recorded_sizes(shards: pa.Table, names: Sequence[str]) -> dict[int, dict[str, int]]:
    """{committed shard: {array: file size its commit record states}} from the shard table."""
    return {r["shard"]: {n: r[f"bytes_{n}"] for n in names} for r in shards.to_pylist() if r["status"] == "committed"}


def _file_damage(store: Store, arrays: dict[str, zarr.Array],
                 recorded: dict[int, dict[str, int]]) -> dict[int, list[str]]:
    """Arrays of each shard whose file is absent or has another size than recorded (an absent file counts as
    0 bytes: a shard whose rows are all skipped has none); one concurrent size request per file."""
    files = [(shard, name, _shard_key(array, shard)) for shard in sorted(recorded) for name, array in arrays.items()]

    async def size(key: str) -> int:
        try:
            return await store.getsize(key)
        except FileNotFoundError:  # what every zarr store raises for an absent key
            return 0

    async def sizes() -> list[int]:
        return await asyncio.gather(*(size(key) for _, _, key in files))
    bad: dict[int, list[str]] = {}
    for (shard, name, _), n in zip(files, sync(sizes())):
        if n != recorded[shard][name]:
            bad.setdefault(shard, []).append(name)
    return bad


def _checksum_damage(arrays: dict[str, zarr.Array], spec: CacheSpec, commits: pa.Table) -> dict[int, list[str]]:
    """Arrays of each committed shard whose rows, re-read, differ from the commit's sha256 or fail to decode."""
    bad: dict[int, list[str]] = {}
    rows = pc.list_flatten(commits.column("rows").combine_chunks()).field("row").to_numpy()
    ends = np.cumsum(pc.list_value_length(commits.column("rows")).to_numpy())
    for shard, checksums, present in zip(commits.column("shard").to_pylist(), commits.column("checksums").to_pylist(),
                                         np.split(rows, ends[:-1])):
        planned = spec.shard_rows(shard)
        for name, array in arrays.items():
            try:
                intact = sha256_array(array[planned.start:planned.stop][present - planned.start]) == checksums[name]
            except ValueError:  # zarr's crc32c mismatch
                intact = False
            if not intact:
                bad.setdefault(shard, []).append(name)
    return bad


def _merge_damage(a: dict[int, list[str]], b: dict[int, list[str]], names: Iterable[str]) -> dict[int, list[str]]:
    """Both findings per shard, arrays in the spec's order."""
    order = list(names)
    return {s: [n for n in order if n in a.get(s, ()) or n in b.get(s, ())] for s in sorted({*a, *b})}


def _list_commits(store: Store) -> list[int]:
    """Shard numbers with a commit record (`.partial` temp files of an interrupted write are ignored)."""
    names = (k.removeprefix(COMMIT_PREFIX) for k in _collect(store.list_prefix(COMMIT_PREFIX)))
    return sorted(int(n[len("shard-"):-len(".json")]) for n in names
                  if n.startswith("shard-") and n.endswith(".json"))


def _shard_key(array: zarr.Array, shard_index: int) -> str:
    coords = (shard_index,) + (0,) * (array.ndim - 1)
    return f"{array.path}/{array.metadata.encode_chunk_key(coords)}"


def _name(root: CacheRoot) -> str:
    """The location for messages: a path or URL as given; a local store's folder, an fsspec store's URL."""
    if isinstance(root, LocalStore):
        return str(root.root)
    if isinstance(root, FsspecStore):
        return root.fs.unstrip_protocol(root.path)
    return repr(root) if isinstance(root, Store) else str(root)


def _stored_equals(store: Store, key: str, table: pa.Table) -> bool:
    """Whether `key` holds a Parquet file with exactly this table (a damaged file counts as different)."""
    data = _get(store, key)
    if data is None:
        return False
    try:
        return parquet_to_table(data).equals(table)
    except pa.ArrowException:
        return False


# errno values of storage that refuses writes; object stores raise a PermissionError without errno.
_REFUSED = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


@contextmanager
def _refused_writes(where: str) -> Iterator[None]:
    """Turn a write the storage refuses inside this block into one StorageError naming the location."""
    try:
        yield
    except OSError as e:
        if not (isinstance(e, PermissionError) or e.errno in _REFUSED):
            raise
        raise _write_refused(where, e.strerror or str(e)) from e


@contextmanager
def _writing(store: Store, where: str) -> Iterator[None]:
    """A block that writes: refused up front on a store opened read-only (zarr would raise a bare ValueError),
    and refused writes of the storage itself reported like `_refused_writes`."""
    if store.read_only:
        raise _write_refused(where, "the store is opened read-only")
    with _refused_writes(where):
        yield


def _write_refused(where: str, reason: str) -> StorageError:
    return StorageError(f"cannot write the feature cache at {where}: {reason}; choose a writable --out, or make "
                        f"{where} writable")


# Synchronous wrappers of zarr's async store API.
def _get(store: Store, key: str) -> bytes | None:
    buf = sync(store.get(key, prototype=default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def _get_all_required(store: Store, keys: Sequence[str], where: Any) -> list[bytes]:
    """`_get_required` of every key, fetched concurrently (one round trip's latency, not one per key)."""
    async def get_all() -> list[Any]:
        return await asyncio.gather(*(store.get(k, prototype=default_buffer_prototype()) for k in keys))
    values = sync(get_all())
    if (missing := next((k for k, buf in zip(keys, values) if buf is None), None)) is not None:
        raise _missing_key(where, missing)
    return [buf.to_bytes() for buf in values]


def _missing_key(where: Any, key: str) -> NotACache:
    return NotACache(f"{_name(where)}: {key} is missing; rerun `weclip extract` (it finalizes the index)")


def _get_required(store: Store, key: str, where: Any) -> bytes:
    data = _get(store, key)
    if data is None:
        raise _missing_key(where, key)
    return data


def _set(store: Store, key: str, data: bytes) -> None:
    sync(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))


def _delete(store: Store, key: str) -> None:
    sync(store.delete(key))


def _size(store: Store, key: str) -> int:
    return sync(store.getsize(key)) if sync(store.exists(key)) else 0


def _collect(keys: AsyncIterator[str]) -> list[str]:
    async def collect() -> list[str]:
        return [k async for k in keys]
    return sync(collect())
