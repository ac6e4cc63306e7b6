"""Feature-cache codec benchmark: bytes per sample and write/read MB/s for every cache array and compressor.

Data are the real outputs of an open_clip ViT with random weights (no pretrained weights can be downloaded
here): per-block patch tokens and head-averaged patch-to-patch attention of augmented views (random rescale,
flip, crop with zero padding) of 1/f-noise images, which have the power spectrum of natural photographs.
CAMs are smooth min-max-normalised random fields in the first slots, zeros in the rest. Each array is
written through the cache's own zarr layout (`ArraySchema.zarr_kwargs`: chunk = sample, shard = all samples)
to a local directory; reads come from the page cache, so read MB/s measures decoding.

    .venv/bin/python benchmarks/cache_codecs.py --samples 8 > benchmarks/results/cache_codecs.json

MB/s are raw (decoded) megabytes per second; `ratio` = raw / stored.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import tempfile
import time

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
import zarr
from zarr.storage import LocalStore

from pipeline.cache.schema import CacheSpec

CODECS = ("none", "zstd:1", "zstd:3", "zstd:9", "blosc-lz4", "blosc-zstd:1", "blosc-zstd:3",
          "blosc-lz4-bit", "blosc-zstd-bit:1")


def pink_noise_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """3 × H × W uint8 with a 1/f amplitude spectrum per channel (natural-image statistics)."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    amplitude = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(height, width))
    channels = []
    for _ in range(3):
        phase = rng.uniform(0, 2 * np.pi, amplitude.shape)
        field = np.fft.irfft2(amplitude * np.exp(1j * phase), s=(height, width))
        channels.append((field - field.mean()) / field.std())
    img = np.stack(channels) * 45 + rng.uniform(80, 170)
    return np.clip(img, 0, 255).astype(np.uint8)


