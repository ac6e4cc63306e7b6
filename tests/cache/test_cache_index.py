"""Commit records read back by Arrow's JSON reader (`parse_commits`) and the tables built from them (`build_tables`),
against a reference that builds the same tables from Python dicts (`json.loads`, one `pa.array` per column)."""
from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa
import pytest

from tests.cache import cache_fakes as fk
from tests.cache.cache_fakes import ARRAY_NAMES

from weclip.pipeline.cache.index import ShardCommit, build_tables, parse_commits
from weclip.pipeline.cache.schema import ROW_TYPES, SKIPPED_TYPES, commit_key, shard_types
from weclip.pipeline.cache.store import CacheReader, CacheWriter
from weclip.pipeline.errors import CacheError

SPEC = fk.tiny_spec(total_samples=40, samples_per_shard=8)  # shards 0..4


def record(shard: int, rows: list[dict[str, Any]], skipped: list[dict[str, Any]] = ()) -> tuple[str, bytes]:
    commit = ShardCommit(shard=shard, fingerprint="f", rows=rows, skipped=list(skipped),
                         checksums={n: f"{n}{shard}" for n in ARRAY_NAMES},
                         nbytes={n: 100 * shard + i for i, n in enumerate(ARRAY_NAMES)})
    return commit_key(shard), commit.to_json()


def row(r: int, **extra: Any) -> dict[str, Any]:
    return {"sample_id": f"img{r // 2}#{r % 2}", "image_id": f"img{r // 2}", "view": r % 2, "row": r,
            "labels": [r % 5, 7], **extra}


def reference_tables(spec, records: list[tuple[str, bytes]]) -> tuple[pa.Table, pa.Table, pa.Table]:
    """index, skipped and shards as the cache built them from Python dicts: typed columns first, then the other keys
    in first-seen order with the types `pa.array` infers, null where a row lacks one."""
    commits = [json.loads(data) for _, data in records]

    def table(items: list[dict[str, Any]], types: dict[str, pa.DataType]) -> pa.Table:
        extra = list(dict.fromkeys(k for item in items for k in item if k not in types))
        columns = {k: pa.array([item.get(k) for item in items], type=t) for k, t in types.items()}
        return pa.table({**columns, **{k: pa.array([item.get(k) for item in items]) for k in extra}})
    index = table([{**r, "shard": c["shard"]} for c in commits for r in c["rows"]], ROW_TYPES)
    skipped = table([{**s, "shard": c["shard"]} for c in commits for s in c["skipped"]], SKIPPED_TYPES)
    by_shard = {c["shard"]: c for c in commits}
    shard_rows = []
    for s in range(spec.n_shards):
        c = by_shard.get(s)
        shard_rows.append({"shard": s, "status": "committed" if c else "missing",
                           "n_samples": len(c["rows"]) if c else 0, "n_skipped": len(c["skipped"]) if c else 0,
                           "checksum": hashlib.sha256("".join(c["checksums"][n] for n in ARRAY_NAMES).encode())
                           .hexdigest() if c else None,
                           "bytes": sum(c["nbytes"].values()) if c else 0,
                           **{f"bytes_{n}": c["nbytes"][n] if c else 0 for n in ARRAY_NAMES}})
    shards = pa.table({k: pa.array([r[k] for r in shard_rows], type=t) for k, t in shard_types(spec).items()})
    return index, skipped, shards


def heterogeneous_records() -> list[tuple[str, bytes]]:
    """Shards 0, 1, 3, 4 (2 missing, 3 all skipped): keys that appear late, nulls, a nested value, a date-like string
    (Arrow would infer a timestamp), ints in one shard and floats in another, skipped entries with and without a
    detail."""
    return [
        record(0, [row(r, scale=0.5 + r, flip=bool(r % 2)) for r in range(8)]),
        record(1, [row(r, scale=1.0, flip=False, note=None if r % 2 else "x", when="2024-05-0" + str(r % 9 + 1),
                       crop={"top": r, "left": 2}) for r in range(8, 14)],
               [{"image_id": "img7", "reason": "image_corrupt", "detail": "truncated"}]),
        record(3, [], [{"image_id": "img12", "reason": "image_missing"}, {"image_id": "img13", "reason": "x"}]),
        record(4, [row(r, scale=2, flip=True, late=[1, 2]) for r in range(32, 40)]),
    ]


