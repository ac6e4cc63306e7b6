"""Seconds per `weclip train` step on 1 process against N processes (DistributedDataParallel, gloo, this CPU).

Workload: the shapes preset as `weclip demo` trains it (the shipped tiny CLIP's cache, 224-px crops, the decoder
256 wide, PAR, balanced CE + affinity loss, dropout), global batch `--batch` (default 4); N processes read batch / N
rows each and the CPU threads are shared out among them (`distributed.spawn`), so both sides use the same cores.
The cache (`--images` shapes images, 1 view) is extracted once by the real extract code.

Timing: the machine is shared, so the sides alternate, run by run, in the same window: each round trains `--steps`
steps from scratch on 1 process with all threads, on 1 process with threads / N (the threads of one of the N), and
on N processes, all started by `distributed.spawn` (so all pay the same process start-up, reported apart). A run's
s/step is the median of rank 0's `s_per_step` (metrics.jsonl: data + step, all-reduces included) past its first
`--warmup` steps; the figures are medians over the rounds, and each ratio is a 1-process s/step over the N-process
s/step (> 1: N processes are faster). Prints one JSON object.

    .venv/bin/python benchmarks/train_ddp.py [--rounds 3 --steps 8 --nproc 2 --images 16]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from weclip.pipeline.config import preset
from weclip.pipeline.data.shapes import generate
from weclip.pipeline.training.distributed import spawn
from weclip.stages import extract, manifest, train


def one_run(cfg, cache: Path, out: Path, nproc: int, threads: int, warmup: int) -> dict:
    """Train from scratch on `nproc` processes of `threads` threads each."""
    torch.set_num_threads(threads * nproc)  # `spawn` gives each process its share of this process's threads
    start = time.perf_counter()
    summary = spawn(nproc, train.run, (cfg, cache, out), dict(progress=False, device="cpu"))
    wall = time.perf_counter() - start
    steps = [json.loads(line)["s_per_step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"s_per_step": statistics.median(steps[warmup:]), "wall_s": wall,
            "startup_s": wall - sum(steps), "last_loss": summary.last_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--images", type=int, default=16)
    args = parser.parse_args()
    cfg = preset("shapes").replace(train={"iterations": args.steps, "batch_size": args.batch,
                                          "checkpoint_every": args.steps})
    with tempfile.TemporaryDirectory(prefix="weclip-train-ddp-") as tmp:
        root = Path(tmp)
        generate(root / "data", "train", args.images, seed=7, size=256)
        manifest_path = manifest.run("shapes", root / "data", root / "m.parquet", progress=False).manifest_path
        extract.run(cfg, manifest_path, root / "cache", executor="inline", progress=False)
        threads = torch.get_num_threads()
        sides = {"1_proc": (1, threads), "1_proc_1_of_n_threads": (1, max(1, threads // args.nproc)),
                 f"{args.nproc}_proc": (args.nproc, max(1, threads // args.nproc))}
        runs: dict[str, list[dict]] = {name: [] for name in sides}
        for r in range(args.rounds):
            for name, (n, t) in sides.items():
                runs[name].append(one_run(cfg, root / "cache", root / f"run-{r}-{name}", n, t, args.warmup))
    median = {name: {k: statistics.median(run[k] for run in rs) for k in ("s_per_step", "wall_s", "startup_s")}
              for name, rs in runs.items()}
    many = f"{args.nproc}_proc"
    print(json.dumps({
        "machine": {"cpus": os.cpu_count(), "threads": threads, "platform": platform.platform(),
                    "load_1min_after": os.getloadavg()[0]},
        "threads_per_process": {name: t for name, (_, t) in sides.items()},
        "job": {"preset": "shapes", "model": cfg.model.name, "crop": cfg.aug.crop, "global_batch": args.batch,
                "steps": args.steps, "warmup_steps": args.warmup, "rounds": args.rounds, "images": args.images},
        "s_per_step": {name: median[name]["s_per_step"] for name in runs},
        "startup_s": {name: median[name]["startup_s"] for name in runs},
        "ratio": {f"{name}_over_{many}": median[name]["s_per_step"] / median[many]["s_per_step"]
                  for name in runs if name != many},
        "same_last_loss": all(max(x["last_loss"] for x in rs) - min(x["last_loss"] for x in rs) < 1e-4
                              for rs in zip(*runs.values())),
        "runs": runs,
    }, indent=1))


if __name__ == "__main__":
    main()
