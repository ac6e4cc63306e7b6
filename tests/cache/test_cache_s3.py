"""The cache store on a real S3-compatible server (moto on 127.0.0.1): S3 lists at most 1,000 keys per request, so a
cache with more commit records than that is only read right if listing follows the pages."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from weclip.pipeline.cache.schema import COMMIT_PREFIX
from weclip.pipeline.cache.store import CacheReader, CacheWriter, _list_commits
from tests.cache import cache_fakes as cf
from tests.s3_fakes import moto_server, s3  # noqa: F401  (fixtures)

SHARDS = 1_050  # one sample each: more commit records than one S3 list request returns
MISSING = {7, 1_001, 1_049}  # planned shards left uncommitted


class CommitsOnly(CacheWriter):
    """A stand-in writer that stores no array data (every shard file absent, recorded as 0 bytes) but commits each
    shard exactly as the real writer does, so that a shard costs two requests."""

    def _write_arrays(self, shard_index: int, positions: np.ndarray, stored: dict) -> dict[str, int]:
        return {name: 0 for name in stored}


@pytest.mark.slow  # about 30 s here: some 3,000 requests to the moto server
def test_listing_and_finalize_follow_s3_pages_past_1000_commit_records(s3):
    spec = cf.tiny_spec(total_samples=SHARDS, samples_per_shard=1, grid=(1, 1), dim=1, crop=2, feature_layers=1,
                        attn_layers=1, k_max=1)
    url = s3.url("cache")
    writer = CommitsOnly.create_or_open(url, spec, cf.tiny_fingerprint())
    committed = [s for s in range(SHARDS) if s not in MISSING]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda s: writer.write_shard(s, *cf.shard_inputs(spec, s)), committed))

    one_page = s3.fs.call_s3("list_objects_v2", Bucket=s3.bucket, Prefix=f"cache/{COMMIT_PREFIX}")
    assert one_page["KeyCount"] == 1_000 and one_page["IsTruncated"]  # the server pages like S3 does

    assert _list_commits(writer.store) == committed
    tables = writer.finalize()
    assert tables.committed() == set(committed)
    assert tables.index.column("row").to_pylist() == committed
    assert tables.shards.column("status").to_pylist() == ["missing" if s in MISSING else "committed"
                                                          for s in range(SHARDS)]
    # reads the Parquet tables finalize wrote, once they match the listing (the per-file size check is skipped: the
    # stand-in stored no files, and 6,000 size requests would only slow the test down)
    reader = CacheReader(url, check_files=False)
    assert reader.committed() == set(committed) and reader.index.equals(tables.index)
    assert reader.tables.shards.equals(tables.shards)
