"""Cache read benchmark: how fast a training process gets its batches out of a ViT-B/16-sized feature cache.

The cache is synthetic (no model needed): `--samples` views of ViT-B/16 at crop 320 (features 11 × 400 × 768,
attention 10 × 400 × 400, as the VOC preset stores them), written through `CacheWriter` with a provenance that
`weclip train` accepts. Features are Gaussian (float16 features are nearly incompressible, like real ones:
results/cache_storage.json), attention rows a softmax of Gaussian logits, CAMs smooth fields, the crop random
bytes; `--distinct` different samples are written cyclically (compression is per chunk, so sizes and decode work
are those of distinct data). Every read comes from the page cache (each file is read once before timing).

Figures, each a ratio measured in one run, alternating A and B round by round (the machine is shared), medians:

* `bytes_per_view`: file bytes per sample for every storage option of `pipeline/cache/schema.py` (float dtype ×
  compressor), on `--size-samples` samples each.
* `read_mb_per_s` / `raw_read_mb_per_s` / `read_ratio`, per compressor of `--codecs`: decoded (stored-dtype) MB/s of
  `CacheReader.read` on random training batches of `--batch` in one process, against a plain sequential read of
  the same shard files; `zarr_rowwise_mb_per_s` is the previous read path (one zarr `getitem` per (array, row)).
* `samples_per_s`: samples/s of those batches (one process), and `url_samples_per_s` of the same cache copied to
  `--url` (an fsspec URL, e.g. s3://bucket/prefix with AWS_ENDPOINT_URL set for an S3-compatible server).
* `workers_scaling`: samples/s through the training DataLoader (`CachedSteps`, as `weclip train` builds it) with
  1 and 2 `train.loader_workers`, the consumer doing nothing; `train_setup` shares the CPUs' decode threads among
  the workers (so one worker already decodes on every core), `one_thread_per_worker` shows process scaling alone.
* `data_wait_fraction`: `data_s / s_per_step` from `metrics.jsonl` of a real `weclip train` run on the CPU from
  this cache (VOC preset, `train.loader_workers` = 2), the first `--skip-steps` steps (worker start-up) left out.

    .venv/bin/python benchmarks/cache_read.py > benchmarks/results/cache_read.json
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader
from zarr.core.sync import sync
from zarr.storage import LocalStore, WrapperStore

from weclip.pipeline.cache.fingerprint import fingerprint_from_config
from weclip.pipeline.cache.schema import FLOAT_DTYPES, CacheSpec
from weclip.pipeline.cache.store import CacheReader, CacheWriter
from weclip.pipeline.config import Config, preset
from weclip.pipeline.model.text import class_set
from weclip.pipeline.training.sources import CachedSteps
from weclip.stages import train

COMPRESSORS = ("none", "zstd", "blosc-lz4", "blosc-zstd:1", "blosc-zstd", "blosc-lz4-bit", "blosc-zstd-bit")


def bench_config(args: argparse.Namespace, compressor: str, dtype: str = "float16") -> Config:
    """The VOC preset's cache at ViT-B/16 size; `--storage plain` stores features and attention as floats with
    `compressor` like every other array, `--storage preset` keeps the preset's 8-bit codings and their compressors."""
    storage = ({} if args.storage == "preset" else
               {"features_storage": "plain", "attn_storage": "plain", "features_compressor": None,
                "attn_compressor": None})
    return preset("voc").replace(model={"name": "ViT-B-16-quickgelu", "pretrained": None},
                                 aug={"crop": 320}, extract={"views": 1, "compressor": compressor, "dtype": dtype,
                                                             "samples_per_shard": args.shard_samples, **storage},
                                 train={"batch_size": args.batch, "loader_workers": 2, "checkpoint_every": 10**9})


def vit_spec(cfg: Config, samples: int) -> CacheSpec:
    grid = cfg.aug.crop // 16
    return CacheSpec(total_samples=samples, samples_per_shard=cfg.extract.samples_per_shard,
                     feature_layers=len(cfg.extract.feature_layers), attn_layers=len(cfg.extract.attn_layers),
                     grid=(grid, grid), dim=768, k_max=4, crop=cfg.aug.crop, dtype=cfg.extract.dtype,
                     compressor=cfg.extract.compressor, features_storage=cfg.extract.features_storage,
                     features_compressor=cfg.extract.features_compressor, attn_storage=cfg.extract.attn_storage,
                     attn_compressor=cfg.extract.attn_compressor)


