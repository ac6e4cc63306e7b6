"""Shard commit records and the Parquet tables rebuilt from them (docs/design.md §3.2, §3.3).

A commit record is the only proof that a shard is complete: it is written last, in one atomic step, and
carries the shard's sample rows, skipped images, per-array checksums and on-disk sizes. The three tables
(`index`, `shards`, `skipped`) are a pure function of the plan and the set of commit records, so they can
be rebuilt at any time and a crash can never leave them inconsistent with the data.

Records are read back all together by Arrow's JSON reader (`parse_commits`: one table, one row per record) and the
tables are built from its columns, never from one Python dict per sample: a COCO cache has 1,300 records of 256
rows each (benchmarks/driver_scale.py).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq

from weclip.pipeline.cache.fingerprint import canonical_json
from weclip.pipeline.cache.schema import (COMMIT_PREFIX, INDEX_KEY, REQUIRED_ROW_KEYS, REQUIRED_SKIP_KEYS, ROW_TYPES,
                                   SCHEMA_VERSION, SHARDS_KEY, SKIPPED_KEY, SKIPPED_TYPES, CacheSpec, shard_types)
from weclip.pipeline.errors import CacheError


@dataclass(frozen=True)
class ShardCommit:
    """What a finished shard holds. `rows` are the sample rows in increasing `row` order; `checksums` are
    sha256 hex digests of each array's stored bytes for those rows, in that order; `nbytes` the shard file
    size per array (0 when every row is empty, e.g. all images of the shard were skipped)."""
    shard: int
    fingerprint: str  # the cache fingerprint's digest
    rows: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    checksums: dict[str, str]
    nbytes: dict[str, int]
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> bytes:
        return canonical_json({
            "schema_version": self.schema_version, "shard": self.shard, "fingerprint": self.fingerprint,
            "n_samples": len(self.rows), "n_skipped": len(self.skipped), "rows": self.rows,
            "skipped": self.skipped, "checksums": self.checksums, "nbytes": self.nbytes,
        }).encode()


def shard_checksum(checksums: Mapping[str, str], names: Iterable[str]) -> str:
    """One digest for a whole shard: sha256 over its per-array digests in the given (the spec's) order; the
    record's `checksums` cannot say the order, its JSON keys are sorted."""
    return hashlib.sha256("".join(checksums[n] for n in names).encode()).hexdigest()


def commit_schema(names: Iterable[str]) -> pa.Schema:
    """The Arrow schema of a commit record for arrays `names`: the fixed fields typed as the tables type them; the
    extra keys of sample rows and skipped entries (augmentation parameters, details) are inferred when parsed."""
    names = list(names)
    return pa.schema({
        "schema_version": pa.int64(), "shard": pa.int64(), "fingerprint": pa.string(),
        "rows": pa.list_(pa.struct([(k, t) for k, t in ROW_TYPES.items() if k != "shard"])),
        "skipped": pa.list_(pa.struct([(k, t) for k, t in SKIPPED_TYPES.items() if k != "shard"])),
        "checksums": pa.struct([(n, pa.string()) for n in names]),
        "nbytes": pa.struct([(n, pa.int64()) for n in names]),
    })


# Fields a readable record must have (ShardCommit's); an absent one parses as null.
_REQUIRED = ("schema_version", "shard", "fingerprint", "rows", "skipped", "checksums", "nbytes")


def parse_commits(records: Sequence[tuple[str, bytes]], names: Iterable[str], rows: bool = True) -> pa.Table:
    """Commit records ((key, JSON bytes), in the given order) as one table, one row per record, parsed together by
    Arrow's JSON reader. Extra row keys get the types `pa.array` infers from the same Python values, in first-seen
    order, as the tables had when built from Python dicts (Arrow reads date-like strings as timestamps: those are
    read again as strings). `rows=False` leaves out the sample rows and skipped entries (a size check needs neither;
    about 3× faster). Raises a CacheError naming the first unreadable record (not one JSON object, of other types,
    or lacking a field)."""
    schema = commit_schema(names)
    if not rows:
        schema = pa.schema([f for f in schema if f.name not in ("rows", "skipped")])
    if not records:
        return schema.empty_table()
    objects = [data for _, data in records]
    error: pa.ArrowException | None = None
    try:
        table = _read_json(objects, schema)
        if (plain := _timestamps_as_strings(table.schema)) != table.schema:
            table = _read_json(objects, plain)
    except pa.ArrowException as e:
        error = e
    if error is not None or table.num_rows != len(records):
        for key, data in records:  # find the record to name (only when something is wrong)
            try:
                if _read_json([data], schema).num_rows != 1:
                    raise _unreadable(key, "it holds more than one JSON object")
            except pa.ArrowException as e:
                raise _unreadable(key, str(e)) from e
        raise CacheError(f"the shard commit records under {COMMIT_PREFIX} give a row key values of different types "
                         f"({error}); they were written by different code: re-extract into a new --out")
    for name in (n for n in _REQUIRED if n in schema.names):
        lacking = _lacking(table.column(name))
        if (first := pc.index(lacking, True).as_py()) >= 0:
            raise _unreadable(records[first][0], f"it lacks {name!r} or one of its fields")
    return table


def validate_rows(spec: CacheSpec, shard_index: int, rows: list[dict[str, Any]],
                  skipped: list[dict[str, Any]]) -> np.ndarray:
    """Check a shard's rows against the plan; return their global positions (strictly increasing)."""
    for r in rows:
        missing = [k for k in REQUIRED_ROW_KEYS if k not in r]
        if missing or "shard" in r:
            raise CacheError(f"shard {shard_index}: sample row {r!r} lacks keys {missing} or sets the "
                             "reserved key 'shard'")
    for s in skipped:
        if any(k not in s for k in REQUIRED_SKIP_KEYS):
            raise CacheError(f"shard {shard_index}: skipped entry {s!r} needs keys {list(REQUIRED_SKIP_KEYS)}")
    positions = np.array([r["row"] for r in rows], dtype=np.int64)
    planned = spec.shard_rows(shard_index)
    if len(positions) and (positions.min() < planned.start or positions.max() >= planned.stop
                           or np.any(np.diff(positions) <= 0)):
        raise CacheError(f"shard {shard_index}: rows must be strictly increasing positions inside the plan's "
                         f"[{planned.start}, {planned.stop}), got {positions.tolist()}")
    return positions


@dataclass(frozen=True)
class CacheTables:
    index: pa.Table  # one row per committed sample, sorted by `row`
    shards: pa.Table  # one row per planned shard
    skipped: pa.Table  # one row per skipped image of a committed shard

    def committed(self) -> set[int]:
        return committed_shards(self.shards)

    def keyed(self) -> tuple[tuple[str, pa.Table], ...]:
        """Each table with its store key, in the order `finalize` writes them: `shards.parquet` last, because
        readers compare it with the commit records to tell whether the other two are current."""
        return (INDEX_KEY, self.index), (SKIPPED_KEY, self.skipped), (SHARDS_KEY, self.shards)


def committed_shards(shards: pa.Table) -> set[int]:
    status = shards.column("status").to_pylist()
    return {s for s, st in zip(shards.column("shard").to_pylist(), status) if st == "committed"}


def build_tables(spec: CacheSpec, commits: pa.Table) -> CacheTables:
    """The index, shard and skipped tables of a cache, as a pure function of its commit records (`parse_commits`,
    one row per committed shard, by shard)."""
    names = list(spec.arrays())
    committed = dict(zip(commits.column("shard").to_pylist(), zip(
        pc.list_value_length(commits.column("rows")).to_pylist(),
        pc.list_value_length(commits.column("skipped")).to_pylist(),
        commits.column("checksums").to_pylist(), commits.column("nbytes").to_pylist())))
    shard_rows = []
    for s in range(spec.n_shards):
        if s in committed:
            n_samples, n_skipped, checksums, nbytes = committed[s]
            shard_rows.append({"shard": s, "status": "committed", "n_samples": n_samples, "n_skipped": n_skipped,
                               "checksum": shard_checksum(checksums, names), "bytes": sum(nbytes.values()),
                               **{f"bytes_{n}": nbytes[n] for n in names}})
        else:
            shard_rows.append({"shard": s, "status": "missing", "n_samples": 0, "n_skipped": 0, "checksum": None,
                               "bytes": 0, **{f"bytes_{n}": 0 for n in names}})
    shards = pa.table({k: pa.array([r[k] for r in shard_rows], type=t) for k, t in shard_types(spec).items()})
    return CacheTables(index=_flatten(commits, "rows", ROW_TYPES), shards=shards,
                       skipped=_flatten(commits, "skipped", SKIPPED_TYPES))


def _flatten(commits: pa.Table, field: str, types: dict[str, pa.DataType]) -> pa.Table:
    """One row per element of the records' `field` lists, each with its record's `shard`: the columns of `types`
    first, in that order, then the extra keys in first-seen order (null where an element lacks one)."""
    lists = commits.column(field).combine_chunks()
    items = pc.list_flatten(lists)
    shard = pc.take(commits.column("shard"), pc.list_parent_indices(lists)).cast(types["shard"])
    columns = {k: shard if k == "shard" else items.field(k) for k in types}
    columns.update({f.name: items.field(f.name) for f in items.type if f.name not in types})
    return pa.table(columns)


def _lacking(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Per record: whether a field is null (absent), or for a struct whether any of its fields is."""
    lacking = column.is_null()
    for i in range(column.type.num_fields if pa.types.is_struct(column.type) else 0):
        lacking = pc.or_(lacking, pc.struct_field(column, [i]).is_null())
    return lacking


def _read_json(objects: Sequence[bytes], schema: pa.Schema) -> pa.Table:
    """JSON objects read by Arrow, one row each, with `schema` for the fields it names and inference for the others.
    In one thread, so that inferred fields come in first-seen order (blocks read in parallel merge them in the order
    the blocks finish); a block holds whole objects (Arrow refuses one across two blocks)."""
    block = max(1 << 22, 2 * max(len(data) for data in objects))
    options = pj.ParseOptions(explicit_schema=schema, newlines_in_values=True,
                              unexpected_field_behavior="infer" if "rows" in schema.names else "ignore")
    return pj.read_json(pa.BufferReader(b"\n".join(objects)), parse_options=options,
                        read_options=pj.ReadOptions(block_size=block, use_threads=False))


def _timestamps_as_strings(schema: pa.Schema) -> pa.Schema:
    """The schema with every timestamp type (Arrow's inference for date-like strings; `pa.array` keeps them strings)
    replaced by string, at any depth."""
    def plain(t: pa.DataType) -> pa.DataType:
        if pa.types.is_timestamp(t):
            return pa.string()
        if pa.types.is_struct(t):
            return pa.struct([f.with_type(plain(f.type)) for f in t])
        if pa.types.is_list(t):
            return pa.list_(t.value_field.with_type(plain(t.value_type)))
        return t
    return pa.schema([f.with_type(plain(f.type)) for f in schema])


def _unreadable(key: str, reason: str) -> CacheError:
    return CacheError(f"unreadable shard commit record {key}: {reason}; delete that file and rerun extract to "
                      "rewrite the shard")


def table_to_parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def parquet_to_table(data: bytes) -> pa.Table:
    return pq.read_table(pa.BufferReader(data))
