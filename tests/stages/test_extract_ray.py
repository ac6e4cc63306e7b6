"""Stage `extract` on a local Ray: the same cache, bit for bit, as the inline executor, also after a killed worker."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.stages import extract_fakes as xf

from weclip.pipeline.extract import ray_runner
from weclip.stages import extract


def test_local_ray_matches_inline(tmp_path):
    """Same arrays and index from Ray tasks (model loaded once per worker process) as from the inline loop. Each task
    gets as many CPUs as this process has torch threads: float GEMMs sum in an order that depends on the thread
    count, so bit equality needs equal thread counts."""
    manifest = xf.make_dataset(tmp_path)
    cfg = xf.tiny_config(cpus_per_task=torch.get_num_threads())
    runs = {executor: extract.run(cfg, manifest, tmp_path / executor, executor=executor, progress=False,
                                  model_configs=[xf.TINY_CONFIG]) for executor in ("inline", "ray")}
    assert (runs["ray"].executor, runs["ray"].device, runs["ray"].views_written, runs["ray"].shards_written) == \
        ("ray", "cpu", 10, 4)
    assert runs["ray"].fingerprint == runs["inline"].fingerprint
    sums, index = xf.checksums(tmp_path / "ray")
    expected_sums, expected_index = xf.checksums(tmp_path / "inline")
    assert len(sums) == 4 and sums == expected_sums and index.equals(expected_index)


@pytest.mark.slow
def test_ray_retries_a_shard_whose_worker_was_killed(tmp_path):
    """A Ray worker SIGKILLed inside shard 1, after part of its arrays are written, is replaced and the task retried
    (`extract.max_retries`); the cache still equals the inline one. Also: run() uses, and leaves up, a Ray the caller
    started."""
    import ray

    manifest = xf.make_dataset(tmp_path)
    cfg = xf.tiny_config(cpus_per_task=torch.get_num_threads())
    extract.run(cfg, manifest, tmp_path / "inline", executor="inline", progress=False, model_configs=[xf.TINY_CONFIG])
    marker = tmp_path / "a-worker-died"
    kwargs = ray_runner.ray_init_kwargs(None)
    hook_env = {xf.DIE_ENV: f"1:after_some_arrays:{marker}", "PYTHONPATH": str(xf.TESTS.parent)}  # the hook's module
    ray.init(**kwargs, runtime_env={"env_vars": hook_env,
                                    "worker_process_setup_hook": "tests.stages.extract_fakes.ray_worker_setup"})
    try:
        summary = extract.run(cfg, manifest, tmp_path / "ray", executor="ray", progress=False,
                              model_configs=[xf.TINY_CONFIG])
        assert ray.is_initialized()
    finally:
        ray.shutdown()
    assert marker.exists() and summary.shards_written == 4
    sums, index = xf.checksums(tmp_path / "ray")
    expected_sums, expected_index = xf.checksums(tmp_path / "inline")
    assert sums == expected_sums and index.equals(expected_index)


def test_a_driver_with_ray_address_joins_that_cluster(tmp_path, monkeypatch):
    """`ray job submit` runs the driver with RAY_ADDRESS set: extract joins that cluster without passing resources
    (Ray refuses them then), on 127.0.0.1 only, and writes the inline cache."""
    import ray
    from ray.cluster_utils import Cluster

    manifest = xf.make_dataset(tmp_path)
    cfg = xf.tiny_config(cpus_per_task=torch.get_num_threads())
    extract.run(cfg, manifest, tmp_path / "inline", executor="inline", progress=False, model_configs=[xf.TINY_CONFIG])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    try:
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)
        assert "num_cpus" not in ray_runner.ray_init_kwargs(None)
        summary = extract.run(cfg, manifest, tmp_path / "ray", executor="ray", progress=False,
                              model_configs=[xf.TINY_CONFIG])
        ray.init(address=cluster.address, logging_level="error")
        assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
        ray.shutdown()
    finally:
        cluster.shutdown()
    assert summary.shards_written == 4
    sums, index = xf.checksums(tmp_path / "ray")
    expected_sums, expected_index = xf.checksums(tmp_path / "inline")
    assert sums == expected_sums and index.equals(expected_index)