def synthetic_samples(spec: CacheSpec, n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    shapes = {name: schema.shape for name, schema in spec.arrays().items()}
    out = []
    for i in range(n):
        logits = rng.standard_normal(shapes["attn"], dtype=np.float32) * 2
        attn = np.exp(logits - logits.max(-1, keepdims=True))
        low = rng.random((spec.k_max, 4, 4), dtype=np.float32)
        cams = np.kron(low, np.ones((spec.grid[0] // 4, spec.grid[1] // 4), np.float32))
        classes = np.full(spec.k_max, -1, np.int16)
        classes[:2] = rng.choice(20, 2, replace=False)
        cams[2:] = 0
        out.append({"features": rng.standard_normal(shapes["features"], dtype=np.float32) * 3,
                    "attn": attn / attn.sum(-1, keepdims=True), "cams": cams, "cam_classes": classes,
                    "image": rng.integers(0, 256, shapes["image"], dtype=np.uint8),
                    "valid": np.ones(shapes["valid"], bool)})
    return out


def build_cache(root: str, cfg: Config, samples: int, pool: list[dict[str, np.ndarray]]) -> CacheSpec:
    """A complete cache of `samples` one-view images (sample r = pool[r % len(pool)]) that `weclip train` reads."""
    spec, classes = vit_spec(cfg, samples), class_set("voc")
    labels = {r: sorted(int(c) for c in pool[r % len(pool)]["cam_classes"] if c >= 0) for r in range(samples)}
    fingerprint = fingerprint_from_config(cfg, grid=spec.grid, prompts=classes.prompts(cfg.text.template),
                                          class_names=classes.classes,
                                          manifest=[(f"img{r}", labels[r]) for r in range(samples)])
    writer = CacheWriter.create_or_open(root, spec, fingerprint, {"config": cfg.to_dict(),
                                                                  "class_set": classes.to_dict()})
    for shard in range(spec.n_shards):
        rows = list(spec.shard_rows(shard))
        arrays = {name: np.stack([pool[r % len(pool)][name] for r in rows]) for name in spec.arrays()}
        writer.write_shard(shard, arrays, [{"sample_id": f"img{r}#0", "image_id": f"img{r}", "view": 0, "row": r,
                                            "labels": labels[r]} for r in rows])
    writer.finalize()
    return spec


def shard_files(root: str, spec: CacheSpec) -> list[Path]:
    return sorted(p for name in spec.arrays() for p in (Path(root) / name / "c").rglob("*") if p.is_file())


def bytes_per_view(args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    """File bytes per sample of every (float dtype, compressor) the schema offers."""
    out = {}
    for dtype in FLOAT_DTYPES:
        for compressor in COMPRESSORS:
            cfg = bench_config(args, compressor, dtype)
            spec = vit_spec(cfg, args.size_samples)
            root = str(tmp / f"size-{dtype}-{compressor}")
            build_cache(root, cfg, args.size_samples, synthetic_samples(spec, args.size_samples, args.seed))
            out[f"{dtype}/{compressor}"] = sum(p.stat().st_size for p in shard_files(root, spec)) / args.size_samples
            shutil.rmtree(root)
    return out


def raw_read(files: list[Path]) -> int:
    """Read every file start to end into new memory, as any reader that hands out what it read; the bytes read."""
    return sum(len(path.read_bytes()) for path in files)


def raw_readinto(files: list[Path], buffer: bytearray) -> int:
    """Read every file into one reused buffer: the kernel's copy alone, the ceiling of any read."""
    total = 0
    view = memoryview(buffer)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def zarr_rowwise(reader: CacheReader, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The previous read path, as a baseline: one concurrent zarr `getitem` per (array, row)."""
    group = zarr.open_group(reader.store, mode="r")
    arrays = {n: group[n].async_array for n in reader.schemas}

    async def fetch() -> list[Any]:
        return await asyncio.gather(*(a.getitem(slice(p, p + 1)) for a in arrays.values() for p in rows))
    parts = iter(sync(fetch()))
    return {n: np.concatenate([next(parts) for _ in rows]) for n in arrays}


def batches(n_rows: int, batch: int, count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.choice(n_rows, batch, replace=False) for _ in range(count)]


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def read_speeds(root: str, spec: CacheSpec, args: argparse.Namespace) -> dict[str, float]:
    """Decoded MB/s of random batches and MB/s of a plain sequential read of the shard files, in rounds that
    alternate: `CacheReader` on the folder (os.pread), the same through the Store API (`store.get` with byte
    ranges, as on an object store), the previous path (zarr `getitem` per (array, row)), the plain read. Medians."""
    readers = {"local": CacheReader(root), "store_api": CacheReader(WrapperStore(LocalStore(root)))}
    files = shard_files(root, spec)
    file_bytes = sum(p.stat().st_size for p in files)
    buffer = bytearray(max(p.stat().st_size for p in files))
    raw_read(files)  # into the page cache
    sample_bytes = sum(s.sample_nbytes for s in spec.arrays().values())
    work = batches(spec.total_samples, args.batch, args.batches, args.seed)
    for reader in readers.values():  # warm: every shard index read once, as after the first epoch
        for rows in work:
            reader.read(rows)
    runs: dict[str, Callable[[], Any]] = {
        **{name: (lambda r=reader: [r.read(rows) for rows in work]) for name, reader in readers.items()},
        "zarr_rowwise": lambda: [zarr_rowwise(readers["local"], rows) for rows in work]}
    mb: dict[str, list[float]] = {name: [] for name in [*runs, "raw", "raw_readinto"]}
    for _ in range(args.rounds):
        for name, run in runs.items():
            mb[name].append(len(work) * args.batch * sample_bytes / timed(run) / 1e6)
        mb["raw"].append(file_bytes / timed(lambda: raw_read(files)) / 1e6)
        mb["raw_readinto"].append(file_bytes / timed(lambda: raw_readinto(files, buffer)) / 1e6)
    read = statistics.median(mb["local"])

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(mb[a], mb[b]))
    return {"read_mb_per_s": read, "raw_read_mb_per_s": statistics.median(mb["raw"]),
            "read_ratio": ratio("local", "raw"), "raw_readinto_mb_per_s": statistics.median(mb["raw_readinto"]),
            "read_ratio_to_readinto": ratio("local", "raw_readinto"),
            "store_api_mb_per_s": statistics.median(mb["store_api"]), "local_over_store_api": ratio("local", "store_api"),
            "zarr_rowwise_mb_per_s": statistics.median(mb["zarr_rowwise"]),
            "speedup_over_zarr_rowwise": ratio("local", "zarr_rowwise"),
            "samples_per_s": read * 1e6 / sample_bytes, "decoded_mb_per_sample": sample_bytes / 1e6,
            "file_mb_per_sample": file_bytes / spec.total_samples / 1e6, "rounds_mb_per_s": mb}


def url_samples_per_s(root: str, spec: CacheSpec, url: str, args: argparse.Namespace) -> dict[str, float]:
    """Samples/s of random batches from a copy of the cache at `url`, alternating with the local cache."""
    import fsspec
    fs, path = fsspec.core.url_to_fs(url)
    fs.put(root.rstrip("/") + "/", path.rstrip("/") + "/", recursive=True)
    readers = {"url": CacheReader(url), "local": CacheReader(root)}
    work = batches(spec.total_samples, args.batch, args.batches, args.seed + 1)
    for reader in readers.values():
        for rows in work:
            reader.read(rows)
    speeds: dict[str, list[float]] = {k: [] for k in readers}
    for _ in range(args.rounds):
        for name, reader in readers.items():
            speeds[name].append(args.batches * args.batch / timed(lambda: [reader.read(r) for r in work]))
    return {"url": url, "url_samples_per_s": statistics.median(speeds["url"]),
            "local_samples_per_s": statistics.median(speeds["local"])}


class OneThreadSteps(CachedSteps):
    """`CachedSteps` whose reader decodes in its worker's own thread only, so that scaling comes from processes."""

    def _open(self) -> CacheReader:
        if self._reader is None:
            self._reader = CacheReader(self.root, check_files=False, threads=1)
        return self._reader


def loader_samples_per_s(dataset: CachedSteps, workers: int, steps: int, batch: int) -> float:
    """Samples/s through the training DataLoader with `workers` processes; the first batch (start-up) not timed."""
    it = iter(DataLoader(dataset, batch_size=None, num_workers=workers))
    next(it)
    start = time.perf_counter()
    for _ in it:
        pass
    return steps * batch / (time.perf_counter() - start)


def workers_scaling(root: str, cfg: Config, spec: CacheSpec, args: argparse.Namespace) -> dict[str, Any]:
    """1 vs 2 workers, as `weclip train` sets them up (the CPUs' decode threads shared among the workers), and with
    one decode thread per worker (process scaling alone); rounds alternate, medians."""
    rows = np.arange(spec.total_samples)
    kinds = {"train_setup": CachedSteps, "one_thread_per_worker": OneThreadSteps}
    speeds: dict[tuple[str, int], list[float]] = {(k, w): [] for k in kinds for w in (1, 2)}
    for _ in range(args.rounds):
        for kind, workers in speeds:
            dataset = kinds[kind](root, rows, spec.grid, 0, args.loader_steps + 1, cfg)
            speeds[(kind, workers)].append(loader_samples_per_s(dataset, workers, args.loader_steps, args.batch))
    return {kind: {"samples_per_s": {str(w): statistics.median(speeds[(kind, w)]) for w in (1, 2)},
                   "ratio_2_over_1": statistics.median(b / a for a, b in zip(speeds[(kind, 1)], speeds[(kind, 2)]))}
            for kind in kinds}


def data_wait(root: str, cfg: Config, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """`data_s / s_per_step` of a real CPU training run from the cache (`train.loader_workers` = 2)."""
    train.run(cfg, root, out, max_steps=args.train_steps, progress=False, device="cpu")
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][args.skip_steps:]
    data, total = [s["data_s"] for s in steps], [s["s_per_step"] for s in steps]
    return {"data_wait_fraction": sum(data) / sum(total), "median_data_s": statistics.median(data),
            "median_s_per_step": statistics.median(total), "steps_measured": len(steps),
            "loader_workers": cfg.train.loader_workers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256, help="samples of the read caches (64 per shard)")
    parser.add_argument("--shard-samples", type=int, default=64, help="extract.samples_per_shard (VOC preset: 64)")
    parser.add_argument("--distinct", type=int, default=8, help="different synthetic samples, written cyclically")
    parser.add_argument("--codecs", nargs="+", default=["blosc-zstd:1", "none"], help="compressors to time reads of")
    parser.add_argument("--size-samples", type=int, default=4, help="samples per storage option for bytes_per_view")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--batches", type=int, default=16, help="random batches per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--loader-steps", type=int, default=24, help="DataLoader batches per workers_scaling run")
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--skip-steps", type=int, default=2)
    parser.add_argument("--storage", choices=["plain", "preset"], default="plain",
                        help="features/attention as floats with each --codecs compressor, or the VOC preset's 8-bit "
                             "codings (--codecs then sets the other arrays' compressor)")
    parser.add_argument("--url", help="also read a copy of the cache at this fsspec URL (written by the benchmark)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result: dict[str, Any] = {"benchmark": "cache_read", "samples": args.samples, "batch": args.batch,
                              "samples_per_shard": args.shard_samples,
                              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                          "load_average_at_start": os.getloadavg(), "zarr": zarr.__version__}}
    with tempfile.TemporaryDirectory(prefix="weclip-read-bench-") as tmp_name:
        tmp = Path(tmp_name)
        result["bytes_per_view"] = bytes_per_view(args, tmp)
        reads = {}
        for compressor in args.codecs:
            cfg = bench_config(args, compressor)
            root = str(tmp / f"cache-{compressor}")
            spec = build_cache(root, cfg, args.samples, synthetic_samples(vit_spec(cfg, args.samples),
                                                                          args.distinct, args.seed))
            reads[compressor] = read_speeds(root, spec, args)
            if compressor == args.codecs[0]:
                if args.url:
                    try:
                        result["url"] = url_samples_per_s(root, spec, args.url, args)
                    except Exception as e:  # the remote store failed: keep the local figures
                        result["url"] = {"url": args.url, "error": f"{type(e).__name__}: {e}"}
                result["workers_scaling"] = workers_scaling(root, cfg, spec, args)
                result["data_wait"] = data_wait(root, cfg, tmp / "run", args)
            shutil.rmtree(root)
    first = reads[args.codecs[0]]
    result.update({"default_codec": args.codecs[0], "storage": args.storage,
                   "read_mb_per_s": {c: r["read_mb_per_s"] for c, r in reads.items()},
                   "raw_read_mb_per_s": {c: r["raw_read_mb_per_s"] for c, r in reads.items()},
                   "read_ratio": {c: r["read_ratio"] for c, r in reads.items()},
                   "samples_per_s": {c: r["samples_per_s"] for c, r in reads.items()},
                   "data_wait_fraction": result["data_wait"]["data_wait_fraction"],
                   "per_codec": reads, "torch_threads": torch.get_num_threads(),
                   "goal_read_ratio_met": first["read_ratio"] >= 0.6})
    result["machine"]["load_average_at_end"] = os.getloadavg()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
