"""Seconds per `weclip train` step from the feature cache vs online (backbone + Grad-CAM in the loop), same process.

Workload: ViT-B-16-quickgelu with random weights (the cost does not depend on the
weights; nothing can be downloaded here), 320×320 crops, batch 4, every image with 3 VOC classes, the VOC preset
otherwise (decoder 256 wide, PAR 20 iterations at crop resolution, balanced CE + affinity loss). The images are random
noise written to a temp folder as a `folder` manifest; the cache is built from them by the real extract code
(`stages.extract.run`, inline executor) in a spawned child process, so the backbone is not yet resident in this
process when the online run loads it.

Timing: the machine is shared, so the two sources are timed alternately, step by step, in the same window:
each round runs one cached and one online step, each = fetch the batch (`CachedSteps` / `OnlineCrops`, as the
DataLoader would, in this process) + `source.prepare` (online: backbone + Softmax-Grad-CAM) + `train.train_step`
(the step function both modes of `weclip train` share). Round 0 is a warm-up; medians are reported. RFM is off at
these steps (step < rfm_start_iter); RFM costs one extra 400×400 elementwise product per image.
Peak memory: two whole `stages.train.run`s of `--memory-steps` steps (cached, then online); on CUDA
`torch.cuda.max_memory_allocated`, on the CPU the peak resident-set growth over the RSS at the start of the run,
sampled every 5 ms (the online run starts after the cached one and may reuse its freed pages: if anything low).
Prints one JSON object.

    .venv/bin/python benchmarks/train_step.py [--rounds 4 --images 8 --threads 2]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_convert

from weclip.pipeline.config import Config, preset
from weclip.pipeline.model.backbone import default_device
from weclip.pipeline.model.decoder import WeCLIPDecoder
from weclip.pipeline.training.optim import PolyWarmup, build_optimizer
from weclip.pipeline.refinement.par import PAR
from weclip.pipeline.refinement.pseudo_label import rfm_active
from weclip.pipeline.training import sources
from weclip.pipeline.training.step import train_step
from weclip.stages import extract, manifest, train


def build_manifest(root: Path, images: int, classes_per_image: int, seed: int) -> Path:
    """Random-noise RGB images of varying size with `classes_per_image` random VOC classes each, as a manifest."""
    rng = np.random.default_rng(seed)
    labels = {}
    (root / "images").mkdir(parents=True)
    for i in range(images):
        h, w = (int(v) for v in rng.integers(280, 500, size=2))
        name = f"images/noise_{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(root / name)
        labels[name] = sorted(rng.choice(20, size=classes_per_image, replace=False).tolist())
    (root / "labels.json").write_text(json.dumps(labels))
    return manifest.run("folder", root, root / "manifest.parquet", class_set="voc", labels_file="labels.json",
                        progress=False).manifest_path


def _extract(cfg: Config, manifest_path: Path, out: Path) -> None:
    extract.run(cfg, manifest_path, out, executor="inline", progress=False)


class PeakMemory:
    """Peak memory growth (MB) while the block runs: CUDA allocator peak, or sampled RSS on the CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb = device, 0.0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base, self._max, self._stop = _rss(), _rss(), threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self._max = max(self._max, _rss())

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = (max(self._max, _rss()) - self._base) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(cfg: Config, cache: Path | None, out: Path, steps: int, device: torch.device,
                online_manifest: Path | None = None) -> float:
    """Peak memory growth (MB) of a whole `stages.train.run` of `steps` steps (loading included)."""
    with PeakMemory(device) as memory:
        train.run(cfg, cache, out, online_manifest=online_manifest, max_steps=steps, progress=False,
                  device=str(device))
    return memory.peak_mb


