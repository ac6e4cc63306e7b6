"""The feature cache, manifests and images on a real S3-compatible HTTP server (moto's server mode on 127.0.0.1,
tests/s3_fakes.py): extract → inspect → train through the CLI equal a local cache object for object; a SIGKILL
mid-shard then a rerun equals an uninterrupted run; a missing bucket, refused credentials, a closed port or a host
name that does not resolve each give one `error:` line naming the URL and the setting, with nothing written; a
manifest and its images on the bucket; credentials given as storage options reach every stage (and local Ray
workers) and land in no file, object or output."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import pytest

from weclip import cli
from weclip.pipeline.cache.schema import commit_key
from weclip.pipeline.cache.store import CacheReader
from weclip.pipeline.data.manifest import read_manifest
from weclip.pipeline.storage import use_storage_options
from weclip.stages import extract
from tests.s3_fakes import clear_clients, moto_server, refusing_credentials, s3  # noqa: F401  (fixtures)
from tests.stages import extract_fakes as xf

CFG = xf.tiny_config()  # 5 images × 2 views, shards of 3 samples: 4 shards
KILLED_SHARD = 2
# loader_workers=2 is the default: forked DataLoader processes read the bucket
TRAIN_SETS = ["train.iterations=2", "train.batch_size=2", "train.checkpoint_every=2", "train.loader_workers=2",
              "train.warmup_iters=1", "refine.static_layers=2", "refine.rfm_layers=2", "refine.rfm_start_iter=1",
              "decoder.embed_dim=32", "decoder.mlp_dim=64", "decoder.layers=1", "decoder.heads=2"]

# `weclip extract` in a child process that SIGKILLs itself right after the shard file of `attn` of KILLED_SHARD is
# stored (extract_fakes.die_inside_shard hooks the cache writer's own steps).
CHILD = r"""
import sys
import tempfile
from weclip import cli
from tests.stages import extract_fakes as xf
xf.die_inside_shard(int(sys.argv[1]), "after_some_arrays")
cli.main(sys.argv[2:])
"""


def weclip(*args: object) -> int:
    """`weclip ARGS` in this process; its exit code."""
    try:
        cli.main([str(a) for a in args])
    except SystemExit as done:
        return done.code or 0
    return 0


def local_objects(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny VOC manifest, its config as a --config file, and a local cache of it (inline, uninterrupted)."""
    root = tmp_path_factory.mktemp("extract_s3")
    manifest = xf.make_dataset(root)
    config = root / "config.json"
    config.write_text(json.dumps(CFG.to_dict()))
    extract.run(CFG, manifest, root / "local", executor="inline", progress=False, model_configs=[xf.TINY_CONFIG])
    return {"root": root, "manifest": manifest, "config": config, "local": root / "local"}


def extract_args(world: dict[str, Path], out: str) -> list[object]:
    return ["extract", world["manifest"], "-o", out, "--executor", "inline", "--config", world["config"]]


def test_extract_inspect_train_on_s3_equal_a_local_cache(world, s3, tmp_path, capsys):
    url = s3.url("cache")
    assert weclip(*extract_args(world, url)) == 0
    assert s3.objects() == {f"cache/{k}": v for k, v in local_objects(world["local"]).items()}
    remote, local = CacheReader(url), CacheReader(world["local"])
    assert remote.committed() == local.committed() == set(range(4))
    assert remote.index.equals(local.index) and remote.tables.shards.equals(local.tables.shards)
    rows = local.index.column("row").to_pylist()
    for name, values in local.read(rows).items():
        assert (remote.read(rows)[name] == values).all(), name

    capsys.readouterr()
    assert weclip("inspect", url) == 0
    shown = capsys.readouterr().out
    assert f"feature cache {url}" in shown and "10 samples committed" in shown and "complete" in shown

    sets = [part for item in TRAIN_SETS for part in ("--set", item)]
    assert weclip("train", "--cache", url, "-o", tmp_path / "run_s3", *sets) == 0
    assert weclip("train", "--cache", world["local"], "-o", tmp_path / "run_local", *sets) == 0
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("run_s3", "run_local")]
    assert len(losses[0]) == 2 and losses[0] == losses[1]


