"""The extract driver at COCO scale: planning, resuming and finalizing 82,081 images × 4 views (1,283 shards of 256)
with a stand-in shard worker, and `weclip inspect` on the finished cache.

The driver is the real one (`stages.extract.run`: manifest, plan, model load, fingerprint, cache open and damage
check, Ray task submission and progress, `CacheWriter.finalize` writing the Parquet index); only the shard worker is
a stand-in (`standin_shard`, passed as the stage's `worker`): it draws every view's parameters like the real worker,
writes small arrays through the same `CacheWriter.write_shard` (tiny CacheSpec: the tiny random ViT of
tests/tiny-vit.json at crop 16, grid 1×1) and commits real records of 256 rows each. No image is decoded (the
manifest names COCO-like files that do not exist); one image in `SKIP_EVERY` is reported as undecodable, so the
skipped table is exercised too.

Runs, each driver run in a fresh child process (its own peak RSS): a fresh extract (or, with `--seed-cache`, a copy
of the finished cache of an earlier run of the same job: writing 1,283 stand-in shards takes 20 minutes on a busy
2-core machine); a resume of the same job after deleting the commit records of all but `RESUME_KEPT` of the shards
(seconds from the call to the first new shard's start, then the rest of the job); a rerun on the complete cache
(nothing to write); the CLI `weclip inspect` on it (whole command, interpreter start included). Per driver run: wall seconds of planning (`ExtractSummary.plan_seconds`: manifest, plan, model load,
cache open, damage check) and of finalize (`finalize_seconds`), and the peak RSS inside each phase (VmRSS sampled
every 10 ms) and over the whole process (ru_maxrss; with `--executor inline` it includes the stand-in's own work).
Prints one JSON object.

    PYTHONPATH=. .venv/bin/python benchmarks/driver_scale.py [--images 82081] [--executor ray|inline]
                                                            [--workdir DIR] [--seed-cache DIR/cache]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every raylet binds 127.0.0.1

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(ROOT / "tests" / "tiny-vit.json")
COCO_TRAIN_IMAGES = 82_081
RESUME_KEPT = 1000 / 1300  # share of the shards still committed when the resume run starts
SKIP_EVERY = 500  # the stand-in reports every SKIP_EVERY-th image as undecodable
COMPRESSOR = "none"  # the stand-in's arrays: zarr's per-chunk codec cost is the worker's, not the driver's
FIRST_START = ".first-shard"  # suffix of the file (next to the cache) where the first shard records its start


def bench_config():
    """The COCO preset with 4 views in shards of 256, on the tiny random ViT at crop 16 (features of blocks 1–2,
    attention of blocks 1–3): about 1.3 kB per sample."""
    from weclip.pipeline.config import preset

    return preset("coco").replace(model={"name": "tiny-vit", "pretrained": None}, aug={"crop": 16},
                                  extract={"views": 4, "samples_per_shard": 256, "feature_layers": [1, 2],
                                           "attn_layers": [1, 2, 3], "cpus_per_task": 1, "compressor": COMPRESSOR})


def make_manifest(root: Path, images: int, seed: int = 0) -> Path:
    """A COCO-2014-train-like manifest of `images` rows: COCO's ids and file names, 640×480 or 480×640, 1–7 of the
    80 classes (2.9 on average, as COCO's train set) and one image with 18 (COCO's most, so K_max = 18). The files
    do not exist: the stand-in worker decodes nothing."""
    from weclip.pipeline.data.manifest import ManifestRow, write_manifest
    from weclip.pipeline.model.text import COCO_CLASSES

    rng = np.random.default_rng(seed)
    counts = rng.choice(np.arange(1, 8), size=images, p=[0.2, 0.25, 0.2, 0.15, 0.1, 0.06, 0.04])
    counts[images // 2] = 18
    rows = []
    for i, count in enumerate(counts.tolist()):
        number = 9 + 7 * i  # COCO ids have gaps
        labels = tuple(sorted(rng.choice(len(COCO_CLASSES), size=count, replace=False).tolist()))
        height, width = (480, 640) if i % 3 else (640, 480)
        rows.append(ManifestRow(f"{number:012d}", f"train2014/COCO_train2014_{number:012d}.jpg", None, labels,
                                height, width, "train"))
    (root / "train2014").mkdir(parents=True, exist_ok=True)
    return write_manifest(root / "coco_train.parquet", rows, dataset="coco", class_names=COCO_CLASSES, root=root,
                          command="benchmarks/driver_scale.py", class_set="coco")


def standin_shard(job, task):
    """A `ShardWorker` that commits small arrays: the real rows (view parameters drawn from (seed, image_id, view)),
    values a pure function of each sample's row, every `SKIP_EVERY`-th image skipped; no decode, no model."""
    from weclip.pipeline.cache.store import CacheWriter
    from weclip.pipeline.data.augment import draw_view
    from weclip.pipeline.extract.worker import ShardOutcome, sample_row

    _note_first_start(job.out)
    skip = {s.image.image_id for s in task.samples if (s.row // job.cfg.extract.views) % SKIP_EVERY == SKIP_EVERY - 1}
    samples = [s for s in task.samples if s.image.image_id not in skip]
    rows = [sample_row(s, draw_view(job.cfg.extract.seed, s.image.image_id, s.view, s.image.height, s.image.width,
                                    job.cfg.aug)) for s in samples]
    positions = np.array([s.row for s in samples], dtype=np.int64)
    arrays = {}
    for name, schema in job.spec.arrays().items():
        size = int(np.prod(schema.shape))
        values = ((positions[:, None] + np.arange(size)) % 97 + 1).reshape(len(samples), *schema.shape)
        arrays[name] = (values / 97).astype(np.float32) if schema.floating else (
            values % 2 == 0 if schema.dtype == "bool" else values.astype(schema.dtype))
    writer = CacheWriter.create_or_open(job.out, job.spec, job.fingerprint)
    skipped = [{"image_id": i, "reason": "image_corrupt", "detail": "stand-in"} for i in sorted(skip)]
    commit = writer.write_shard(task.shard, arrays, rows, skipped)
    return ShardOutcome(shard=task.shard, samples=len(rows), skipped_views=len(task.samples) - len(rows),
                        nbytes=sum(commit.nbytes.values()))


def _note_first_start(out: str) -> None:
    """Record the wall time of the first shard any worker starts, once, in a file next to the cache."""
    try:
        fd = os.open(out + FIRST_START, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(repr(time.time()))


class RssSampler:
    """VmRSS of this process every `every` seconds, in a thread: (perf_counter, bytes) pairs."""

    def __init__(self, every: float = 0.01):
        self.samples: list[tuple[float, int]] = []
        self._every, self._stop = every, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with open("/proc/self/statm") as statm:
            while True:
                statm.seek(0)
                self.samples.append((time.perf_counter(), int(statm.read().split()[1]) * self._page))
                if self._stop.wait(self._every):
                    return

    def peak(self, start: float, stop: float) -> int:
        return max((rss for t, rss in self.samples if start <= t <= stop), default=0)


def child_extract(manifest: str, out: str, executor: str) -> dict[str, Any]:
    """One driver run in this (fresh) process; its phase times and peak RSS."""
    from weclip.stages import extract

    cfg = bench_config()
    first = Path(out + FIRST_START)
    first.unlink(missing_ok=True)
    with RssSampler() as rss:
        called, called_wall = time.perf_counter(), time.time()
        summary = extract.run(cfg, manifest, out, executor=executor, progress=False, model_configs=[TINY_CONFIG],
                              device="cpu", worker=standin_shard)
        returned = time.perf_counter()
    plan_end = called + summary.plan_seconds
    finalize_start = returned - summary.finalize_seconds
    return {
        "seconds": summary.seconds, "plan_seconds": summary.plan_seconds,
        "extract_seconds": summary.extract_seconds, "finalize_seconds": summary.finalize_seconds,
        "first_shard_start_s": float(first.read_text()) - called_wall if first.exists() else None,
        "shards_written": summary.shards_written, "shards_resumed": summary.shards_resumed,
        "views_in_cache": summary.views_in_cache, "skipped_images": len(summary.skipped),
        "plan_peak_rss_mb": rss.peak(called, plan_end) / 2**20,
        "finalize_peak_rss_mb": rss.peak(finalize_start, returned) / 2**20,
        "peak_rss_mb": max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 2**10, rss.peak(0, returned)) / 2**20,
    }


def run_child(*args: str) -> dict[str, Any]:
    """`child_extract` in a fresh interpreter running this file (so the stand-in is `__main__`'s, which Ray ships by
    value), importing this checkout's packages."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"driver child {args} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def uncommit_all_but(cache: Path, kept: int) -> int:
    """Delete the commit records of every shard after the first `kept` (a job stopped there); how many were deleted."""
    records = sorted((cache / "_commits").glob("shard-*.json"))
    for record in records[kept:]:
        record.unlink()
    return len(records[kept:])


def timed_inspect(cache: Path) -> dict[str, Any]:
    """`weclip inspect CACHE` as a user runs it (this checkout's cli.py); wall seconds, and its summary's counts."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), "--quiet", "inspect", str(cache)], env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"weclip inspect {cache} failed:\n{done.stderr[-4000:]}")
    return {"seconds": seconds, "complete": "  complete:" in done.stdout}


def measure(images: int, executor: str, workdir: Path, seed_cache: Path | None = None) -> dict[str, Any]:
    cfg = bench_config()
    manifest = make_manifest(workdir / "coco", images)
    cache = workdir / "cache"
    if seed_cache is None:
        fresh = run_child(str(manifest), str(cache), executor)
    else:  # the finished cache of an earlier run of this job: skips writing every shard once more
        shutil.copytree(seed_cache, cache)
        fresh = None
    n_shards = -(-images * cfg.extract.views // cfg.extract.samples_per_shard)
    kept = round(n_shards * RESUME_KEPT)
    uncommit_all_but(cache, kept)
    resume = run_child(str(manifest), str(cache), executor)
    rerun = run_child(str(manifest), str(cache), executor)  # complete: plan, size check, finalize that writes nothing
    timed = fresh or resume
    return {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "job": {"images": images, "views": cfg.extract.views, "samples": images * cfg.extract.views,
                "samples_per_shard": cfg.extract.samples_per_shard, "shards": n_shards, "executor": executor,
                "resume_committed_shards": kept, "worker": "standin_shard (tiny CacheSpec, no decode, no model)",
                "fresh_run": "seeded from an earlier run's cache" if fresh is None else "measured"},
        "fresh": fresh,
        "resume": resume,
        "rerun_complete": rerun,
        "inspect": timed_inspect(cache),
        "goals": {"plan_plus_finalize_s": timed["plan_seconds"] + timed["finalize_seconds"],
                  "plan_plus_finalize_of": "fresh" if fresh else "resume",
                  "peak_rss_mb": max(r["peak_rss_mb"] for r in (fresh, resume, rerun) if r),
                  "resume_first_shard_s": resume["first_shard_start_s"]},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=COCO_TRAIN_IMAGES, help="images of the job (4 views each)")
    parser.add_argument("--executor", choices=("ray", "inline"), default="ray")
    parser.add_argument("--workdir", type=Path, help="where the manifest and cache go (default: a temporary folder)")
    parser.add_argument("--seed-cache", type=Path, help="a finished cache of this job (an earlier run's) to start "
                        "from instead of a fresh run")
    parser.add_argument("--child", nargs=3, metavar=("MANIFEST", "OUT", "EXECUTOR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = child_extract(*args.child)
    elif args.workdir is not None:
        result = measure(args.images, args.executor, args.workdir, args.seed_cache)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = measure(args.images, args.executor, Path(tmp), args.seed_cache)
    print(json.dumps(result, indent=None if args.child else 1))
    return result


if __name__ == "__main__":
    main()
