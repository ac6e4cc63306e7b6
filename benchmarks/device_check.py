"""The GPU device check (issue 12 §6): four measurements in one run, one JSON file. Run it through
`benchmarks/device_check.sh` (which bounds it to 8 minutes); `--smoke` is the CPU mode on the tiny model that the
test suite runs so that the script cannot rot.

1. `extract`: views/s of the whole extract path against a bare open_clip `encode_image` on the same crops, under
   bf16 and fp16 autocast (`benchmarks/extract_throughput.py`'s `measure`; random ViT-B/16 weights).
2. `train`: seconds per training step from the cache against online (backbone + Grad-CAM in the loop), with the peak
   GPU memory of each (`benchmarks/train_step.py`'s `build_cache` / `measure`).
3. `reader`: samples/s the cache reader delivers through the training DataLoader with `--workers` processes (8),
   against what the cached training step of 2. consumes (batch / s per step); `headroom` > 1 means the reader keeps
   the GPU fed.
4. `gradcam`: Softmax-Grad-CAM of the same batch on the device and on the CPU (fp32, TF32 off), max abs difference
   against `--tolerance`, and both times.

Random weights throughout (nothing can be downloaded on the device machine; the cost does not depend on them). The
JSON is rewritten after each part, `"complete": true` only after the last.

    benchmarks/device_check.sh [--out benchmarks/results/device_check.json]       # on the GPU machine
    benchmarks/device_check.sh --smoke --out /tmp/device_check_smoke.json         # CPU, tiny model, < 1 minute
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import extract_throughput  # noqa: E402
import train_step  # noqa: E402
from weclip.pipeline.config import Config, preset  # noqa: E402
from weclip.pipeline.files import atomic_write_text  # noqa: E402
from weclip.pipeline.model.backbone import default_device, load_backbone  # noqa: E402
from weclip.pipeline.model.cam import softmax_gradcam  # noqa: E402
from weclip.pipeline.model.text import class_set, text_embeddings  # noqa: E402
from weclip.pipeline.training.sources import CachedSource  # noqa: E402

SMOKE_CROP = 64  # a 4×4 patch grid: enough for every code path, cheap on a shared CPU


def check_config(smoke: bool, batch: int, seed: int) -> Config:
    """The VOC preset (the noise images carry VOC classes) on random ViT-B/16 at 320², or for the smoke mode the
    3-block tiny model with the shapes preset's layer lists, which fit it, a small decoder and 2 PAR iterations."""
    if not smoke:
        return train_step.bench_config(preset("voc"), "ViT-B-16-quickgelu", 320, batch, seed)
    tiny = preset("shapes")
    base = preset("voc").replace(
        extract={"feature_layers": tiny.extract.feature_layers, "attn_layers": tiny.extract.attn_layers},
        refine={"static_layers": tiny.refine.static_layers, "rfm_layers": tiny.refine.rfm_layers},
        decoder={"embed_dim": 32, "layers": 1, "heads": 2, "mlp_dim": 64}, par={"num_iter": 2, "dilations": [1, 2]})
    return train_step.bench_config(base, tiny.model.name, SMOKE_CROP, batch, seed)


def extract_check(cfg: Config, args: argparse.Namespace, device: torch.device, workdir: Path) -> dict[str, Any]:
    """extract_throughput.measure under each autocast precision."""
    out = {}
    for precision in args.precisions:
        run_cfg = cfg.replace(model={"precision": precision},
                              extract={"views": 2, "samples_per_shard": args.views, "batch_size": args.batch_extract})
        backbone = load_backbone(run_cfg.model, device)
        text = text_embeddings(backbone, class_set(run_cfg.text.classes), run_cfg.text.template)
        bench_args = argparse.Namespace(views=args.views, views_per_image=2, batch=args.batch_extract,
                                        classes=args.classes, size=cfg.aug.crop, repeats=args.repeats,
                                        precision=precision, device=str(device), seed=args.seed, model=cfg.model.name)
        folder = workdir / f"extract-{precision}"
        folder.mkdir()
        result = extract_throughput.measure(bench_args, run_cfg, backbone, text, folder)
        out[precision] = {k: result[k] for k in ("extract_views_per_s", "forward_views_per_s", "ratio", "ratio_best",
                                                 "bytes_per_view", "breakdown_s", "runs_wall_s")}
    return out


