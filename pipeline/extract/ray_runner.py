"""Shard tasks on Ray: a local Ray sized to this machine, the cluster of RAY_ADDRESS, or a named cluster.

Each Ray worker process loads the model once and reuses it for all its shards; a task whose worker (or whole node)
dies is retried (`extract.max_retries`), which is safe because shard writes are idempotent and committed last
(docs/design.md §3.3). Before submitting, the per-task CPU/GPU request is checked against the live nodes, since Ray
keeps a task no node can hold pending forever. A user runtime_env (credentials, settings) is given to the shard tasks
only; weclip never prints or stores it.
"""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import weclip
from weclip.pipeline.errors import ExtractError
from weclip.pipeline.files import json_object_option
from weclip.pipeline.extract.plan import ShardTask
from weclip.pipeline.extract.worker import ExtractJob, ShardOutcome, ShardWorker, run_shard

# The `weclip` package's folder: the root of a source checkout, or site-packages/weclip when weclip is installed.
PACKAGE_ROOT = Path(weclip.__file__).resolve().parent
# What a Ray worker imports (run_shard and the manifest schema); nothing else of the environment is shipped.
WORKER_CONTENT = ("__init__.py", "pipeline", "manifests")
_RAY_EXCLUDES = ["**/__pycache__/"]


def run_ray(job: ExtractJob, tasks: Iterable[ShardTask], address: str | None,
             done: Callable[[ShardOutcome], None], runtime_env: dict[str, Any] | None = None,
             worker: ShardWorker = run_shard) -> ExtractJob:
    """Run the shard tasks as Ray tasks of `worker`; returns the job as the workers ran it (device set).

    runtime_env: given to every shard task; Ray merges it into the job's (env_vars key by key, other fields
    replaced), whichever way this driver joined Ray.
    """
    import ray

    own = not ray.is_initialized()
    if own:
        _init_ray(address)
    try:
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        use_gpu = job.cfg.extract.gpus_per_task > 0 and any(node.get("GPU", 0) > 0 for node in nodes)
        request = {"CPU": job.cfg.extract.cpus_per_task, "GPU": job.cfg.extract.gpus_per_task if use_gpu else 0.0}
        check_feasible(request, nodes)
        job = replace(job, device="cuda" if use_gpu else "cpu")
        remote = ray.remote(worker).options(num_cpus=request["CPU"], num_gpus=request["GPU"],
                                          max_retries=job.cfg.extract.max_retries, runtime_env=runtime_env or {})
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


def check_feasible(request: dict[str, float], nodes: Sequence[dict[str, float]]) -> None:
    """Refuse a per-task request that no single node can hold: Ray would keep such tasks pending without an error."""
    if any(all(node.get(name, 0) >= amount for name, amount in request.items()) for node in nodes):
        return
    wanted = ", ".join(f"{amount:g} {name}" for name, amount in request.items() if amount)
    have = "; ".join(", ".join(f"{node.get(name, 0):g} {name}" for name in ("CPU", "GPU")) for node in nodes)
    raise ExtractError(f"no Ray node can run a shard task needing {wanted or 'no resources'}: the cluster's nodes have "
                       f"[{have or 'no live nodes'}]; lower --cpus-per-task / --gpus-per-task (extract.cpus_per_task "
                       "/ extract.gpus_per_task) or add larger nodes")


def parse_runtime_env(text: str | None) -> dict[str, Any] | None:
    """`--runtime-env`: a JSON object, or @FILE holding one (keeps secrets out of the shell history and `ps`). The
    messages never quote the text, which may hold credentials."""
    if text is None:
        return None
    return json_object_option(text, "--runtime-env", '{"env_vars": {"NAME": "value"}}')


def resource_overrides(cpus_per_task: float | None, gpus_per_task: float | None) -> dict[str, float]:
    """The `extract` config fields the --cpus-per-task / --gpus-per-task options set (those given)."""
    given = {"cpus_per_task": cpus_per_task, "gpus_per_task": gpus_per_task}
    return {name: value for name, value in given.items() if value is not None}


def code_runtime_env() -> dict[str, Any]:
    """The runtime_env that ships weclip's worker code to a named cluster: a copy of WORKER_CONTENT only, so an
    installed weclip does not upload the environment, and the workers run the driver's exact code (the plan and
    fingerprint the driver made must match what they compute)."""
    return {"py_modules": [str(stage_worker_package())], "excludes": list(_RAY_EXCLUDES)}


def stage_worker_package() -> Path:
    """A temporary folder named `weclip` holding WORKER_CONTENT of PACKAGE_ROOT (removed when the driver exits): Ray
    imports a py_module under its folder's name, and a checkout's folder bears the clone's name."""
    folder = Path(tempfile.mkdtemp(prefix="weclip-ray-")) / "weclip"
    atexit.register(shutil.rmtree, folder.parent, True)
    folder.mkdir()
    for name in WORKER_CONTENT:
        source = PACKAGE_ROOT / name
        if source.is_dir():
            shutil.copytree(source, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, folder / name)
    return folder


def ray_init_kwargs(address: str | None) -> dict[str, Any]:
    """How this driver joins Ray: the cluster at `address`; else the cluster of RAY_ADDRESS (`ray job submit` sets
    it; the job's runtime env, e.g. its --working-dir, applies); else a quiet local Ray sized to this machine.

    A driver that joins an existing cluster passes no resources (Ray refuses them then). Workers import `weclip`:
    locally from the driver's own environment (same interpreter, same files), on a named cluster from the copy
    `code_runtime_env` ships, through RAY_ADDRESS from the job's runtime env or the cluster image.
    """
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    if address is not None:
        return {"address": address, "runtime_env": code_runtime_env(), **quiet}
    if os.environ.get("RAY_ADDRESS"):
        return quiet
    return {"num_cpus": os.cpu_count(), "include_dashboard": False, **quiet}


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
        ray.init(address="auto", logging_level=kwargs["logging_level"], log_to_driver=False)