@pytest.mark.slow  # about 30 s: a child process that imports torch, then a rerun
def test_sigkill_mid_shard_on_s3_then_rerun_equals_an_uninterrupted_run(world, s3):
    url = s3.url("cache")
    child = subprocess.run([sys.executable, "-c", CHILD, str(KILLED_SHARD), *map(str, extract_args(world, url))],
                           cwd=xf.TESTS.parent, env={**os.environ, "PYTHONPATH": str(xf.TESTS.parent)},
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    left = s3.objects()
    def stored(name: str) -> bool:
        return any(k.startswith(f"cache/{name}/c/{KILLED_SHARD}/") for k in left)
    assert stored("attn") and not stored("cams")  # the killed shard stored some of its arrays ...
    assert f"cache/{commit_key(KILLED_SHARD)}" not in left  # ... and no commit
    assert CacheReader(url).committed() == set(range(KILLED_SHARD))

    assert weclip(*extract_args(world, url)) == 0
    assert s3.objects() == {f"cache/{k}": v for k, v in local_objects(world["local"]).items()}


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fail_one_line(args: list[object], capsys) -> str:
    """Run `weclip --quiet ARGS`, which must fail as a user error: its one `error:` line, and nothing else."""
    capsys.readouterr()
    assert weclip("--quiet", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("case", ["missing_bucket", "refused_credentials", "closed_port", "unresolvable_host"])
def test_storage_failures_are_one_line_naming_the_url_and_the_setting(world, s3, case, monkeypatch, capsys):
    url = s3.url("cache")
    if case == "missing_bucket":
        url = f"s3://{s3.bucket}-absent/cache"
    elif case != "refused_credentials":
        host = f"http://127.0.0.1:{closed_port()}" if case == "closed_port" else "http://no-such-host.invalid"
        monkeypatch.setenv("AWS_ENDPOINT_URL", host)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries only slow the test down
    clear_clients()
    with refusing_credentials() if case == "refused_credentials" else nullcontext():
        line = fail_one_line(extract_args(world, url), capsys)
        again = fail_one_line(["inspect", url], capsys)  # a reader fails the same way
    expected = {"missing_bucket": ("does not exist", f"'{s3.bucket}-absent'", "aws s3 mb"),
                "refused_credentials": ("refused the credentials", "InvalidAccessKeyId", "AWS_SECRET_ACCESS_KEY"),
                "closed_port": ("cannot reach", "127.0.0.1", "AWS_ENDPOINT_URL"),
                "unresolvable_host": ("does not resolve", "no-such-host.invalid", "AWS_ENDPOINT_URL")}[case]
    assert url in line and all(part in line for part in expected), line
    assert url in again and all(part in again for part in expected), again

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    clear_clients()
    assert s3.objects() == {}  # nothing written, so nothing shown as committed
    assert not s3.fs.exists(f"{s3.bucket}-absent")


def test_manifest_and_images_on_s3(world, s3, tmp_path, capsys):
    """`weclip manifest ... --root s3://bucket/voc` records the bucket as the dataset root (after checking that it holds
    the validated local copy's files); `weclip extract s3://bucket/manifest.parquet` then reads manifest and images
    from the bucket and gives the local cache; an image deleted from the bucket becomes a recorded skip."""
    voc = world["root"] / "voc"
    s3.fs.put(f"{voc}/", s3.url("voc"), recursive=True)
    s3.fs.rm(s3.url("voc/Annotations"), recursive=True)  # not read by a mask-labelled manifest
    manifest = tmp_path / "train.parquet"
    assert weclip("manifest", "voc", voc, "-o", manifest, "--root", s3.url("voc")) == 0
    s3.fs.put(str(manifest), s3.url("train.parquet"))
    assert weclip("extract", s3.url("train.parquet"), *extract_args(world, s3.url("cache"))[2:]) == 0
    assert {k: v for k, v in s3.objects().items() if k.startswith("cache/")} == {
        f"cache/{k}": v for k, v in local_objects(world["local"]).items()}

    s3.fs.rm(s3.url("voc/JPEGImages/c.jpg"))
    line = fail_one_line(["manifest", "voc", voc, "-o", tmp_path / "again.parquet", "--root", s3.url("voc")], capsys)
    assert "JPEGImages/c.jpg" in line and s3.url("voc") in line and "aws s3 sync" in line
    summary = extract.run(CFG, s3.url("train.parquet"), s3.url("cache2"), executor="inline", progress=False,
                          model_configs=[xf.TINY_CONFIG])
    assert [(s["image_id"], s["reason"]) for s in summary.skipped] == [("c", "image_missing")]
    assert (summary.views_in_cache, summary.views_skipped) == (8, 2)


SECRET_KEY_ID, SECRET = "AKIAWECLIPSECRET4711", "weclip-s3cr3t-C0FFEE-4711"


def secret_search(s3, folders: list[Path], *texts: str) -> list[str]:
    """Every file under `folders`, object in the bucket and text that holds the fake key id or secret."""
    def leaks(data: bytes) -> bool:
        return SECRET.encode() in data or SECRET_KEY_ID.encode() in data
    found = [str(p) for folder in folders for p in folder.rglob("*") if p.is_file() and leaks(p.read_bytes())]
    found += [f"s3://{s3.bucket}/{key}" for key, data in s3.objects().items() if leaks(data)]
    return found + [f"output: ...{t[max(0, t.find(SECRET) - 80):][:200]}" for t in texts if leaks(t.encode())]


@pytest.mark.slow  # about 45 s: five commands
def test_credentials_reach_every_stage_and_land_nowhere(world, s3, tmp_path, monkeypatch, capsys):
    """Credentials given only as --storage-options (none in the environment) carry manifest → extract → inspect →
    train → evaluate on the bucket; no file written (locally or in the bucket), no record and no output holds them."""
    s3.fs.put(f"{world['root'] / 'voc'}/", s3.url("voc"), recursive=True)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    clear_clients()
    options = ["--storage-options", json.dumps({"key": SECRET_KEY_ID, "secret": SECRET})]
    manifest, run, report = tmp_path / "train.parquet", tmp_path / "run", tmp_path / "eval"
    commands = [["manifest", "voc", world["root"] / "voc", "-o", manifest, "--root", s3.url("voc"), *options],
                [*extract_args(world, s3.url("cache")), *options],
                ["inspect", s3.url("cache"), *options],
                ["train", "--cache", s3.url("cache"), "-o", run, *options,
                 *[part for item in TRAIN_SETS for part in ("--set", item)]],
                ["evaluate", manifest, "--checkpoint", run / "checkpoint.pt", "-o", report, "--workers", "0",
                 *options]]
    outputs = []
    for args in commands:
        monkeypatch.delenv("WECLIP_STORAGE_OPTIONS", raising=False)  # each command gets them from its own option
        monkeypatch.setattr(sys, "argv", ["weclip", *map(str, args)])  # what the manifest records as its command
        assert weclip(*args) == 0, args[0]
        captured = capsys.readouterr()
        outputs += [captured.out, captured.err]
    assert json.loads((report / "report.json").read_text())["images"] == 5
    assert "--storage-options '***'" in read_manifest(manifest).command
    assert secret_search(s3, [tmp_path, world["root"]], *outputs) == []
    (tmp_path / "planted").write_text(f"key={SECRET}")  # the search does find one
    assert secret_search(s3, [tmp_path], "") == [str(tmp_path / "planted")]


@pytest.mark.slow  # local Ray: about 30 s here
def test_storage_options_reach_local_ray_workers_and_land_nowhere(world, s3, tmp_path, monkeypatch, capsys):
    """The same with the shard tasks on a local Ray: the workers write to the bucket with the options' credentials
    (the environment has none), and neither the bucket, the output nor Ray's session logs hold them."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.delenv("WECLIP_STORAGE_OPTIONS", raising=False)
    clear_clients()
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    use_storage_options({"key": SECRET_KEY_ID, "secret": SECRET})  # what --storage-options does
    try:
        summary = extract.run(CFG, world["manifest"], s3.url("cache"), executor="ray", progress=False,
                              model_configs=[xf.TINY_CONFIG])
        captured = capsys.readouterr()
        assert summary.shards_written == 4
        assert s3.objects() == {f"cache/{k}": v for k, v in local_objects(world["local"]).items()}
        assert any(ray_tmp.rglob("*.log"))  # Ray did write its session logs there
        assert secret_search(s3, [ray_tmp], captured.out, captured.err, summary.format(), repr(summary)) == []
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
