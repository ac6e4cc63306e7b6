"""Shard commit records and the Parquet tables rebuilt from them (docs/design.md §3.2, §3.3).

A commit record is the only proof that a shard is complete: it is written last, in one atomic step, and
carries the shard's sample rows, skipped images, per-array checksums and on-disk sizes. The three tables
(`index`, `shards`, `skipped`) are a pure function of the plan and the set of commit records, so they can
be rebuilt at any time and a crash can never leave them inconsistent with the data.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cache.fingerprint import canonical_json
from pipeline.cache.schema import (INDEX_KEY, REQUIRED_ROW_KEYS, REQUIRED_SKIP_KEYS, ROW_TYPES, SCHEMA_VERSION,
                                   SHARDS_KEY, SKIPPED_KEY, SKIPPED_TYPES, CacheSpec, shard_types)
from pipeline.errors import CacheError


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

    def checksum(self, names: Iterable[str]) -> str:
        """One digest for the whole shard: sha256 over the per-array digests in the given (the spec's) order;
        `checksums` itself cannot say the order, its JSON keys are sorted."""
        return hashlib.sha256("".join(self.checksums[n] for n in names).encode()).hexdigest()

    def to_json(self) -> bytes:
        return canonical_json({
            "schema_version": self.schema_version, "shard": self.shard, "fingerprint": self.fingerprint,
            "n_samples": len(self.rows), "n_skipped": len(self.skipped), "rows": self.rows,
            "skipped": self.skipped, "checksums": self.checksums, "nbytes": self.nbytes,
        }).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "ShardCommit":
        try:
            d = json.loads(data)
            return cls(shard=d["shard"], fingerprint=d["fingerprint"], rows=d["rows"], skipped=d["skipped"],
                       checksums=d["checksums"], nbytes=d["nbytes"], schema_version=d["schema_version"])
        except (ValueError, KeyError) as e:
            raise CacheError(f"unreadable shard commit record {where}: {e!r}; delete that file and rerun "
                             "extract to rewrite the shard") from e


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


def build_tables(spec: CacheSpec, commits: Mapping[int, ShardCommit]) -> CacheTables:
    """The index, shard and skipped tables of a cache, as a pure function of its commit records."""
    names = list(spec.arrays())
    ordered = [commits[s] for s in sorted(commits)]
    samples = [{**r, "shard": c.shard} for c in ordered for r in c.rows]
    skipped = [{**s, "shard": c.shard} for c in ordered for s in c.skipped]
    shard_rows = []
    for s in range(spec.n_shards):
        c = commits.get(s)
        shard_rows.append({
            "shard": s, "status": "committed" if c else "missing",
            "n_samples": len(c.rows) if c else 0, "n_skipped": len(c.skipped) if c else 0,
            "checksum": c.checksum(names) if c else None, "bytes": sum(c.nbytes.values()) if c else 0,
            **{f"bytes_{n}": c.nbytes[n] if c else 0 for n in names},
        })
    return CacheTables(index=_table(samples, ROW_TYPES), shards=_table(shard_rows, shard_types(spec)),
                       skipped=_table(skipped, SKIPPED_TYPES))


def _table(rows: list[dict[str, Any]], types: dict[str, pa.DataType]) -> pa.Table:
    """Columns of `types` first, with those types; any other keys (augmentation parameters) after them,
    in first-seen order, with inferred types (null where a row lacks the key)."""
    extra = list(dict.fromkeys(k for r in rows for k in r if k not in types))
    columns = {k: pa.array([r.get(k) for r in rows], type=t) for k, t in types.items()}
    columns.update({k: pa.array([r.get(k) for r in rows]) for k in extra})
    return pa.table(columns)


def table_to_parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def parquet_to_table(data: bytes) -> pa.Table:
    return pq.read_table(pa.BufferReader(data))
