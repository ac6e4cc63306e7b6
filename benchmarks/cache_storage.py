"""Feature-cache storage benchmark: bytes, coding error and training quality of each storage and compressor.

    .venv/bin/python benchmarks/cache_storage.py [--samples 8] [--shapes] > benchmarks/results/cache_storage.json

Part `vit_b16` (always): the real outputs of an open_clip ViT-B/16 with random weights (no pretrained weights can be
downloaded here) on augmented views of 1/f-noise images (the power spectrum of photographs): patch tokens of blocks
1..11, head-averaged patch-to-patch attention of blocks 1..12, smooth random CAMs. For every array × storage ×
compressor it writes the cache's own zarr layout (`ArraySchema.zarr_kwargs`: chunk = sample, shard = all samples)
and reports bytes per sample (`ratio` = raw float16 or raw codes / stored), write / read MB/s (raw MB per second;
reads come from the page cache, so they measure decoding) and, for the 8-bit storages, the coding error against the
float16 values (relative RMS = ‖x̂ − x‖ / ‖x‖, max |x̂ − x| / max |x|). `outlier_stress` repeats the feature error
with 4 of 768 channels scaled ×50 (the "massive activations" of trained CLIP ViTs, which random weights lack): int8's
per-token step follows the largest value, fp8's relative error does not. `agreement` compares, per storage against
float16 and for one random-init decoder, the RFM layer-selection masks (VOC's last 6 maps) and the online pseudo
labels (CAA before RFM, RFM after; PAR; every pixel), with the float16 cache against float32 as the calibration of
how much any rounding moves them on these near-uniform random-weight attention maps. `bytes_per_view` adds up the VOC preset (features of blocks
1..11, attention of blocks 5..12), its compact variants (features of blocks 5..11 / 8..11) and the COCO preset
(attention of blocks 3..12), every array measured on these data with its compressor.

Part `shapes` (`--shapes`, slow): the shipped tiny CLIP on the shapes world. The demo's train world is extracted once
per storage (`weclip extract`, shapes preset), the decoder trained from each cache (`train.seed` 1, 2, 3, the preset's
300 steps) and scored on held-out images like benchmarks/shapes_quality.py; the coding error of each array, and the
RFM-mask and online pseudo-label agreement of the float16 run's final decoder (the same decoder and step for every
cache; with an empty `--train-seeds`, no training and a random-init decoder) over the train samples. Everything is kept in `--workdir`, and a rerun resumes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
import zarr
from zarr.storage import LocalStore

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from weclip.pipeline.cache.schema import ArraySchema, CacheSpec  # noqa: E402
from weclip.pipeline.cache.store import CacheReader  # noqa: E402
from weclip.pipeline.config import Config, DemoConfig, preset  # noqa: E402
from weclip.pipeline.data.augment import normalise  # noqa: E402
from weclip.pipeline.model.decoder import WeCLIPDecoder  # noqa: E402
from weclip.pipeline.refinement.par import PAR  # noqa: E402
from weclip.pipeline.refinement.pseudo_label import online_pseudo_label  # noqa: E402
from weclip.pipeline.refinement.refine import rfm_layer_mask  # noqa: E402
from weclip.pipeline.training.checkpoint import build_decoder_from_checkpoint, load_checkpoint  # noqa: E402

# (features storage, attention storage) pairs compared end to end; the first is the float16 reference
PAIRS = (("plain", "plain"), ("int8", "uint8"), ("fp8", "log8"))
CODECS = ("none", "zstd:1", "zstd:3", "blosc-zstd:1", "blosc-lz4")
STORAGES = {"features": ("plain", "int8", "fp8"), "attn": ("plain", "uint8", "log8"), "cams": ("plain",),
            "cam_classes": ("plain",), "image": ("plain",), "valid": ("plain",)}
VOC_ATTN, COCO_ATTN = range(5, 13), range(3, 13)  # 1-based blocks of the presets' stored attention maps
LAYER_SETS = {"1-11": range(1, 12), "5-11": range(5, 12), "8-11": range(8, 12)}


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
    x = visual._embeds(normalise(torch.from_numpy(images), "imagenet"))
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


def vit_b16_data(args: argparse.Namespace) -> tuple[CacheSpec, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Float16 arrays of `args.samples` views (features of blocks 1..11, attention of blocks 1..12), and the
    float32 features and attention they were rounded from."""
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    model = open_clip.create_model(args.model, pretrained=None, force_image_size=args.crop).eval()
    views = [augmented_view(rng, pink_noise_image(rng, 375, 500), args.crop) for _ in range(args.samples)]
    images = np.stack([v[0] for v in views])
    features, attn = vit_outputs(model, images)
    grid = args.crop // 16
    cams = smooth_cams(rng, args.samples, args.k_max, grid)
    cam_classes = np.where(cams.max(axis=(2, 3)) > 0, np.arange(args.k_max) + 3, -1).astype(np.int16)
    spec = CacheSpec(total_samples=args.samples, samples_per_shard=args.samples, feature_layers=features.shape[1],
                     attn_layers=attn.shape[1], grid=(grid, grid), dim=features.shape[-1], k_max=args.k_max,
                     crop=args.crop, dtype="float16", compressor="none")
    arrays = {"features": features.astype(np.float16), "attn": attn.astype(np.float16),
              "cams": cams.astype(np.float16), "cam_classes": cam_classes, "image": images,
              "valid": np.stack([v[1] for v in views])}
    return spec, arrays, {"features": features, "attn": attn}


