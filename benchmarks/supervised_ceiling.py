"""The fully supervised ceiling on the shapes world: the decoder trained on GT masks against the weakly supervised one.

    .venv/bin/python benchmarks/supervised_ceiling.py [--seeds 1 2 3] [--workdir runs/supervised_ceiling]

WeCLIP §4.5 / Tab. 7 (docs/algorithm.md §8.2): the same frozen encoder, fusion head and decoder, trained on
ground-truth masks instead of pseudo labels. One 1-view cache of the demo's train world (the shapes preset, the
shipped tiny CLIP) is extracted with `extract.store_masks`, and from it, per training seed, two decoders are trained
for the preset's steps (`--iterations`: fewer, RFM still from halfway): `weclip` (RFM + PAR pseudo labels, the preset's settings; the mask crops are not read) and
`supervised` (`train.supervised`: plain CE on the mask crops). Both are scored like `benchmarks/shapes_quality.py
--train` scores its decoders: the same held-out val world (seed 2024, 200 images), the preset's inference (msc +
flip, no CRF). Prints one JSON object: mean and per-seed mIoU (percent) of each, and each run's record. Everything
stays in `--workdir`; a rerun resumes (cache, checkpoints, scores) instead of redoing.

results/supervised_ceiling.json was measured with `--val-count 100 --iterations 100 --threads 1`, one invocation per
mode and seed run side by side (the machine was loaded), merged into one object of this script's form.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from weclip.pipeline.config import DemoConfig, preset  # noqa: E402
from shapes_quality import TrainRun, train_and_score  # noqa: E402
from weclip.stages import extract  # noqa: E402
from weclip.stages.demo import shapes_dataset  # noqa: E402

MODES = ("supervised", "weclip")


def main() -> None:
    cfg = preset("shapes").replace(extract={"store_masks": True})
    demo = DemoConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="train.seed of each pair of runs")
    parser.add_argument("--train-images", type=int, default=demo.train_images)
    parser.add_argument("--val-count", type=int, default=200)
    parser.add_argument("--val-seed", type=int, default=2024)
    parser.add_argument("--workdir", type=Path, default=Path("runs/supervised_ceiling"))
    parser.add_argument("--iterations", type=int, default=cfg.train.iterations,
                        help="training steps of every run; RFM starts halfway, as in the preset (300 / 150)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="the decoders to train, each for every seed (supervised first: it is the cheap one)")
    args = parser.parse_args()
    cfg = cfg.replace(train={"iterations": args.iterations, "checkpoint_every": min(args.iterations, 100)},
                      refine={"rfm_start_iter": args.iterations // 2})
    torch.set_num_threads(args.threads)
    tic = time.time()
    progress = sys.stderr.isatty()
    work = args.workdir.resolve()
    val_manifest = shapes_dataset(work / f"val-s{args.val_seed}-n{args.val_count}" / "data", "val", args.val_count,
                                  args.val_seed, cfg.aug.crop)
    train_manifest = shapes_dataset(work / f"train-s{demo.seed}-n{args.train_images}" / "data", "train",
                                    args.train_images, demo.seed, cfg.aug.crop)
    cache = work / "cache-masks"
    extracted = extract.run(cfg, train_manifest, cache, executor="inline", progress=progress)
    modes = [m for m in MODES if m in args.modes]
    runs = [TrainRun(name, seed, cfg.replace(train={"seed": seed, "supervised": name == "supervised"}))
            for name in modes for seed in args.seeds]
    results = [train_and_score(run, cache, train_manifest, val_manifest, work, progress) for run in runs]
    per_seed = {name: [r["miou"] for r in results if r["name"] == name] for name in modes}
    print(json.dumps({
        "model": cfg.model.name, "train_images": args.train_images, "views": cfg.extract.views,
        "iterations": cfg.train.iterations, "batch_size": cfg.train.batch_size, "seeds": args.seeds,
        "val_images": args.val_count, "val_seed": args.val_seed,
        "cache_mb_per_view": round(extracted.bytes_per_view / 1e6, 4),
        "miou": {name: round(float(np.mean(v)), 2) for name, v in per_seed.items()},
        "miou_per_seed": per_seed,
        **({"gap": round(float(np.mean(per_seed["supervised"]) - np.mean(per_seed["weclip"])), 2)}
           if len(modes) == 2 else {}),
        "train_runs": results, "seconds": round(time.time() - tic, 1)}, indent=2))


if __name__ == "__main__":
    main()
