"""Views/s of the full extract path vs open_clip's own `encode_image`, same process, inputs, precision and batch.

Extract path = `pipeline.extract.worker.run_shard` on one shard: JPEG decode → view crop → normalise →
`softmax_gradcam` (frozen blocks, last block with grad, one vmapped backward for the class slots) → cache dtype → `write_shard`
(compression, checksums, commit) into a temporary cache. Baseline = `model.encode_image` under `no_grad` of an open_clip
model of the same architecture built for the crop size (open_clip does not resize its positional embedding per
forward), on the same normalised crops. Both use random weights (nothing can be downloaded here; cost does not depend
on the weights). After one warm-up, the two alternate `--repeats` times. `ratio` = forward / extract time, from the
medians of wall-clock time; on a shared machine also compare `ratio_best` (from the fastest runs: other load only ever
adds time) and `ratio_cpu` (from process CPU time). Then one run of each part of the extract path gives the breakdown:
`extract_compute` (decode, crops, normalise, Grad-CAM, dtype conversion) and `write_shard` (compression, checksums,
commit). Prints one JSON object.

    .venv/bin/python benchmarks/extract_throughput.py [--views 16 --batch 8 --classes 3 --size 320 --repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import open_clip
import torch
from PIL import Image

from weclip.pipeline.data.augment import normalise
from weclip.pipeline.cache.store import CacheWriter
from weclip.pipeline.config import Config
from weclip.pipeline.extract.plan import ExtractPlan, PlannedImage, cache_layout
from weclip.pipeline.extract.worker import ExtractJob, ShardData, extract_shard, run_shard
from weclip.pipeline.model.backbone import FrozenCLIP, default_device, load_backbone
from weclip.pipeline.model.text import TextEmbeddings, class_set, text_embeddings


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall-clock seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def make_images(folder: Path, count: int, classes: int, num_classes: int, seed: int) -> list[PlannedImage]:
    """VOC-sized random JPEGs (500×375 and 375×500) with `classes` labels each."""
    rng = random.Random(seed)
    pixels = np.random.default_rng(seed)
    images = []
    for i in range(count):
        height, width = (375, 500) if i % 2 else (500, 375)
        path = folder / f"img{i}.jpg"
        Image.fromarray(pixels.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, quality=90)
        images.append(PlannedImage(f"img{i}", str(path), tuple(sorted(rng.sample(range(num_classes), classes))),
                                   height, width))
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16-quickgelu")
    parser.add_argument("--views", type=int, default=16, help="views per shard (the timed unit)")
    parser.add_argument("--views-per-image", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--dtype", default=None, help="cache dtype (default: the config's)")
    parser.add_argument("--compressor", default=None, help="cache codec (default: the config's)")
    parser.add_argument("--device", default=str(default_device()))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    base = Config()
    cfg = base.replace(model={"name": args.model, "pretrained": None, "precision": args.precision},
                       aug={"crop": args.size},
                       extract={"views": args.views_per_image, "samples_per_shard": args.views,
                                "batch_size": args.batch, "dtype": args.dtype or base.extract.dtype,
                                "compressor": args.compressor or base.extract.compressor})
    backbone = load_backbone(cfg.model, args.device)
    text = text_embeddings(backbone, class_set(cfg.text.classes), cfg.text.template)
    with tempfile.TemporaryDirectory(prefix="extract_bench_") as tmp:
        print(json.dumps(measure(args, cfg, backbone, text, Path(tmp)), indent=2))


def measure(args: argparse.Namespace, cfg: Config, backbone: FrozenCLIP, text: TextEmbeddings,
            workdir: Path) -> dict[str, object]:
    device = backbone.device
    images = make_images(workdir, -(-args.views // args.views_per_image), args.classes, text.fg.shape[0], args.seed)
    plan = ExtractPlan(tuple(images), args.views_per_image, args.views, class_set(cfg.text.classes))
    task = plan.task(0)
    fingerprint, spec = cache_layout(cfg, plan, backbone)
    out = str(workdir / "cache")
    writer = CacheWriter.create_or_open(out, spec, fingerprint)
    job = ExtractJob(cfg=cfg, out=out, spec=spec, fingerprint=fingerprint, classes=plan.classes, device=args.device)

    reference = open_clip.create_model(args.model, pretrained=None, force_image_size=args.size).to(device).eval()
    autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    shard: dict[str, ShardData] = {}

    def compute() -> None:
        shard["data"] = extract_shard(backbone, text, task, cfg, spec)

    def write() -> None:
        writer.write_shard(task.shard, shard["data"].arrays, shard["data"].rows, shard["data"].skipped)

    compute()  # its crops are the baseline's inputs
    inputs = normalise(torch.from_numpy(shard["data"].arrays["image"]).to(device), cfg.model.normalisation)

    def forward() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            for start in range(0, len(inputs), args.batch):
                reference.encode_image(inputs[start:start + args.batch])

    outcome = run_shard(job, task)  # warm-up (also gives the sizes)
    forward()
    load_before = os.getloadavg()[0]
    runs: dict[str, Callable[[], object]] = {"extract": lambda: run_shard(job, task), "forward": forward}
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            w, c = timed(fn, device)
            wall[name].append(w)
            cpu[name].append(c)
    median = {name: statistics.median(values) for name, values in wall.items()}
    views = len(task.samples)
    return {
        "extract_views_per_s": views / median["extract"],
        "forward_views_per_s": views / median["forward"],
        "ratio": median["forward"] / median["extract"],
        "ratio_best": min(wall["forward"]) / min(wall["extract"]),
        "ratio_cpu": statistics.median(cpu["forward"]) / statistics.median(cpu["extract"]),
        "bytes_per_view": outcome.nbytes / outcome.samples,
        "raw_bytes_per_view": sum(a.sample_nbytes for a in spec.arrays().values()),
        "codec": cfg.extract.compressor,
        "dtype": cfg.extract.dtype,
        "breakdown_s": {"extract_compute": timed(compute, device)[0], "write_shard": timed(write, device)[0]},
        "model": args.model,
        "precision": args.precision,
        "size": args.size,
        "views": views,
        "batch": args.batch,
        "classes_per_image": args.classes,
        "feature_layers": list(cfg.extract.feature_layers),
        "attn_layers": list(cfg.extract.attn_layers),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_1min": [load_before, os.getloadavg()[0]],  # other processes' load, before and after timing
        "platform": platform.platform(),
        "repeats": args.repeats,
        "runs_wall_s": wall,
        "runs_cpu_s": cpu,
    }


if __name__ == "__main__":
    main()