def augmented_view(rng: np.random.Generator, image: np.ndarray, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """Random rescale U(0.5, 2), h-flip, crop with zero padding: (3 × crop × crop uint8, crop × crop bool)."""
    scale = rng.uniform(0.5, 2.0)
    h, w = (max(1, round(s * scale)) for s in image.shape[1:])
    x = F.interpolate(torch.from_numpy(image)[None].float(), size=(h, w), mode="bilinear", align_corners=False)
    x = x[0].round().clamp(0, 255).to(torch.uint8).numpy()
    if rng.random() < 0.5:
        x = x[:, :, ::-1]
    out = np.zeros((3, crop, crop), np.uint8)
    valid = np.zeros((crop, crop), bool)
    y0, x0 = rng.integers(0, max(h - crop, 0) + 1), rng.integers(0, max(w - crop, 0) + 1)
    patch = x[:, y0:y0 + crop, x0:x0 + crop]
    out[:, :patch.shape[1], :patch.shape[2]] = patch
    valid[:patch.shape[1], :patch.shape[2]] = True
    return out, valid


@torch.no_grad()
def vit_outputs(model: torch.nn.Module, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Patch tokens after blocks 1..L-1 and head-averaged patch-to-patch attention of blocks 1..L."""
    visual = model.visual
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    x = visual._embeds((torch.from_numpy(images).float() - mean) / std)
    feats, attns = [], []
    for block in visual.transformer.resblocks:
        y = block.ln_1(x)
        out, weights = block.attn(y, y, y, need_weights=True, average_attn_weights=True)
        x = x + block.ls_1(out)
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        feats.append(x[:, 1:])
        attns.append(weights[:, 1:, 1:])
    return torch.stack(feats[:-1], 1).numpy(), torch.stack(attns, 1).numpy()


def smooth_cams(rng: np.random.Generator, n: int, k_max: int, grid: int) -> np.ndarray:
    cams = np.zeros((n, k_max, grid, grid), np.float32)
    for i in range(n):
        for k in range(rng.integers(1, 3)):
            low = torch.from_numpy(rng.random((1, 1, 4, 4)).astype(np.float32))
            up = F.interpolate(low, size=(grid, grid), mode="bilinear", align_corners=False)[0, 0].numpy()
            cams[i, k] = (up - up.min()) / (up.max() - up.min())
    return cams


def make_data(args: argparse.Namespace) -> tuple[CacheSpec, dict[str, np.ndarray]]:
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    model = open_clip.create_model(args.model, pretrained=None, force_image_size=args.crop).eval()
    views = [augmented_view(rng, pink_noise_image(rng, 375, 500), args.crop) for _ in range(args.samples)]
    images = np.stack([v[0] for v in views])
    valid = np.stack([v[1] for v in views])
    features, attn = vit_outputs(model, images)
    grid = args.crop // 16
    cam_classes = np.full((args.samples, args.k_max), -1, np.int16)
    cams = smooth_cams(rng, args.samples, args.k_max, grid)
    cam_classes[cams.max(axis=(2, 3)) > 0] = 7
    spec = CacheSpec(total_samples=args.samples, samples_per_shard=args.samples, feature_layers=features.shape[1],
                     attn_layers=attn.shape[1], grid=(grid, grid), dim=features.shape[-1], k_max=args.k_max,
                     crop=args.crop, dtype=args.dtype, compressor="none")
    arrays = {"features": features, "attn": attn, "cams": cams, "cam_classes": cam_classes,
              "image": images, "valid": valid}
    return spec, arrays


def measure(spec: CacheSpec, arrays: dict[str, np.ndarray], codec: str, repeats: int) -> list[dict]:
    spec = dataclasses.replace(spec, compressor=codec)
    rows = []
    for name, schema in spec.arrays().items():
        stored = schema.to_storage(arrays[name])
        raw = stored.nbytes
        write_s, read_s = math.inf, math.inf
        for _ in range(repeats):
            tmp = tempfile.mkdtemp(prefix="weclip-codec-")
            try:
                array = zarr.create_group(LocalStore(tmp)).create_array(**schema.zarr_kwargs(spec))
                t0 = time.perf_counter()
                array[:] = stored
                write_s = min(write_s, time.perf_counter() - t0)
                t0 = time.perf_counter()
                back = array[:]
                read_s = min(read_s, time.perf_counter() - t0)
                assert np.array_equal(back, stored), f"{codec} {name}: round trip differs"
                on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(tmp, name))
                              for f in fs if f != "zarr.json")
            finally:
                shutil.rmtree(tmp)
        rows.append({"codec": codec, "array": name, "bytes_per_sample": on_disk / spec.total_samples,
                     "raw_bytes_per_sample": raw / spec.total_samples, "ratio": raw / max(on_disk, 1),
                     "write_MBps": raw / write_s / 1e6, "read_MBps": raw / read_s / 1e6})
    return rows


def totals(rows: list[dict]) -> list[dict]:
    """Per codec over all arrays: bytes per sample and the MB/s of writing / reading a whole sample."""
    out = []
    for codec in dict.fromkeys(r["codec"] for r in rows):
        mine = [r for r in rows if r["codec"] == codec]
        raw = sum(r["raw_bytes_per_sample"] for r in mine)
        out.append({"codec": codec, "bytes_per_sample": sum(r["bytes_per_sample"] for r in mine),
                    "raw_bytes_per_sample": raw,
                    "ratio": raw / sum(r["bytes_per_sample"] for r in mine),
                    "write_MBps": raw / sum(r["raw_bytes_per_sample"] / r["write_MBps"] for r in mine),
                    "read_MBps": raw / sum(r["raw_bytes_per_sample"] / r["read_MBps"] for r in mine)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--model", default="ViT-B-16-quickgelu")
    parser.add_argument("--crop", type=int, default=320)
    parser.add_argument("--k-max", type=int, default=4)
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32", "bfloat16"])
    parser.add_argument("--codecs", nargs="+", default=list(CODECS))
    parser.add_argument("--repeats", type=int, default=2, help="best of this many writes/reads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    spec, arrays = make_data(args)
    rows = [r for codec in args.codecs for r in measure(spec, arrays, codec, args.repeats)]
    print(json.dumps({
        "benchmark": "cache_codecs", "model": args.model, "weights": "random", "crop": args.crop,
        "samples": args.samples, "dtype": args.dtype, "arrays": list(spec.arrays()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "zarr": zarr.__version__},
        "per_array": rows, "per_sample": totals(rows),
    }, indent=1))


if __name__ == "__main__":
    main()