def reader_check(cfg: Config, cache: Path, device: torch.device, workers: int, steps: int) -> dict[str, Any]:
    """Samples/s of the cached training DataLoader (as stages/train.py builds it) with `workers` processes, the first
    batch (worker start-up) left out."""
    source = CachedSource(cfg, cache, device)
    loader = DataLoader(source.dataset(0, steps + 1), batch_size=None, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda")
    samples, started = 0, time.perf_counter()
    first = None
    for index, item in enumerate(loader):
        if index == 0:
            first = time.perf_counter() - started
            started = time.perf_counter()
            continue
        samples += len(item["rows"])
    seconds = time.perf_counter() - started
    return {"workers": workers, "steps": steps, "samples": samples, "samples_per_s": samples / seconds,
            "first_batch_s": first, "cache_samples": source.n_samples}


def gradcam_check(cfg: Config, device: torch.device, images: int, classes: int, tolerance: float,
                  seed: int) -> dict[str, Any]:
    """Softmax-Grad-CAM of one batch on `device` and on the CPU, same weights (load_backbone seeds the init)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rng = random.Random(seed)
    names = class_set(cfg.text.classes)
    labels = [sorted(rng.sample(range(names.num_classes), classes)) for _ in range(images)]
    batch = torch.randn(images, 3, cfg.aug.crop, cfg.aug.crop, generator=torch.Generator().manual_seed(seed))
    cams, seconds = {}, {}
    for where in (device, torch.device("cpu")):
        backbone = load_backbone(cfg.model, where)
        text = text_embeddings(backbone, names, cfg.text.template)
        softmax_gradcam(backbone, batch.to(where), labels, text, (), ())  # warm-up
        started = time.perf_counter()
        out = softmax_gradcam(backbone, batch.to(where), labels, text, (), ())
        cams[where.type] = out.cams.cpu()
        seconds[where.type] = time.perf_counter() - started
    diff = (cams[device.type] - cams["cpu"]).abs()
    return {"devices": [str(device), "cpu"], "max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
            "tolerance": tolerance, "equal": diff.max().item() <= tolerance, "seconds": seconds,
            "images": images, "classes_per_image": classes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, small counts: checks the script runs")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/device_check.json"))
    parser.add_argument("--device", default=None, help="default: cuda when available (the smoke mode: cpu)")
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=1e-3, help="Grad-CAM device vs CPU, max abs difference")
    args = parser.parse_args()
    smoke = args.smoke
    # (views per extract shard, extract batch, repeats, images in the training cache, rounds, reader workers, steps)
    args.views, args.batch_extract, args.repeats = (4, 2, 1) if smoke else (64, 16, 3)
    images, rounds, memory_steps, workers, steps = (4, 1, 1, 2, 4) if smoke else (64, 4, 2, 8, 200)
    args.classes = 3
    device = torch.device(args.device or ("cpu" if smoke else str(default_device())))
    cfg = check_config(smoke, batch=4, seed=args.seed)
    started = time.perf_counter()
    result: dict[str, Any] = {"smoke": smoke, "device": str(device), "model": cfg.model.name, "crop": cfg.aug.crop,
                              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                              "torch": torch.__version__, "platform": platform.platform(), "complete": False}

    def record(section: str, value: Any) -> None:
        """Rewrite the JSON after every section, so that a run stopped by the time limit keeps what it measured."""
        result[section] = value
        result["seconds"] = time.perf_counter() - started
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="weclip-device-check-") as tmp:
        root = Path(tmp)
        record("extract", extract_check(cfg, args, device, root))
        manifest, cache, extract_s = train_step.build_cache(cfg, root / "train", images, args.classes, args.seed,
                                                            in_child=not smoke)
        record("train", {**train_step.measure(cfg, root / "train", manifest, cache, rounds, memory_steps, device),
                         "cache_extract_s": extract_s, "images": images})
        reader = reader_check(cfg, cache, device, workers, steps)
        consumed = cfg.train.batch_size / result["train"]["cached_s_per_step"]
        record("reader", {**reader, "train_consumes_samples_per_s": consumed,
                          "headroom": reader["samples_per_s"] / consumed})
    record("gradcam", gradcam_check(cfg, device, 2 if smoke else 8, args.classes, args.tolerance, args.seed))
    record("complete", True)
    print(args.out.read_text(), end="")

if __name__ == "__main__":
    main()