def coding_error(values: np.ndarray, decoded: np.ndarray) -> dict[str, float]:
    x, y = values.astype(np.float64), decoded.astype(np.float64)
    return {"rel_rms": float(np.linalg.norm(y - x) / np.linalg.norm(x)),
            "max_abs_over_max": float(np.abs(y - x).max() / np.abs(x).max())}


def schema_of(spec: CacheSpec, name: str, values: np.ndarray, storage: str, codec: str) -> ArraySchema:
    """The spec's schema of `name` for the given values' shape (a layer subset), storage and compressor."""
    return dataclasses.replace(spec.arrays()[name], shape=values.shape[1:], storage=storage, compressor=codec)


def measure(spec: CacheSpec, schema: ArraySchema, values: np.ndarray, repeats: int) -> dict:
    """Bytes per sample and MB/s of one array through the cache's zarr layout; coding error when quantised."""
    stored = schema.to_storage(values)
    write_s = read_s = math.inf
    for _ in range(repeats):
        tmp = tempfile.mkdtemp(prefix="weclip-storage-")
        try:
            array = zarr.create_group(LocalStore(tmp)).create_array(**schema.zarr_kwargs(spec))
            t0 = time.perf_counter()
            array[:] = schema.to_storage(values)
            write_s = min(write_s, time.perf_counter() - t0)
            t0 = time.perf_counter()
            back = schema.from_storage(array[:])
            read_s = min(read_s, time.perf_counter() - t0)
            on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(tmp, schema.name))
                          for f in fs if f != "zarr.json")
        finally:
            shutil.rmtree(tmp)
    n = len(values)
    row = {"array": schema.name, "storage": schema.storage, "codec": schema.compressor,
           "layers": values.shape[1] if values.ndim == 4 else None, "bytes_per_sample": on_disk / n,
           "raw_bytes_per_sample": stored.nbytes / n, "ratio": stored.nbytes / max(on_disk, 1),
           "write_MBps": values.nbytes / write_s / 1e6, "read_MBps": values.nbytes / read_s / 1e6}
    if schema.quantised:
        row["error"] = coding_error(values, back)
    return row


def outlier_stress(features: np.ndarray) -> dict[str, dict[str, float]]:
    """Coding error of the features with 4 of D channels ×50 (massive activations)."""
    heavy = features.astype(np.float32)
    heavy[..., :4] *= 50
    schema = ArraySchema("features", heavy.shape[1:], "float16", 0, "none")
    return {s: coding_error(heavy, dataclasses.replace(schema, storage=s).from_storage(
        dataclasses.replace(schema, storage=s).to_storage(heavy))) for s in ("int8", "fp8")}


def crest_factor(features: np.ndarray) -> dict[str, float]:
    """Peak-to-RMS ratio of each token's D-vector: int8's relative error grows with it, fp8's does not."""
    x = features.astype(np.float32)
    ratio = np.abs(x).max(-1) / np.sqrt((x ** 2).mean(-1))
    return {"median": float(np.median(ratio)), "max": float(ratio.max())}


def decoded(spec: CacheSpec, arrays: dict[str, np.ndarray], features_storage: str, attn_storage: str) -> dict:
    """The arrays as a cache of these storages returns them (float32 tensors)."""
    out = {}
    for name, storage in (("features", features_storage), ("attn", attn_storage)):
        schema = schema_of(spec, name, arrays[name], storage, "none")
        out[name] = torch.from_numpy(np.asarray(schema.from_storage(schema.to_storage(arrays[name])),
                                                dtype=np.float32))
    return out


