"""`weclip inspect`: what a feature cache holds — fingerprint, counts, sizes, skipped images.

Reads metadata (root attributes, commit records or the finalized Parquet tables) and the size of every committed
shard file; with `verify`, also re-reads every committed shard against its checksums. A cache with missing or
damaged shards is never called complete.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from weclip.pipeline.cache.store import CacheReader, CacheRoot, describe_damage


@dataclass(frozen=True)
class InspectSummary:
    path: str
    fingerprint: dict[str, Any]
    spec: dict[str, Any]
    images: int  # distinct images with at least one committed sample
    views: int  # distinct view numbers among committed samples
    samples: int  # committed samples
    planned_samples: int
    shards_committed: int
    shards_missing: list[int]
    shards_damaged: dict[int, list[str]]  # committed shards with missing, wrong-size (verify: corrupt) files
    verified: bool  # whether the checksums were re-read
    bytes_on_disk: dict[str, int]  # per array of the cache spec, in its order; committed shards
    raw_bytes_per_sample: dict[str, int]  # per array, stored before compression (8-bit codes with their scales)
    storage: dict[str, str]  # per array: "plain" or its 8-bit coding (pipeline/cache/quantize.py)
    compressors: dict[str, str]  # per array
    skipped: list[dict[str, Any]]  # image_id, reason, shard

    @property
    def bytes_per_sample(self) -> float:
        return sum(self.bytes_on_disk.values()) / max(self.samples, 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bytes_per_sample": self.bytes_per_sample}

    def format(self) -> str:
        raw = sum(self.raw_bytes_per_sample.values())
        n = max(self.samples, 1)
        missing = ", ".join(map(str, self.shards_missing[:20])) + (" ..." if len(self.shards_missing) > 20 else "")
        lines = [
            f"feature cache {self.path}",
            f"  fingerprint {self.fingerprint.get('digest', '?')[:16]}  model {self.fingerprint.get('model')} "
            f"({self.fingerprint.get('checkpoint')})  dtype {self.spec['dtype']}",
            f"  {self.images} images, {self.views} views, {self.samples} samples committed "
            f"(plan: {self.planned_samples})",
            f"  shards: {self.shards_committed} committed, {len(self.shards_missing)} missing"
            + (f" [{missing}]" if self.shards_missing else ""),
            _integrity(self.shards_damaged, self.shards_missing, self.verified),
            f"  per sample: {_mb(self.bytes_per_sample)} on disk, {_mb(raw)} raw "
            f"(×{raw / max(self.bytes_per_sample, 1e-9):.2f})",
        ]
        for name, disk in self.bytes_on_disk.items():
            lines.append(f"    {name:<12} {self.storage[name]:<6} {self.compressors[name]:<13} {_mb(disk):>12} on disk  "
                         f"{_mb(disk / n):>10}/sample  {_mb(self.raw_bytes_per_sample[name]):>10}/sample raw")
        lines.append(f"  skipped images: {len(self.skipped)}")
        lines += [f"    {s['image_id']}: {s['reason']}" for s in self.skipped]
        return "\n".join(lines)


def run(cache_path: CacheRoot, verify: bool = False) -> InspectSummary:
    """What the cache holds; `verify` re-reads every committed shard (slow: all the data) instead of sizes only."""
    reader = CacheReader(cache_path, check_files=False)
    tables = reader.tables
    shards = tables.shards.to_pylist()
    index = tables.index
    return InspectSummary(
        path=str(cache_path) if isinstance(cache_path, (str, Path)) else repr(cache_path),
        fingerprint=reader.fingerprint,
        spec=reader.spec.to_dict(),
        images=len(pc.unique(index.column("image_id"))),
        views=len(pc.unique(index.column("view"))),
        samples=index.num_rows,
        planned_samples=reader.spec.total_samples,
        shards_committed=sum(s["status"] == "committed" for s in shards),
        shards_missing=[s["shard"] for s in shards if s["status"] != "committed"],
        shards_damaged=reader.damaged(verify),
        verified=verify,
        bytes_on_disk={name: sum(s[f"bytes_{name}"] for s in shards) for name in reader.schemas},
        raw_bytes_per_sample={name: a.sample_nbytes for name, a in reader.schemas.items()},
        storage={name: a.storage for name, a in reader.schemas.items()},
        compressors={name: a.compressor for name, a in reader.schemas.items()},
        skipped=tables.skipped.select(["image_id", "reason", "shard"]).to_pylist(),
    )


def _integrity(damaged: dict[int, list[str]], missing: list[int], verified: bool) -> str:
    """One line: the damaged shards and how to repair them, or whether the cache is complete."""
    if damaged:
        return (f"  DAMAGED: {describe_damage(damaged)}; rerun `weclip extract` with the same settings and --out"
                + (" --verify" if verified else "") + " to rewrite them")
    checked = "checksums verified" if verified else "file sizes checked (--verify re-reads the checksums)"
    return f"  {'incomplete' if missing else 'complete'}: {checked}"


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f} MB"
