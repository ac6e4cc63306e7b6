"""Shard tasks on Ray: a local Ray sized to this machine, the cluster of RAY_ADDRESS, or a named cluster.

Each Ray worker process loads the model once and reuses it for all its shards; a task whose worker dies is retried
(`extract.max_retries`), which is safe because shard writes are idempotent and committed last (docs/design.md §3.3).
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline.errors import ExtractError
from pipeline.extract.plan import ShardTask
from pipeline.extract.worker import ExtractJob, ShardOutcome, run_shard

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Never shipped to a remote Ray cluster with the project code.
_RAY_EXCLUDES = [".venv/", ".git/", "tests/", "benchmarks/results/", "**/__pycache__/", "*.parquet", "*.zarr/"]


def run_ray(job: ExtractJob, tasks: Sequence[ShardTask], address: str | None,
             done: Callable[[ShardOutcome], None]) -> ExtractJob:
    """Run the shard tasks as Ray tasks; returns the job as the workers ran it (device set)."""
    import ray

    own = not ray.is_initialized()
    if own:
        _init_ray(address)
    try:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= job.cfg.extract.gpus_per_task > 0
        job = replace(job, device="cuda" if use_gpu else "cpu")
        remote = ray.remote(run_shard).options(num_cpus=job.cfg.extract.cpus_per_task,
                                             num_gpus=job.cfg.extract.gpus_per_task if use_gpu else 0,
                                             max_retries=job.cfg.extract.max_retries)
        job_ref = ray.put(job)
        running = {remote.remote(job_ref, task): task.shard for task in tasks}
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            shard = running.pop(ready[0])
            try:
                done(ray.get(ready[0]))
            except Exception as err:
                raise ExtractError(f"extract shard {shard} of {job.out} failed: {err}. Committed shards are kept; "
                                   "fix the cause and rerun the same command to resume") from err
    finally:
        if own:
            ray.shutdown()
    return job


def ray_init_kwargs(address: str | None) -> dict[str, Any]:
    """How this driver joins Ray: the cluster at `address`; else the cluster of RAY_ADDRESS (`ray job submit` sets
    it; the job's runtime env, e.g. its --working-dir, applies); else a quiet local Ray sized to this machine.

    A driver that joins an existing cluster passes no resources (Ray refuses them then). Workers import `pipeline`:
    locally through PYTHONPATH (same files), on a named cluster by shipping the project folder as the job's
    working_dir.
    """
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    if address is not None:
        return {"address": address, "runtime_env": {"working_dir": str(PROJECT_ROOT), "excludes": _RAY_EXCLUDES},
                **quiet}
    if os.environ.get("RAY_ADDRESS"):
        return quiet
    return {"num_cpus": os.cpu_count(), "include_dashboard": False, "runtime_env": _local_runtime_env(), **quiet}


def _local_runtime_env() -> dict[str, Any]:
    path = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


def _init_ray(address: str | None) -> None:
    """`ray.init` with `ray_init_kwargs`; a Ray already running on this machine (started by `ray start`, which
    `ray.init()` finds by itself) is joined instead of refused."""
    import ray

    kwargs = ray_init_kwargs(address)
    try:
        ray.init(**kwargs)
    except ValueError as err:
        if "existing cluster" not in str(err):
            raise
        ray.init(address="auto", runtime_env=_local_runtime_env(), logging_level=kwargs["logging_level"],
                 log_to_driver=False)