@torch.no_grad()
def agreement(cfg: Config, decoder: WeCLIPDecoder, batches: list[dict[str, torch.Tensor]],
              quantised: list[dict[str, torch.Tensor]], grid: tuple[int, int]) -> dict[str, float]:
    """RFM mask and online pseudo-label agreement of `quantised` inputs against `batches` (float16), same decoder:
    fractions of (sample, layer) mask entries and of pixels that are equal, with RFM on and off."""
    par = PAR(cfg.par)
    equal = {"rfm_mask": [0, 0], "pseudo_label_rfm": [0, 0], "pseudo_label_caa": [0, 0]}
    for ref, q in zip(batches, quantised):
        a_ref = decoder(ref["features"], grid).affinity
        a_q = decoder(q["features"], grid).affinity
        masks = [rfm_layer_mask(attn, a, cfg.refine.rfm_layers, cfg.refine.rfm_filter)
                 for attn, a in ((ref["attn"], a_ref), (q["attn"], a_q))]
        equal["rfm_mask"][0] += int((masks[0] == masks[1]).sum())
        equal["rfm_mask"][1] += masks[0].numel()
        for key, rfm in (("pseudo_label_rfm", True), ("pseudo_label_caa", False)):
            labels = [online_pseudo_label(ref["cams"], ref["cam_classes"], attn, a, ref["image"], use_rfm=rfm,
                                          refine=cfg.refine, par=par)
                      for attn, a in ((ref["attn"], a_ref), (q["attn"], a_q))]
            equal[key][0] += int((labels[0] == labels[1]).sum())
            equal[key][1] += labels[0].numel()
    return {k: same / total for k, (same, total) in equal.items()}


def vit_b16_part(args: argparse.Namespace) -> dict:
    spec, arrays, exact = vit_b16_data(args)
    voc = {**arrays, "attn": arrays["attn"][:, VOC_ATTN.start - 1:]}
    coco_attn = arrays["attn"][:, COCO_ATTN.start - 1:]
    rows = []
    for name, storages in STORAGES.items():
        for storage in storages:
            for codec in args.codecs:
                rows.append(measure(spec, schema_of(spec, name, voc[name], storage, codec), voc[name], args.repeats))
    extra = []  # the compact feature sets and COCO's attention, with each storage's best codec of the table
    best = {(r["array"], r["storage"]): min((x for x in rows if (x["array"], x["storage"]) == (r["array"],
            r["storage"])), key=lambda x: x["bytes_per_sample"])["codec"] for r in rows}
    for label, blocks in LAYER_SETS.items():
        subset = arrays["features"][:, blocks.start - 1:blocks.stop - 1]
        if label != "1-11":
            extra += [measure(spec, schema_of(spec, "features", subset, s, best["features", s]), subset, 1)
                      for s in STORAGES["features"]]
    extra += [measure(spec, schema_of(spec, "attn", coco_attn, s, best["attn", s]), coco_attn, 1)
              for s in STORAGES["attn"]]
    cfg = preset("voc")
    torch.manual_seed(0)
    decoder = WeCLIPDecoder(len(LAYER_SETS["1-11"]), spec.dim, 20, cfg.decoder).eval()
    batches = [{"features": torch.from_numpy(voc["features"][i:i + 4].astype(np.float32)),
                "attn": torch.from_numpy(voc["attn"][i:i + 4].astype(np.float32)),
                "cams": torch.from_numpy(voc["cams"][i:i + 4].astype(np.float32)),
                "cam_classes": torch.from_numpy(voc["cam_classes"][i:i + 4]).long(),
                "image": normalise(torch.from_numpy(voc["image"][i:i + 4]), "imagenet")}
               for i in range(0, args.samples, 4)]
    # calibration: the float16 cache itself against the float32 values it rounds
    unrounded = [{**b, "features": torch.from_numpy(exact["features"][i:i + 4]),
                  "attn": torch.from_numpy(exact["attn"][i:i + 4, VOC_ATTN.start - 1:])}
                 for b, i in zip(batches, range(0, args.samples, 4))]
    agree = {"float16 vs float32": agreement(cfg, decoder, unrounded, batches, spec.grid)}
    for features_storage, attn_storage in PAIRS[1:]:
        quantised = [{**b, **decoded(spec, {"features": b["features"].numpy(), "attn": b["attn"].numpy()},
                                     features_storage, attn_storage)} for b in batches]
        agree[f"{features_storage}+{attn_storage}"] = agreement(cfg, decoder, batches, quantised, spec.grid)
    return {"model": args.model, "weights": "random", "crop": args.crop, "samples": args.samples, "dtype": "float16",
            "crest_factor": crest_factor(arrays["features"]), "outlier_stress": outlier_stress(arrays["features"]),
            "per_array": rows, "variants": extra, "agreement": agree,
            "bytes_per_view": bytes_per_view(rows + extra, spec)}


