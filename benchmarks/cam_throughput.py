"""Batched Softmax-Grad-CAM vs per-image, per-class Grad-CAM loops, same process.

Two loops are timed. `loop_full_pass`: one full pass (all blocks + backward) per (image, class), the naive Grad-CAM the
batched version replaces; `speedup` is against it. `loop`: the released code's structure, where the frozen blocks
run once per image and only the last block + backward repeat per class; `speedup_vs_released_loop` is against it.

Default workload: ViT-B-16-quickgelu with random weights (nothing can be downloaded here; the cost does not depend on
the weights), 320×320 inputs, 8 images × 3 classes, VOC-sized text (20 classes, 25 background prompts), the extract
stage's default layers (features of blocks 1..11, attention of blocks 1..12). Each function runs once as warm-up, then
`--repeats` times alternately; medians are reported. Prints one JSON object.

Both functions run blocks 1..n-1 once per image; only the Grad-CAM part (block n forward + backward per class) differs.
That shared forward is timed too (`frozen_batched_s`: the batch at once, `frozen_per_image_s`: image by image, as the
loop does), and `gradcam_part_speedup` compares what remains: (loop - frozen_per_image) / (batched - frozen_batched).

    .venv/bin/python benchmarks/cam_throughput.py [--images 8 --classes 3 --size 320 --repeats 3]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from weclip.pipeline.model.backbone import FrozenCLIP
from weclip.pipeline.model.cam import CamBatch, softmax_gradcam, softmax_gradcam_loop
from weclip.pipeline.config import ExtractConfig
from weclip.pipeline.model.text import VOC_BACKGROUND, VOC_CLASSES, TextEmbeddings


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16-quickgelu")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    backbone = FrozenCLIP.load(args.model, pretrained=None, device=args.device)
    device = backbone.device
    text = TextEmbeddings(fg=F.normalize(torch.randn(len(VOC_CLASSES), backbone.embed_dim), dim=-1),
                          bg=F.normalize(torch.randn(len(VOC_BACKGROUND), backbone.embed_dim), dim=-1))
    rng = random.Random(args.seed)
    labels = [sorted(rng.sample(range(len(VOC_CLASSES)), args.classes)) for _ in range(args.images)]
    images = torch.randn(args.images, 3, args.size, args.size, device=device)
    layers = ExtractConfig()
    frozen_tokens = [i for i in layers.feature_layers if i < backbone.num_blocks]
    frozen_attn = [i for i in layers.attn_layers if i < backbone.num_blocks]
    run: dict[str, Callable[[], object]] = {
        "batched": lambda: softmax_gradcam(backbone, images, labels, text, layers.feature_layers, layers.attn_layers),
        "loop": lambda: softmax_gradcam_loop(backbone, images, labels, text, layers.feature_layers,
                                             layers.attn_layers),
        "loop_full_pass": lambda: softmax_gradcam_loop(backbone, images, labels, text, layers.feature_layers,
                                                       layers.attn_layers, full_pass=True),
        "frozen_batched": lambda: backbone.forward_frozen(images, frozen_tokens, frozen_attn),
        "frozen_per_image": lambda: [backbone.forward_frozen(images[b:b + 1], frozen_tokens, frozen_attn)
                                     for b in range(args.images)],
    }
    outputs: dict[str, CamBatch] = {name: run[name]() for name in ("batched", "loop", "loop_full_pass")}
    times: dict[str, list[float]] = {name: [] for name in run}
    for _ in range(args.repeats):
        for name, fn in run.items():
            times[name].append(seconds(fn, device))
    median = {name: statistics.median(values) for name, values in times.items()}
    cams = outputs["batched"].cams
    print(json.dumps({
        "speedup": median["loop_full_pass"] / median["batched"],
        "speedup_vs_released_loop": median["loop"] / median["batched"],
        "max_abs_diff": max((cams - outputs[name].cams).abs().max().item() for name in ("loop", "loop_full_pass")),
        "batched_s": median["batched"],
        "loop_full_pass_s": median["loop_full_pass"],
        "loop_s": median["loop"],
        "frozen_batched_s": median["frozen_batched"],
        "frozen_per_image_s": median["frozen_per_image"],
        "gradcam_part_speedup": (median["loop"] - median["frozen_per_image"])
                                / (median["batched"] - median["frozen_batched"]),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "model": args.model,
        "images": args.images,
        "classes_per_image": args.classes,
        "size": args.size,
        "repeats": args.repeats,
        "logit_scale": backbone.logit_scale,
        "min_cam_peak": cams.amax(dim=(-2, -1)).min().item(),  # ≈1 unless a CAM is degenerate
        "runs_s": times,
    }, indent=2))


if __name__ == "__main__":
    main()
