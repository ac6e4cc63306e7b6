"""Stage `extract`: run the frozen CLIP once per planned training view and store the feature cache (docs/design.md §3).

The driver reads the manifest, builds the plan (pipeline/extract/plan.py), loads the backbone once to learn its
identity and shapes, fingerprints the run, creates (or reopens, to resume) the cache, and then runs every shard
that has no commit record yet — in this process (`executor="inline"`) or as Ray tasks (`executor="ray"`,
`pipeline/extract/ray_runner.py`). Finally the Parquet index is rebuilt from the commit records.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from tqdm import tqdm

from weclip.pipeline.cache.store import CacheWriter
from weclip.pipeline.config import Config
from weclip.pipeline.data.manifest import read_manifest
from weclip.pipeline.errors import ConfigError
from weclip.pipeline.extract import estimate
from weclip.pipeline.extract.plan import cache_layout, make_plan
from weclip.pipeline.extract.ray_runner import run_ray
from weclip.pipeline.extract.worker import ExtractJob, ShardOutcome, ShardWorker, run_shard
from weclip.pipeline.files import absolute_location
from weclip.pipeline.model.backbone import default_device, load_backbone
from weclip.pipeline.storage import storage_errors, storage_options

Executor = Literal["ray", "inline"]


@dataclass(frozen=True)
class ExtractSummary:
    out: str
    fingerprint: str  # the cache fingerprint's digest
    executor: str
    device: str
    images: int  # planned images
    views_planned: int
    views_written: int  # by this run
    views_skipped: int  # by this run: planned views of images that could not be decoded
    views_in_cache: int  # committed samples after this run (resumed ones included)
    skipped: list[dict[str, Any]]  # the cache's skipped images: image_id, reason, shard (an image per shard it spans)
    shards: int
    shards_written: int  # by this run
    shards_resumed: int  # already committed when the run started
    shards_repaired: int  # committed, but with missing, wrong-size (or, with verify, corrupt) files: rewritten
    seconds: float  # whole run, Ray start and model load included
    plan_seconds: float  # before the shard phase: manifest, plan, model load, cache open, damage check
    extract_seconds: float  # the shard phase only (Ray start included)
    finalize_seconds: float  # the Parquet index rebuilt from the commit records
    bytes_per_view: float  # on disk, committed shards, all arrays
    raw_bytes_per_view: int  # stored before compression (8-bit codes with their scales), all arrays

    @property
    def views_per_s(self) -> float:
        return self.views_written / self.extract_seconds if self.extract_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "views_per_s": self.views_per_s}

    def format(self) -> str:
        lines = [
            f"feature cache {self.out} (fingerprint {self.fingerprint[:16]})",
            f"  plan: {self.views_planned} views of {self.images} images in {self.shards} shards",
            f"  this run: {self.views_written} views written, {self.views_skipped} skipped, {self.shards_written} "
            f"shards ({self.shards_resumed} already committed, {self.shards_repaired} repaired), executor {self.executor} on {self.device}",
            f"  {self.seconds:.1f} s in all: {self.plan_seconds:.1f} s planning, {self.extract_seconds:.1f} s "
            f"extracting ({self.views_per_s:.2f} views/s), {self.finalize_seconds:.1f} s writing the index",
            f"  cache: {self.views_in_cache} views, {self.bytes_per_view / 1e6:.3f} MB/view on disk "
            f"({self.raw_bytes_per_view / 1e6:.3f} MB raw)",
            f"  skipped images: {len({s['image_id'] for s in self.skipped})}",
        ]
        lines += [f"    {s['image_id']}: {s['reason']} (shard {s['shard']})" for s in self.skipped]
        return "\n".join(lines)


def run(cfg: Config, manifest_path: str | Path, out: str | Path, executor: Executor = "ray",
        ray_address: str | None = None, limit: int | None = None, progress: bool = True,
        model_configs: Sequence[str | Path] = (), device: str | None = None, dry_run: bool = False,
        views_per_s: float | None = None, verify: bool = False, runtime_env: dict[str, Any] | None = None,
        worker: ShardWorker = run_shard) -> ExtractSummary | estimate.DryRunSummary:
    """Extract the feature cache of a manifest into `out` (a local folder or an fsspec URL); resume if it exists.

    executor: "ray" (a local Ray sized to this machine, or the cluster at `ray_address`) or "inline" (this process).
    limit: only the first `limit` images of the manifest (a different plan, so a different cache).
    model_configs: extra open_clip model config JSONs to register in the driver and every worker.
    dry_run: only plan, and return the bill (`pipeline.extract.estimate`): no weights loaded, no image decoded,
    nothing written or read at `out`; `views_per_s` (dry runs only) prices the time.
    verify: on an existing cache, re-read every committed shard against its checksums (else sizes only); damaged
    shards are uncommitted and rewritten.
    runtime_env: Ray runtime_env for the shard tasks (e.g. credentials as env_vars); passed to Ray only, never stored.
    worker: what computes and commits one shard (`pipeline.extract.worker.ShardWorker`; a stand-in for benchmarks).
    Raises FingerprintMismatch when `out` holds a cache made with other settings.
    """
    if executor not in ("ray", "inline"):
        raise ConfigError(f"executor must be 'ray' or 'inline', got {executor!r}")
    started = time.perf_counter()
    manifest = read_manifest(manifest_path)
    plan = make_plan(manifest, cfg, limit)
    configs = tuple(str(Path(p).resolve()) for p in model_configs)  # workers may run in another folder
    if dry_run:
        return estimate.dry_run(cfg, plan, str(out), configs, views_per_s)
    if views_per_s is not None:
        raise ConfigError("--views-per-s prices a dry run; add --dry-run, or drop --views-per-s")
    # the driver's backbone (inline: the one that extracts); Ray workers use cuda when the cluster has GPUs
    device = str(default_device(device)) if executor == "inline" else "cpu"
    backbone = load_backbone(cfg.model, device, configs)
    fingerprint, spec = cache_layout(cfg, plan, backbone)
    root = absolute_location(out)
    provenance = {"config": cfg.to_dict(), "class_set": plan.classes.to_dict()}  # what train and evaluate adopt
    writer = CacheWriter.create_or_open(root, spec, fingerprint, provenance)  # once, before any worker (§3.3)
    repaired = writer.uncommit_damaged(verify)  # damaged committed shards lose their commit and are rerun
    committed = writer.committed()
    pending = [s for s in range(plan.n_shards) if s not in committed]
    tasks = (plan.task(s) for s in pending)  # each built when submitted: the first one goes out at once
    job = ExtractJob(cfg=cfg, out=root, spec=spec, fingerprint=fingerprint, classes=plan.classes,
                     model_configs=configs, device=device, storage_options=storage_options())
    bar = tqdm(total=sum(len(spec.shard_rows(s)) for s in pending), unit="view", desc="extract", disable=not progress)
    extract_start = time.perf_counter()
    outcomes: list[ShardOutcome] = []

    def done(outcome: ShardOutcome) -> None:
        outcomes.append(outcome)
        bar.update(outcome.samples + outcome.skipped_views)

    with bar, storage_errors(root):  # a store that fails mid-run (endpoint down, credentials revoked): one line
        if executor == "inline":
            for task in tasks:
                done(worker(job, task))
        elif pending:  # a complete cache needs no Ray
            job = run_ray(job, tasks, ray_address, done, runtime_env, worker)
        finalize_start = time.perf_counter()
        tables = writer.finalize()
        finalize_seconds = time.perf_counter() - finalize_start
    shards = tables.shards.to_pylist()
    views_in_cache = tables.index.num_rows
    return ExtractSummary(
        out=root, fingerprint=fingerprint["digest"], executor=executor, device=job.device, images=len(plan.images),
        views_planned=plan.total_samples, views_written=sum(o.samples for o in outcomes),
        views_skipped=sum(o.skipped_views for o in outcomes), views_in_cache=views_in_cache,
        skipped=tables.skipped.select(["image_id", "reason", "shard"]).to_pylist(), shards=plan.n_shards,
        shards_written=len(outcomes), shards_resumed=len(committed), shards_repaired=len(repaired),
        seconds=time.perf_counter() - started, plan_seconds=extract_start - started,
        extract_seconds=finalize_start - extract_start, finalize_seconds=finalize_seconds,
        bytes_per_view=sum(s["bytes"] for s in shards) / max(views_in_cache, 1),
        raw_bytes_per_view=sum(a.sample_nbytes for a in spec.arrays().values()))