def bytes_per_view(rows: list[dict], spec: CacheSpec) -> dict[str, dict[str, float]]:
    """MB per view of the VOC preset, its compact variants and COCO per (features, attn) storage pair, each array
    with the smallest codec measured (the arrays other than features and attn: blosc-zstd:1)."""
    def size(array: str, storage: str, layers: int | None = None) -> tuple[float, str]:
        mine = [r for r in rows if r["array"] == array and r["storage"] == storage
                and (layers is None or r["layers"] == layers)]
        r = min(mine, key=lambda x: x["bytes_per_sample"])
        return r["bytes_per_sample"], r["codec"]
    rest = sum(next(r["bytes_per_sample"] for r in rows if r["array"] == a and r["codec"] == "blosc-zstd:1")
               for a in ("cams", "cam_classes", "image", "valid"))
    out = {}
    for fs, ats in PAIRS + (("fp8", "uint8"), ("int8", "log8")):
        attn, attn_codec = size("attn", ats, len(VOC_ATTN))
        coco_attn, _ = size("attn", ats, len(COCO_ATTN))
        entry = {"attn_codec": attn_codec}
        for label, blocks in LAYER_SETS.items():
            feats, codec = size("features", fs, len(blocks))
            entry[f"voc_features_{label}_MB"] = round((feats + attn + rest) / 1e6, 3)
            entry[f"features_{label}_codec"] = codec
        feats, _ = size("features", fs, len(LAYER_SETS["1-11"]))
        entry["coco_MB"] = round((feats + coco_attn + rest) / 1e6, 3)
        entry["coco_TB_4_views"] = round((feats + coco_attn + rest) * 82081 * 4 / 1e12, 3)
        out[f"{fs}+{ats}"] = entry
    return out


# ---------------------------------------------------------------------------------------------------------------
# The shapes world (--shapes): extract per storage, train 3 seeds, agreement of the float16 run's decoder.

