"""Stage `extract` on a multi-node Ray (`ray.cluster_utils.Cluster`: a head and worker nodes on this machine, each its
own raylet with 1 CPU, all on 127.0.0.1): the inline cache through a cluster address, skips of unreadable images,
resource requests no node can hold, a runtime_env that reaches the workers without being printed, the code shipped
to a named cluster, and a node lost while it runs a shard."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.stages import extract_fakes as xf

from weclip import cli
from weclip.pipeline.cache import store
from weclip.pipeline.errors import ConfigError, ExtractError
from weclip.pipeline.extract import ray_runner
from weclip.stages import extract

WORKTREE = Path(__file__).resolve().parents[2]
RECORD_ENV = "WECLIP_TEST_RECORD"  # folder the worker-side hooks below write to
SECRET_ENV = "WECLIP_TEST_SECRET"


@pytest.fixture
def one_thread():
    """Cluster workers hold 1 CPU, so torch runs 1 thread there; the inline reference must too (GEMM sums depend on
    the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def start_cluster(worker_nodes: int, head_cpus: int = 1):
    """A head and `worker_nodes` workers of 1 CPU each; raylets (so their workers) import this worktree's code."""
    from ray.cluster_utils import Cluster

    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(WORKTREE), saved) if p)
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus})
        nodes = [cluster.add_node(num_cpus=1) for _ in range(worker_nodes)]
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
    return cluster, nodes


@pytest.fixture(scope="module")
def cluster():
    cluster, _ = start_cluster(worker_nodes=1)
    yield cluster
    cluster.shutdown()


def inline_reference(tmp_path: Path, manifest: Path, cfg) -> tuple[dict[int, str], object]:
    extract.run(cfg, manifest, tmp_path / "inline", executor="inline", progress=False, model_configs=[xf.TINY_CONFIG])
    return xf.checksums(tmp_path / "inline")


def record_worker_env() -> None:
    """Ray `worker_process_setup_hook`: write this worker's SECRET_ENV value and its `pipeline` package folder."""
    from weclip import pipeline

    record = {"secret": os.environ.get(SECRET_ENV), "pipeline": str(Path(pipeline.__file__).parent)}
    (Path(os.environ[RECORD_ENV]) / f"{os.getpid()}.json").write_text(json.dumps(record))