def many_records() -> list[tuple[str, bytes]]:
    """Records over more than one of Arrow's 4 MB blocks, whose keys appear in one order in the records and in
    another in the alphabet (the records sort their keys): blocks merged in parallel would reorder them."""
    spec_rows = 8
    return [record(s, [row(s * spec_rows + r, pad="p" * 2000, **({"zeta": 1} if s == 2 else {}),
                           **({"alpha": 0.5} if s == 400 else {})) for r in range(spec_rows)])
            for s in range(450)]


@pytest.mark.parametrize("spec, records", [
    (SPEC, heterogeneous_records()),
    (fk.tiny_spec(total_samples=450 * 8, samples_per_shard=8), many_records()),
], ids=["heterogeneous", "blocks"])
def test_tables_equal_the_python_reference(spec, records):
    tables = build_tables(spec, parse_commits(records, ARRAY_NAMES))
    index, skipped, shards = reference_tables(spec, records)
    assert tables.index.schema.equals(index.schema) and tables.index.equals(index)
    assert tables.skipped.schema.equals(skipped.schema) and tables.skipped.equals(skipped)
    assert tables.shards.equals(shards)


def test_no_record_gives_empty_tables():
    tables = build_tables(SPEC, parse_commits([], ARRAY_NAMES))
    index, skipped, shards = reference_tables(SPEC, [])
    assert tables.index.equals(index) and tables.skipped.equals(skipped) and tables.shards.equals(shards)
    assert tables.index.schema.names == list(ROW_TYPES)


def good(shard: int) -> bytes:
    return record(shard, [row(r, scale=0.5) for r in SPEC.shard_rows(shard)])[1]


@pytest.mark.parametrize("bad, reason", [
    (good(1)[:-40], "JSON"),  # truncated
    (good(1) + b"\n" + good(1), "more than one JSON object"),
    (good(1).replace(b'"view":0', b'"view":"zero"'), ""),  # of another type
    (json.dumps({k: v for k, v in json.loads(good(1)).items() if k != "nbytes"}).encode(), "lacks 'nbytes'"),
    (json.dumps({**json.loads(good(1)), "checksums": {"features": "x"}}).encode(), "lacks 'checksums'"),
], ids=["truncated", "two objects", "type", "no nbytes", "checksums of one array"])
def test_an_unreadable_record_is_named(bad, reason):
    records = [(commit_key(0), good(0)), (commit_key(1), bad), (commit_key(2), good(2))]
    with pytest.raises(CacheError, match=rf"unreadable shard commit record _commits/shard-000001\.json: .*{reason}"):
        parse_commits(records, ARRAY_NAMES)


def test_a_damaged_record_in_a_cache_is_named_by_reader_and_writer(tmp_path):
    spec, fingerprint, root = fk.tiny_spec(), fk.tiny_fingerprint(), tmp_path / "cache"
    writer = CacheWriter.create_or_open(str(root), spec, fingerprint)
    for s in range(spec.n_shards):
        writer.write_shard(s, *fk.shard_inputs(spec, s))
    (root / commit_key(1)).write_bytes(b'{"shard": 1, "rows": [')
    for action in (writer.finalize, lambda: CacheReader(str(root))):
        with pytest.raises(CacheError, match=r"unreadable shard commit record _commits/shard-000001\.json"):
            action()


def test_without_rows_the_records_keep_their_sizes_and_checks():
    records = heterogeneous_records()
    full, sizes = parse_commits(records, ARRAY_NAMES), parse_commits(records, ARRAY_NAMES, rows=False)
    assert "rows" not in sizes.column_names and "skipped" not in sizes.column_names
    for name in ("shard", "fingerprint", "checksums", "nbytes"):
        assert sizes.column(name).equals(full.column(name))
    lacking = json.dumps({k: v for k, v in json.loads(good(1)).items() if k != "nbytes"}).encode()
    with pytest.raises(CacheError, match=r"shard-000001\.json: it lacks 'nbytes'"):
        parse_commits([(commit_key(0), good(0)), (commit_key(1), lacking)], ARRAY_NAMES, rows=False)