def shapes_part(args: argparse.Namespace) -> dict:
    import shapes_quality as sq  # noqa: E402  (benchmarks/ is on sys.path when this script runs)
    from weclip.stages import extract
    from weclip.stages.demo import shapes_dataset
    cfg, demo = preset("shapes"), DemoConfig()
    train_manifest = shapes_dataset(args.workdir / f"train-s{demo.seed}-n{args.train_images}" / "data", "train",
                                    args.train_images, demo.seed, cfg.aug.crop)
    val_manifest = shapes_dataset(args.workdir / f"val-s{args.val_seed}-n{args.val_images}" / "data", "val",
                                  args.val_images, args.val_seed, cfg.aug.crop)
    caches, configs, runs = {}, {}, []
    for fs, ats in PAIRS:
        pair = f"{fs}+{ats}"
        configs[pair] = cfg.replace(extract={"features_storage": fs, "attn_storage": ats})
        caches[pair] = args.workdir / f"cache-{pair}"
        extract.run(configs[pair], train_manifest, caches[pair], executor="inline", progress=False)
    for seed in args.train_seeds:  # seed-major: an interrupted study has every trained pair at the same seeds
        for pair in args.train_pairs:
            run = sq.TrainRun(pair, seed, configs[pair].replace(train={"seed": seed}))
            runs.append(sq.train_and_score(run, caches[pair], train_manifest, val_manifest, args.workdir, False))
            print(json.dumps(runs[-1]), file=sys.stderr)
    readers = {pair: CacheReader(str(path)) for pair, path in caches.items()}
    ref_pair = f"{PAIRS[0][0]}+{PAIRS[0][1]}"
    rows = readers[ref_pair].index.column("row").to_numpy()[:args.agreement_samples]
    spec = readers[ref_pair].spec
    if args.train_seeds:  # the float16 run's final decoder, past RFM's start
        decoder = build_decoder_from_checkpoint(load_checkpoint(
            args.workdir / "runs" / f"{ref_pair}-seed{args.train_seeds[0]}" / "checkpoint.pt"))
    else:  # no training: a random-init decoder, as in the ViT-B/16 part
        torch.manual_seed(0)
        classes = len(readers[ref_pair].provenance["class_set"]["classes"])
        decoder = WeCLIPDecoder(spec.feature_layers, spec.dim, classes, cfg.decoder).eval()
    grid = spec.grid

    def batches(reader: CacheReader) -> list[dict[str, torch.Tensor]]:
        out = []
        for i in range(0, len(rows), 4):
            got = reader.read(rows[i:i + 4])
            out.append({"features": torch.from_numpy(got["features"].astype(np.float32)),
                        "attn": torch.from_numpy(got["attn"].astype(np.float32)),
                        "cams": torch.from_numpy(got["cams"].astype(np.float32)),
                        "cam_classes": torch.from_numpy(got["cam_classes"]).long(),
                        "image": normalise(torch.from_numpy(got["image"]), cfg.model.normalisation)})
        return out
    ref = batches(readers[ref_pair])
    errors, agree, sizes = {}, {}, {}
    for pair, reader in readers.items():
        shards = reader.tables.shards.to_pylist()
        sizes[pair] = {a: sum(s[f"bytes_{a}"] for s in shards) / reader.index.num_rows for a in reader.schemas}
        if pair == ref_pair:
            continue
        got = batches(reader)
        errors[pair] = {a: coding_error(torch.cat([b[a] for b in ref]).numpy(), torch.cat([b[a] for b in got]).numpy())
                        for a in ("features", "attn")}
        agree[pair] = agreement(cfg, decoder, ref, got, grid)
    miou = {pair: [r["miou"] for r in runs if r["name"] == pair] for pair in args.train_pairs}
    return {"train_images": args.train_images, "val_images": args.val_images, "val_seed": args.val_seed,
            "iterations": cfg.train.iterations, "seeds": args.train_seeds, "agreement_samples": len(rows),
            "miou": {p: {"mean": round(float(np.mean(v)), 2), "per_seed": v, "spread": round(max(v) - min(v), 2)}
                     for p, v in miou.items() if v},
            "agreement_decoder": "float16 run, final step" if args.train_seeds else "random init (seed 0)",
            "coding_error": errors, "agreement": agree, "bytes_per_sample": sizes, "train_runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8, help="ViT-B/16 views (a multiple of 4)")
    parser.add_argument("--model", default="ViT-B-16-quickgelu")
    parser.add_argument("--crop", type=int, default=320)
    parser.add_argument("--k-max", type=int, default=4)
    parser.add_argument("--codecs", nargs="+", default=list(CODECS))
    parser.add_argument("--repeats", type=int, default=2, help="best of this many writes/reads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shapes", action="store_true", help="also the tiny-CLIP shapes study (slow)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/cache_storage"))
    parser.add_argument("--train-images", type=int, default=DemoConfig().train_images)
    parser.add_argument("--val-images", type=int, default=100)
    parser.add_argument("--val-seed", type=int, default=2024)
    parser.add_argument("--train-seeds", type=int, nargs="*", default=[1, 2, 3],
                        help="none: no decoder training (coding error, agreement and bytes only)")
    parser.add_argument("--train-pairs", nargs="+", default=[f"{f}+{a}" for f, a in PAIRS],
                        choices=[f"{f}+{a}" for f, a in PAIRS], help="storages the decoder is trained from")
    parser.add_argument("--agreement-samples", type=int, default=64)
    parser.add_argument("--no-vit", action="store_true", help="only the shapes part (with --shapes)")
    args = parser.parse_args()
    if f"{PAIRS[0][0]}+{PAIRS[0][1]}" not in args.train_pairs:
        parser.error("--train-pairs must include plain+plain: its decoder is the agreement's reference")
    torch.set_num_threads(os.cpu_count() or 1)
    tic = time.time()
    result = {"benchmark": "cache_storage",
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "zarr": zarr.__version__}}
    if not args.no_vit:
        result["vit_b16"] = vit_b16_part(args)
    if args.shapes:
        result["shapes"] = shapes_part(args)
    result["seconds"] = round(time.time() - tic, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
