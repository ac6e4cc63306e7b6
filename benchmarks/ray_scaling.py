"""Extract views/s on a Ray cluster of 1 node against 2 nodes (1 CPU each), and the job size from which a local Ray
beats `--executor inline`.

Scaling: `ray.cluster_utils.Cluster` on this machine (every raylet on 127.0.0.1) with a 1-CPU head, and for the
2-node case one more 1-CPU worker node; the driver joins through `ray_address` (package folders uploaded, workers
started, model loaded per worker: all inside `extract_seconds`, cluster start-up outside). 1 and 2 nodes alternate
`--repeats` times; `ratio` = median 2-node views/s over median 1-node views/s. Break-even: for each job size, a fresh
cache by `executor="inline"` (this process, torch's threads) and by a local Ray sized to this machine
(`cpus_per_task=1`), alternating; whole-run seconds (Ray start and model loads included), medians; `break_even_images`
is the smallest size where Ray is faster (null: none of those tried). Tiny random ViT (tests/tiny-vit.json), random
VOC-sized JPEGs. Prints one JSON object.

    PYTHONPATH=. .venv/bin/python benchmarks/ray_scaling.py [--images 48 --repeats 3 --sizes 4,16,64]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every raylet binds 127.0.0.1

import numpy as np
from PIL import Image

from weclip.pipeline.config import Config
from weclip.stages import extract
from weclip.stages import manifest as manifest_stage

TINY_CONFIG = str(Path(__file__).resolve().parents[1] / "tests" / "tiny-vit.json")


def make_manifest(root: Path, count: int, seed: int = 0) -> Path:
    """A VOC tree of `count` random 500×375 / 375×500 JPEGs, each with 2 classes in its mask; its manifest."""
    rng = np.random.default_rng(seed)
    for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"img{i:04d}" for i in range(count)]
    for i, image_id in enumerate(ids):
        height, width = (375, 500) if i % 2 else (500, 375)
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "JPEGImages" / f"{image_id}.jpg", quality=90)
        mask = np.zeros((height, width), np.uint8)
        mask[: height // 2, : width // 2], mask[height // 2:, width // 2:] = 1 + i % 20, 1 + (i + 7) % 20
        Image.fromarray(mask).save(root / "SegmentationClassAug" / f"{image_id}.png")
    (root / "ImageSets/Segmentation/train_aug.txt").write_text("".join(f"{i}\n" for i in ids))
    return manifest_stage.run("voc", root, root / "manifest.parquet", split="train_aug",
                              progress=False).manifest_path


def bench_config(crop: int) -> Config:
    return Config().replace(model={"name": "tiny-vit", "pretrained": None}, aug={"crop": crop},
                            extract={"views": 2, "samples_per_shard": 8, "batch_size": 4, "feature_layers": [1, 2],
                                     "attn_layers": [2, 3], "cpus_per_task": 1})


def cluster_run(cfg: Config, manifest: Path, out: Path, nodes: int) -> float:
    """Views/s of one extract on a fresh cluster of `nodes` 1-CPU nodes."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=1)
        summary = extract.run(cfg, manifest, out, executor="ray", ray_address=cluster.address, progress=False,
                              model_configs=[TINY_CONFIG])
    finally:
        cluster.shutdown()
    return summary.views_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="images of the scaling job (2 views each)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="4,16,64", help="job sizes (images) of the break-even search")
    parser.add_argument("--crop", type=int, default=160)
    args = parser.parse_args()
    cfg = bench_config(args.crop)
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = make_manifest(root / "data", max([args.images, *sizes]))
        rate: dict[int, list[float]] = {1: [], 2: []}
        for r in range(args.repeats):
            for nodes in (1, 2) if r % 2 == 0 else (2, 1):
                rate[nodes].append(cluster_run(cfg, manifest, root / f"scale-{nodes}-{r}", nodes))
        seconds: dict[int, dict[str, list[float]]] = {n: {"inline": [], "ray": []} for n in sizes}
        for r in range(args.repeats):
            for n in sizes:
                for executor in ("inline", "ray") if r % 2 == 0 else ("ray", "inline"):
                    summary = extract.run(cfg, manifest, root / f"even-{n}-{executor}-{r}", executor=executor,
                                          limit=n, progress=False, model_configs=[TINY_CONFIG], device="cpu")
                    seconds[n][executor].append(summary.seconds)
    medians = {n: {e: statistics.median(v) for e, v in by.items()} for n, by in seconds.items()}
    views_per_s = {nodes: statistics.median(v) for nodes, v in rate.items()}
    print(json.dumps({
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "job": {"images": args.images, "views": 2 * args.images, "crop": args.crop, "model": "tiny-vit",
                "repeats": args.repeats},
        "views_per_s": {"1_node": views_per_s[1], "2_nodes": views_per_s[2], "runs": rate},
        "ratio": views_per_s[2] / views_per_s[1],
        "break_even": {"seconds_median": medians, "runs": seconds,
                       "break_even_images": next((n for n in sizes if medians[n]["ray"] < medians[n]["inline"]),
                                                 None)},
    }, indent=1))


if __name__ == "__main__":
    main()
