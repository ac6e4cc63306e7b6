"""stages/train.py on several processes (DDP, gloo on 127.0.0.1): the shipped tiny CLIP on the shapes world.

2 processes with 2 rows each must train like 1 process with the whole batch of 4: the same losses, pseudo-label
statistics and validation, and the same weights — except each attention block's key bias, whose gradient is zero in
exact arithmetic (softmax ignores a constant added to every key) and rounding noise in practice, which AdamW turns into
steps of size lr in any two runs whose sums round differently. Dropout stays on (rate 0.1): the global-batch dropout
gives each rank its rows of the one-process mask.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from weclip import cli
from weclip.pipeline.config import Config, preset
from weclip.pipeline.training.checkpoint import load_checkpoint
from weclip.pipeline.training.distributed import spawn
from weclip.stages import evaluate, train
from tests.stages.train_fakes import shapes_world

CROP, IMAGES, STEPS = 96, 12, 6
REPO = Path(__file__).resolve().parents[2]
# --set values of `ddp_config` that the cache does not fix, for the command line
CLI_SETS = ["refine.rfm_start_iter=2", "decoder.embed_dim=32", "decoder.layers=1", "decoder.heads=2",
            "decoder.mlp_dim=64", "train.iterations=40", "train.batch_size=4", "train.checkpoint_every=2",
            "train.warmup_iters=2", "train.train_flip=true", f"eval.long_side={CROP}"]


def ddp_config() -> Config:
    """The shapes preset (shipped tiny CLIP) on 96-px crops, a small decoder with dropout, batch 4, RFM from step 2."""
    cfg = preset("shapes").replace(aug={"crop": CROP}, extract={"samples_per_shard": 8, "dtype": "float32"})
    return Config.from_dict(cli._settings(cfg, None, CLI_SETS).to_dict())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return shapes_world(tmp_path_factory.mktemp("ddp"), ddp_config(), IMAGES, CROP)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def computed(out: Path) -> list[dict]:
    """The metric lines without their timings."""
    return [{k: v for k, v in m.items() if k not in ("s_per_step", "data_s", "val_s")} for m in metrics(out)]


def assert_same_run(a: Path, b: Path, tol: float) -> None:
    """Equal metrics (numbers to `tol`, the rest exactly) and decoder weights (to 1e-5; the key biases, see above)."""
    ma, mb = computed(a), computed(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == list(range(STEPS))
    for x, y in zip(ma, mb):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], float):
                assert x[key] == pytest.approx(y[key], abs=tol), (x["step"], key)
            else:
                assert x[key] == y[key], (x["step"], key)
    wa, wb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    assert wa.step == wb.step == STEPS
    for name, x in wa.decoder_state.items():
        y = wb.decoder_state[name]
        if name.endswith("attn.in_proj_bias"):
            width = len(x) // 3
            keep = torch.cat([torch.arange(width), torch.arange(2 * width, 3 * width)])  # query and value biases
            x, y = x[keep], y[keep]
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5 if tol else 0, msg=name)


@pytest.fixture(scope="module")
def one(world):
    out = world["root"] / "one"
    train.run(world["cfg"].replace(train={"val_every": 2}), world["cache"], out, max_steps=STEPS, progress=False,
              device="cpu", val_manifest=world["manifest"])
    return out


@pytest.fixture(scope="module")
def two(world):
    out = world["root"] / "two"
    summary = spawn(2, train.run, (world["cfg"].replace(train={"val_every": 2}), world["cache"], out),
                    dict(max_steps=STEPS, progress=False, device="cpu", val_manifest=world["manifest"]))
    return {"out": out, "summary": summary}


@pytest.mark.slow
def test_two_processes_of_two_rows_train_like_one_process_of_four(world, one, two):
    out = two["out"]
    assert two["summary"].final_step == STEPS and two["summary"].steps_run == STEPS  # rank 0's summary
    assert_same_run(one, out, tol=1e-5)
    assert any(m["rfm"] for m in metrics(out)) and any(not m["rfm"] for m in metrics(out))
    # only rank 0 writes: one line per step, the files of a one-process run
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in one.iterdir())
    # each rank scored half of the val images; their sum is what `weclip evaluate` gives the checkpoint
    report = evaluate.run(out / "step_000004.pt", world["manifest"], world["root"] / "eval4", crf=False,
                          progress=False, device="cpu")
    (line,) = [m for m in metrics(out) if m["step"] == 3]
    assert line["val_miou"] == pytest.approx(report.miou, abs=1e-12)


def kill_during_run(cfg_sets: list[str], cache: Path, out: Path, tmp: Path) -> int:
    """Start `weclip train --nproc 2`, SIGKILL its process group after 3 steps were logged; the last checkpoint step."""
    command = [sys.executable, "-c", "import cli; cli.main()", "--quiet", "train", "--cache", str(cache), "-o",
               str(out), "--preset", "shapes", "--nproc", "2", "--device", "cpu", "--max-steps", str(STEPS)]
    command += [arg for item in cfg_sets for arg in ("--set", item)]
    proc = subprocess.Popen(command, cwd=REPO, start_new_session=True, env={**os.environ, "TMPDIR": str(tmp)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    try:
        while not ((out / "metrics.jsonl").exists() and len(metrics(out)) >= 3):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no 3 steps within 300 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return load_checkpoint(out / "checkpoint.pt").step


@pytest.mark.slow
def test_kill_and_resume_under_two_processes_gives_the_uninterrupted_run(world, one, two, tmp_path):
    killed = tmp_path / "killed"
    step = kill_during_run(CLI_SETS, world["cache"], killed, tmp_path)
    assert 2 <= step < STEPS
    shutil.copytree(killed, tmp_path / "killed-1")
    cfg = world["cfg"]
    resumed = spawn(2, train.run, (cfg, world["cache"], killed), dict(resume=True, max_steps=STEPS, progress=False,
                                                                      device="cpu"))
    assert resumed.start_step == step and resumed.final_step == STEPS
    # the uninterrupted runs validated every 2 steps; the resumed ones did not: compare the training lines
    assert computed(killed) == [{k: v for k, v in m.items() if k != "val_miou"} for m in computed(two["out"])]
    weights = load_checkpoint(killed / "checkpoint.pt").decoder_state
    reference = load_checkpoint(two["out"] / "checkpoint.pt").decoder_state
    assert all(torch.equal(weights[k], reference[k]) for k in weights)
    # the same killed run resumed on one process: the one-process curve
    train.run(cfg, world["cache"], tmp_path / "killed-1", resume=True, max_steps=STEPS, progress=False, device="cpu")
    assert [m["loss"] for m in computed(tmp_path / "killed-1")] == pytest.approx(
        [m["loss"] for m in computed(one)], abs=1e-5)


@pytest.mark.slow  # 3 processes start (about 15 s on an idle 2-core machine, minutes under load)
def test_a_world_size_that_does_not_divide_the_batch_is_one_error_line(tmp_path, capsys):
    """Refused before any work: the cache (here none) is not even opened."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--cache", str(tmp_path / "no-cache"), "-o", str(tmp_path / "run"), "--preset", "shapes",
                  "--nproc", "3", "--device", "cpu", "--set", "train.batch_size=4"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: train.batch_size = 4 cannot be split over 3 processes; run a number of processes that "
                       "divides it, or set train.batch_size to a multiple of 3")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_online_training_on_two_processes_matches_one(world, tmp_path):
    cfg = world["cfg"]
    kwargs = dict(online_manifest=world["manifest"], max_steps=2, progress=False, device="cpu")
    train.run(cfg, None, tmp_path / "one", **kwargs)
    spawn(2, train.run, (cfg, None, tmp_path / "two"), kwargs)
    a, b = computed(tmp_path / "one"), computed(tmp_path / "two")
    assert [m["classes"] for m in a] == [m["classes"] for m in b]
    for key in ("loss", "seg", "aff", "fg_fraction"):
        assert [m[key] for m in a] == pytest.approx([m[key] for m in b], abs=1e-5), key
