"""benchmarks/driver_scale.py at a small scale (600 images, 10 shards), so that the COCO-scale driver benchmark
cannot rot: the real extract driver with the stand-in shard worker, a fresh run, a resume with 8 of 10 shards
committed, a rerun on the complete cache, and `weclip inspect` on it."""
from __future__ import annotations

from tests.bench import load_benchmark

from weclip.pipeline.cache.store import CacheReader

IMAGES = 600


def test_driver_scale_small_run(tmp_path):
    bench = load_benchmark("driver_scale")
    result = bench.main(["--images", str(IMAGES), "--executor", "inline", "--workdir", str(tmp_path)])
    shards = -(-IMAGES * 4 // 256)
    skipped = [i for i in range(IMAGES) if i % bench.SKIP_EVERY == bench.SKIP_EVERY - 1]
    fresh, resume = result["fresh"], result["resume"]
    assert (fresh["shards_written"], fresh["shards_resumed"]) == (shards, 0)
    kept = round(shards * 1000 / 1300)
    assert (resume["shards_written"], resume["shards_resumed"]) == (shards - kept, kept)
    assert fresh["views_in_cache"] == resume["views_in_cache"] == (IMAGES - len(skipped)) * 4
    assert fresh["skipped_images"] == resume["skipped_images"] == len(skipped) > 0
    for run in (fresh, resume):
        assert 0 < run["plan_seconds"] <= run["first_shard_start_s"] < run["seconds"]
        assert 0 < run["finalize_seconds"] < run["seconds"]
        assert 0 < run["plan_peak_rss_mb"] <= run["peak_rss_mb"]
        assert 0 < run["finalize_peak_rss_mb"] <= run["peak_rss_mb"]
    rerun = result["rerun_complete"]
    assert (rerun["shards_written"], rerun["shards_resumed"], rerun["first_shard_start_s"]) == (0, shards, None)
    assert result["inspect"]["complete"] and result["inspect"]["seconds"] > 0
    reader = CacheReader(str(tmp_path / "cache"))
    planned = {4 * i + v for i in range(IMAGES) if i not in skipped for v in range(4)}
    assert set(reader.index.column("row").to_pylist()) == planned and reader.committed() == set(range(shards))