def interleaved_seconds(cfg: Config, cache: Path, manifest_path: Path, rounds: int, device: torch.device
                        ) -> dict[str, list[float]]:
    """Seconds of (fetch + prepare + `train_step`) per step for each source, alternating cached and online steps
    so that both see the same machine load (the CPU here is shared); round 0 is a warm-up and is dropped."""
    runs = {"cached": sources.CachedSource(cfg, cache, device),
            "online": sources.OnlineSource(cfg, manifest_path, device)}
    state = {}
    for name, source in runs.items():
        torch.manual_seed(cfg.train.seed)
        decoder = WeCLIPDecoder(source.in_layers, source.in_dim, source.classes.num_classes + 1, cfg.decoder).to(device)
        optimizer = build_optimizer(decoder.parameters(), cfg.train)
        state[name] = (source.dataset(0, rounds + 1), decoder, optimizer, PolyWarmup(optimizer, cfg.train),
                       PAR(cfg.par))
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(rounds + 1):
        for name, source in runs.items():
            dataset, decoder, optimizer, scheduler, par = state[name]
            _sync(device)
            start = time.perf_counter()
            batch = source.prepare(default_convert(dataset[step]))
            train_step(decoder, optimizer, scheduler, par, batch, step, cfg)
            _sync(device)
            if step:
                seconds[name].append(time.perf_counter() - start)
    return seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_config(base: Config, model: str, crop: int, batch: int, seed: int) -> Config:
    """`base` with random weights of `model`, one view per image, no loader processes and no checkpoints."""
    return base.replace(model={"name": model, "pretrained": None, "init_seed": seed}, aug={"crop": crop},
                        extract={"views": 1, "seed": seed},
                        train={"batch_size": batch, "loader_workers": 0, "checkpoint_every": 10**9})


def build_cache(cfg: Config, root: Path, images: int, classes: int, seed: int,
                in_child: bool = True) -> tuple[Path, Path, float]:
    """The noise manifest under root/data and its cache root/cache, extracted in a spawned child process (so that
    the backbone is not resident here; `in_child=False`: in this process); returns (manifest, cache, seconds)."""
    manifest_path = build_manifest(root / "data", images, classes, seed)
    started = time.perf_counter()
    if not in_child:
        _extract(cfg, manifest_path, root / "cache")
        return manifest_path, root / "cache", time.perf_counter() - started
    child = multiprocessing.get_context("spawn").Process(target=_extract, args=(cfg, manifest_path, root / "cache"))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"extract failed in the child process (exit code {child.exitcode})")
    return manifest_path, root / "cache", time.perf_counter() - started


def measure(cfg: Config, root: Path, manifest_path: Path, cache: Path, rounds: int, memory_steps: int,
            device: torch.device) -> dict[str, Any]:
    """Peak memory of a cached and an online run, then the interleaved step timings (see the module doc)."""
    cached_mb = peak_memory(cfg, cache, root / "cached", memory_steps, device)
    online_mb = peak_memory(cfg, None, root / "online", memory_steps, device, online_manifest=manifest_path)
    seconds = interleaved_seconds(cfg, cache, manifest_path, rounds, device)
    cached_s, online_s = statistics.median(seconds["cached"]), statistics.median(seconds["online"])
    return {
        "cached_s_per_step": cached_s, "online_s_per_step": online_s, "speedup": online_s / cached_s,
        "cached_peak_mb": cached_mb, "online_peak_mb": online_mb,
        "cached_steps_s": seconds["cached"], "online_steps_s": seconds["online"],
        "model": cfg.model.name, "crop": cfg.aug.crop, "batch": cfg.train.batch_size, "device": str(device),
        "rfm_at_timed_steps": [rfm_active(step, cfg.refine) for step in range(1, rounds + 1)],
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16-quickgelu")
    parser.add_argument("--images", type=int, default=8, help="images in the synthetic set (one cached view each)")
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--crop", type=int, default=320)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4, help="measured (cached, online) step pairs (+1 warm-up)")
    parser.add_argument("--memory-steps", type=int, default=2, help="steps of each memory-measuring run")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--device", default=str(default_device()))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    cfg = bench_config(preset("voc"), args.model, args.crop, args.batch, args.seed)
    with tempfile.TemporaryDirectory(prefix="weclip-train-bench-") as tmp:
        root = Path(tmp)
        manifest_path, cache, extract_s = build_cache(cfg, root, args.images, args.classes, args.seed)
        result = measure(cfg, root, manifest_path, cache, args.rounds, args.memory_steps, device)
    print(json.dumps({**result, "extract_s": extract_s, "images": args.images, "classes_per_image": args.classes},
                     indent=2))


if __name__ == "__main__":
    main()