def stall_on_marked_node() -> None:
    """Ray `worker_process_setup_hook`: before writing a shard, leave `<node id>-<shard>` in RECORD_ENV; a worker on
    the node named by a `stall-<node id>` file there then sleeps, so the test can remove that node mid-shard."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    folder = Path(os.environ[RECORD_ENV])
    write_shard = store.CacheWriter.write_shard

    def stalled(self, shard, *args, **kwargs):
        (folder / f"{node}-{shard}").touch()
        if (folder / f"stall-{node}").exists():
            time.sleep(600)
        return write_shard(self, shard, *args, **kwargs)
    store.CacheWriter.write_shard = stalled


def test_cluster_address_matches_inline_and_records_unreadable_image(tmp_path, one_thread, cluster, monkeypatch):
    """Through `ray_address`: the inline cache bit for bit, every node on 127.0.0.1, workers importing the package
    folders the driver uploaded (run from elsewhere than the checkout, which workers would find first as their
    working directory); an image that cannot be decoded in a worker is a recorded skip, not a failed job."""
    import ray

    monkeypatch.chdir(tmp_path)
    manifest = xf.make_dataset(tmp_path)
    (tmp_path / "voc" / "JPEGImages" / "c.jpg").write_bytes(b"not a jpeg")
    cfg = xf.tiny_config(cpus_per_task=1)
    expected_sums, expected_index = inline_reference(tmp_path, manifest, cfg)
    summary = extract.run(cfg, manifest, tmp_path / "ray", executor="ray", ray_address=cluster.address,
                          progress=False, model_configs=[xf.TINY_CONFIG])
    assert (summary.views_written, summary.views_skipped) == (8, 2)
    assert [(s["image_id"], s["reason"]) for s in summary.skipped] == [("c", "image_corrupt")]
    sums, index = xf.checksums(tmp_path / "ray")
    assert len(sums) == 4 and sums == expected_sums and index.equals(expected_index)
    ray.init(**ray_runner.ray_init_kwargs(cluster.address))
    try:
        assert len(ray.nodes()) == 2
        assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
        where = ray.get(ray.remote(lambda: __import__("weclip").__file__).remote())
    finally:
        ray.shutdown()
    assert "/runtime_resources/py_modules_files/" in where


def test_runtime_env_reaches_workers_and_is_never_printed(tmp_path, cluster):
    """An env var given as runtime_env is set in the shard workers (merged with the job's own env_vars), and neither
    the summary, its text, nor any cache file holds its value."""
    import ray

    secret = "s3cr3t-value-4711"
    manifest = xf.make_dataset(tmp_path, {"a": [8], "b": [15]})
    record = tmp_path / "record"
    record.mkdir()
    ray.init(address=cluster.address, logging_level="error", log_to_driver=False,
             runtime_env={"env_vars": {RECORD_ENV: str(record)},
                          "worker_process_setup_hook": "tests.stages.test_extract_cluster.record_worker_env"})
    try:
        summary = extract.run(xf.tiny_config(cpus_per_task=1), manifest, tmp_path / "ray", executor="ray",
                              progress=False, model_configs=[xf.TINY_CONFIG],
                              runtime_env={"env_vars": {SECRET_ENV: secret}})
    finally:
        ray.shutdown()
    records = [json.loads(p.read_text()) for p in record.glob("*.json")]
    assert records and {r["secret"] for r in records} == {secret}
    assert {r["pipeline"] for r in records} == {str(WORKTREE / "pipeline")}
    assert summary.shards_written == 2
    assert secret not in summary.format() and secret not in json.dumps(summary.to_dict())
    assert not [p for p in (tmp_path / "ray").rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_cli_refuses_a_cpu_request_no_node_can_hold(tmp_path, cluster, capsys):
    """`--cpus-per-task 4` on 1-CPU nodes: one error line naming the request and the nodes' resources, exit 2,
    instead of tasks pending forever."""
    manifest = xf.make_dataset(tmp_path, {"a": [8]})
    settings = [arg for field in ["model.name=tiny-vit", "model.pretrained=null", "aug.crop=48",
                                  "extract.feature_layers=[1,2]", "extract.attn_layers=[2,3]"] for arg in ("--set", field)]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["extract", str(manifest), "-o", str(tmp_path / "ray"), "--ray-address", cluster.address,
                  "--cpus-per-task", "4", "--gpus-per-task", "0.5", "--runtime-env", '{"env_vars": {"X": "1"}}',
                  *settings])
    line = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert exit_info.value.code == 2, line
    assert line.startswith("error: no Ray node can run a shard task needing 4 CPU: the cluster's nodes have "
                           "[1 CPU, 0 GPU; 1 CPU, 0 GPU]")


def test_a_node_removed_mid_shard_is_survived(tmp_path, one_thread):
    """Two 1-CPU worker nodes (the head holds no CPU); the node running a shard is removed while it runs it: the
    task is retried on the other node, every shard is committed exactly once, and the cache equals the inline one."""
    import ray

    manifest = xf.make_dataset(tmp_path)
    cfg = xf.tiny_config(cpus_per_task=1)
    expected_sums, expected_index = inline_reference(tmp_path, manifest, cfg)
    record = tmp_path / "record"
    record.mkdir()
    cluster, (doomed, _) = start_cluster(worker_nodes=2, head_cpus=0)
    (record / f"stall-{doomed.node_id}").touch()
    removed = threading.Event()

    def remove_when_busy() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list(record.glob(f"{doomed.node_id}-*")):
            time.sleep(0.2)
        cluster.remove_node(doomed)
        removed.set()

    try:
        ray.init(address=cluster.address, logging_level="error", log_to_driver=False,
                 runtime_env={"env_vars": {RECORD_ENV: str(record)},
                              "worker_process_setup_hook": "tests.stages.test_extract_cluster.stall_on_marked_node"})
        remover = threading.Thread(target=remove_when_busy, daemon=True)
        remover.start()
        summary = extract.run(cfg, manifest, tmp_path / "ray", executor="ray", progress=False,
                              model_configs=[xf.TINY_CONFIG])
        remover.join(timeout=60)
    finally:
        ray.shutdown()
        cluster.shutdown()
    stalled = [p.name for p in record.glob(f"{doomed.node_id}-*")]
    assert removed.is_set() and len(stalled) == 1
    assert summary.shards_written == 4
    assert len(list((tmp_path / "ray" / "_commits").glob("shard-*.json"))) == 4
    sums, index = xf.checksums(tmp_path / "ray")
    assert sums == expected_sums and index.equals(expected_index)
    assert index.num_rows == len(set(index.column("sample_id").to_pylist())) == 10


def test_check_feasible_needs_one_node_holding_the_whole_request():
    """Fractional GPUs fit a node with a whole GPU; 1 GPU per task does not fit nodes of 0.5 GPU each even though the
    cluster has 1 GPU in all; the message names the request and every node."""
    nodes = [{"CPU": 4.0, "GPU": 0.5}, {"CPU": 4.0, "GPU": 0.5}]
    ray_runner.check_feasible({"CPU": 1.0, "GPU": 0.5}, nodes)
    with pytest.raises(ExtractError, match=r"needing 1 CPU, 1 GPU: the cluster's nodes have \[4 CPU, 0.5 GPU; 4 CPU, "
                                           r"0.5 GPU\]"):
        ray_runner.check_feasible({"CPU": 1.0, "GPU": 1.0}, nodes)
    with pytest.raises(ExtractError, match="no live nodes"):
        ray_runner.check_feasible({"CPU": 1.0, "GPU": 0.0}, [])


@pytest.mark.parametrize("layout", ["source checkout", "installed"])
def test_code_runtime_env_ships_only_the_worker_code(tmp_path, monkeypatch, layout):
    """From a checkout and from site-packages alike, a named cluster gets one py_module named `weclip` holding the
    library and the manifest schema, never the folder around it (site-packages: the whole environment)."""
    if layout == "installed":
        root = tmp_path / "lib/python3.11/site-packages/weclip"
        for folder in ("pipeline/cache", "manifests", "stages", "../torch"):
            (root / folder).mkdir(parents=True)
        for file in ("__init__.py", "cli.py", "pipeline/__init__.py", "pipeline/cache/store.py",
                     "manifests/manifest_schema.json", "../torch/__init__.py"):
            (root / file).write_text("# " + file)
        monkeypatch.setattr(ray_runner, "PACKAGE_ROOT", root)
    env = ray_runner.ray_init_kwargs("127.0.0.1:1")["runtime_env"]
    assert env["excludes"] == ["**/__pycache__/"] and len(env["py_modules"]) == 1
    shipped = Path(env["py_modules"][0])
    assert shipped.name == "weclip"
    files = {p.relative_to(shipped).as_posix() for p in shipped.rglob("*") if p.is_file()}
    expected = {p.relative_to(ray_runner.PACKAGE_ROOT).as_posix()
                for name in ("__init__.py", "pipeline", "manifests")
                for p in ([ray_runner.PACKAGE_ROOT / name] if name.endswith(".py")
                          else (ray_runner.PACKAGE_ROOT / name).rglob("*"))
                if p.is_file() and "__pycache__" not in p.parts}
    assert files == expected and "pipeline/cache/store.py" in files and "manifests/manifest_schema.json" in files
    assert not any(f.startswith(("stages/", "tests/", "cli.py")) for f in files)


def test_parse_runtime_env_reads_json_or_a_file_and_never_quotes_it(tmp_path):
    env = {"env_vars": {"AWS_SECRET_ACCESS_KEY": "hunter2"}}
    assert ray_runner.parse_runtime_env(json.dumps(env)) == env
    (tmp_path / "env.json").write_text(json.dumps(env))
    assert ray_runner.parse_runtime_env(f"@{tmp_path / 'env.json'}") == env
    assert ray_runner.parse_runtime_env(None) is None
    for bad in ('{"env_vars": {"AWS_SECRET_ACCESS_KEY": "hunter2"', '["hunter2"]', f"@{tmp_path / 'missing'}"):
        with pytest.raises(ConfigError) as err:
            ray_runner.parse_runtime_env(bad)
        assert "hunter2" not in str(err.value) and "\n" not in str(err.value)


def test_resource_overrides_sets_only_the_given_options():
    assert ray_runner.resource_overrides(None, None) == {}
    assert ray_runner.resource_overrides(2.0, 0.25) == {"cpus_per_task": 2.0, "gpus_per_task": 0.25}
