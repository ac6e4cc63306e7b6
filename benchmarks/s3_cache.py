"""The feature cache on an S3-compatible server: what the object store costs against a local folder.

Everything runs against moto's S3 server started in this process on 127.0.0.1 (no network; latency is the
loopback's plus moto's own, far below a real S3's ~10-30 ms per request, so these are lower bounds of the gaps).

* `commit_records`: reading N commit records (what `finalize` and a reader without current Parquet tables do) one
  GET at a time (the code before) against the concurrent fetch of `pipeline.cache.store._load_commits`, alternating
  `--repeats` times; medians and their ratio.
* `extract`: a whole inline extract (tiny random ViT, tests/tiny-vit.json; 5 images × 2 views, 4 shards) into a local
  folder against one into the bucket, alternating; medians and their ratio.

    PYTHONPATH=. .venv/bin/python benchmarks/s3_cache.py [--records 1000 --repeats 3]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from weclip.pipeline.cache.index import ShardCommit
from weclip.pipeline.cache.schema import commit_key
from weclip.pipeline.cache.store import _get, _list_commits, _load_commits, open_store

TESTS = Path(__file__).resolve().parents[1] / "tests"


def start_server() -> str:
    """moto's S3 server on a free port of 127.0.0.1, and this process's AWS settings pointing at it only."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    return endpoint


def sequential_commits(store, digest: str) -> dict[int, ShardCommit]:
    """The baseline: one GET after the other."""
    return {s: ShardCommit.from_json(_get(store, commit_key(s)), commit_key(s)) for s in _list_commits(store)}


def commit_records(bucket: str, records: int, repeats: int) -> dict:
    import s3fs

    digest = "0" * 64
    fs = s3fs.S3FileSystem()
    fs.pipe({f"{bucket}/commits/{commit_key(s)}": ShardCommit(s, digest, [], [], {}, {}).to_json()
             for s in range(records)})
    store = open_store(f"s3://{bucket}/commits", read_only=True)
    times: dict[str, list[float]] = {"sequential": [], "concurrent": []}
    for _ in range(repeats):
        for name, load in (("sequential", sequential_commits), ("concurrent", _load_commits)):
            start = time.perf_counter()
            assert len(load(store, digest)) == records
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    return {"records": records, "seconds": times, "median_s": median,
            "speedup": median["sequential"] / median["concurrent"]}


def extract_local_vs_s3(bucket: str, repeats: int) -> dict:
    import sys

    sys.path.insert(0, str(TESTS.parent))
    from weclip.stages import extract
    from tests.stages import extract_fakes as xf

    cfg = xf.tiny_config()
    times: dict[str, list[float]] = {"local": [], "s3": []}
    with tempfile.TemporaryDirectory() as tmp:
        manifest = xf.make_dataset(Path(tmp))
        for i in range(repeats):
            for name, out in (("local", str(Path(tmp) / f"cache{i}")), ("s3", f"s3://{bucket}/cache{i}")):
                summary = extract.run(cfg, manifest, out, executor="inline", progress=False,
                                      model_configs=[xf.TINY_CONFIG])
                times[name].append(summary.seconds)
    median = {name: statistics.median(t) for name, t in times.items()}
    return {"views": 10, "shards": 4, "seconds": times, "median_s": median,
            "s3_over_local": median["s3"] / median["local"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    endpoint = start_server()
    import s3fs

    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem().mkdir(bucket)
    result = {"benchmark": "s3_cache", "server": f"moto {__import__('moto').__version__} at {endpoint}",
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "commit_records": commit_records(bucket, args.records, args.repeats),
              "extract": extract_local_vs_s3(bucket, args.repeats)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
