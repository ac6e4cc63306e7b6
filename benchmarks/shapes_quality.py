"""Quality of the shipped tiny CLIP on a held-out shapes world; prints JSON (docs/design.md §5).

    .venv/bin/python benchmarks/shapes_quality.py [--count 200] [--seed 2024] [--record RECORD_JSON]

A fresh val set (`count` images, fixed seed, not the training seed) is generated into a temporary folder in the VOC
layout and read back from its files (JPEG images, PNG masks), as a real dataset is. Reported:
- `presence_map`: zero-shot presence, per-class AP of the image–prompt cosine over all images, averaged;
- `miou` (percent, background included, at each image's own size), one entry per method:
  - `all_bg`: every pixel background (the floor);
  - `cam`: raw Softmax-Grad-CAM (docs/algorithm.md §4), labels = keys[argmax [(1 − max CAM)^p, CAMs]] (§5.3), p = the
    preset's `refine.bg_power`;
  - `caa`: CLIP-ES CAA, `refine_cams` with `static_affinity` of the preset's last `refine.static_layers` maps (§5.2);
  - `caa_crf`: CAA, then DenseCRF with CLIP-ES's parameters (`CLIPES_CRF`) on the [bg, CAMs] stack with p = 1 (§5.3),
    on the RGB image, no confidence threshold.
  - `caa_par`: the online pseudo label before RFM — CAA, then PAR (docs/algorithm.md §6.5), labels by argmax, no CRF:
    what the decoder learns from until `refine.rfm_start_iter`, here on the whole val image.
Image-level labels are the classes of each GT mask (docs/algorithm.md §2.1, WeCLIP's rule).

With `--train` the WeCLIP decoder joins the table (the quality study). A train world (`--train-images`, the
demo's seed) is extracted once into an 8-view cache (`max(--views)`), and the decoder is trained with the preset's
steps, then evaluated on the same val images with the preset's inference (msc + flip, no CRF):
  - `weclip`: from the cache, views 0..v-1 with v = the preset's `extract.views`, RFM from `refine.rfm_start_iter`;
  - `weclip_no_rfm`: the same, static CAA for every step (rfm_start_iter past the last step);
  - `weclip_online`: the same as `weclip`, trained online (backbone + Grad-CAM in the loop, fresh view each epoch);
  - `views`: `weclip` with views 1, 2, 4, 8 of the same cache (`train.views`), the same number of steps.
Decoder entries are means over `--train-seeds` (train.seed: decoder init, data order, dropout); `train_runs` lists
each run. Everything is kept in `--workdir`, and a rerun resumes (caches, checkpoints) instead of redoing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from weclip.pipeline.data.augment import normalise  # noqa: E402
from weclip.pipeline.files import atomic_write_text, repo_relative, sha256_file  # noqa: E402
from weclip.pipeline.model.backbone import FrozenCLIP  # noqa: E402
from weclip.pipeline.model.cam import CamBatch, softmax_gradcam  # noqa: E402
from weclip.pipeline.config import CLIPES_CRF, Config, DemoConfig, preset  # noqa: E402
from weclip.pipeline.refinement.crf import crf_labels, dense_crf  # noqa: E402
from weclip.pipeline.data import shapes  # noqa: E402
from weclip.pipeline.data.images import load_mask, load_rgb  # noqa: E402
from weclip.pipeline.metrics import ConfusionMatrix, multi_hot, presence_map  # noqa: E402
from weclip.pipeline.refinement.par import PAR  # noqa: E402
from weclip.pipeline.refinement.pseudo_label import online_pseudo_label  # noqa: E402
from weclip.pipeline.refinement.refine import cam_scores, cams_to_labels, refine_cams, static_affinity, upsample_cams  # noqa: E402
from weclip.pipeline.model.text import class_set, text_embeddings  # noqa: E402
from weclip.stages import evaluate as evaluate_stage, extract, train  # noqa: E402
from weclip.stages.demo import shapes_dataset  # noqa: E402


@dataclass
class Batch:
    """Images of one size with their GT and CAMs: rgb B×H×W×3 uint8, images the normalised B×3×H×W network input,
    masks B×H×W, labels (ascending ids)."""
    rgb: np.ndarray
    images: torch.Tensor
    masks: np.ndarray
    labels: list[list[int]]
    cams: CamBatch


def _all_bg(batch: Batch, cfg: Config) -> np.ndarray:
    return np.zeros_like(batch.masks)


def _raw_cam(batch: Batch, cfg: Config) -> np.ndarray:
    hi = upsample_cams(batch.cams.cams, batch.masks.shape[1:])
    return cams_to_labels(hi, batch.cams.cam_classes, cfg.refine.bg_power).numpy()


def _caa_hi(batch: Batch, cfg: Config) -> torch.Tensor:
    affinity = static_affinity(batch.cams.attn, cfg.refine.static_layers)
    refined = refine_cams(batch.cams.cams, batch.cams.cam_classes, affinity, cfg.refine)
    return upsample_cams(refined, batch.masks.shape[1:])


def _caa(batch: Batch, cfg: Config) -> np.ndarray:
    return cams_to_labels(_caa_hi(batch, cfg), batch.cams.cam_classes, cfg.refine.bg_power).numpy()


def _caa_crf(batch: Batch, cfg: Config) -> np.ndarray:
    scores, keys = cam_scores(_caa_hi(batch, cfg), batch.cams.cam_classes, bg_power=1.0)  # CLIP-ES CRF: p = 1
    return np.stack([crf_labels(dense_crf(image, s.numpy(), CLIPES_CRF), k.numpy())
                     for image, s, k in zip(batch.rgb, scores, keys)])


def _caa_par(batch: Batch, cfg: Config) -> np.ndarray:
    return online_pseudo_label(batch.cams.cams, batch.cams.cam_classes, batch.cams.attn, None, batch.images,
                               use_rfm=False, refine=cfg.refine, par=PAR(cfg.par)).numpy()


METHODS: dict[str, Callable[[Batch, Config], np.ndarray]] = {
    "all_bg": _all_bg, "cam": _raw_cam, "caa": _caa, "caa_par": _caa_par, "caa_crf": _caa_crf,
}


def evaluate(cfg: Config, root: Path, ids: list[str], batch_size: int) -> dict:
    """Presence mAP and per-method mIoU of the configured backbone on the images `ids` under `root`."""
    names = class_set(cfg.text.classes)
    backbone = FrozenCLIP.load(cfg.model.name, cfg.model.pretrained, precision=cfg.model.precision)
    text = text_embeddings(backbone, names, cfg.text.template)
    matrices = {name: ConfusionMatrix(names.num_classes + 1) for name in METHODS}
    scores, truth = [], []
    seconds = dict.fromkeys(METHODS, 0.0)
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        rgb = np.stack([load_rgb(root / "JPEGImages" / f"{i}.jpg") for i in chunk])
        masks = np.stack([load_mask(root / "SegmentationClass" / f"{i}.png") for i in chunk])
        labels = [[int(v) - 1 for v in np.unique(m) if v not in (0, 255)] for m in masks]
        images = normalise(torch.from_numpy(rgb).permute(0, 3, 1, 2), cfg.model.normalisation)
        scores.append((backbone.encode_image(images) @ text.fg.T).numpy())
        truth.append(multi_hot(labels, names.num_classes))
        cams = softmax_gradcam(backbone, images, labels, text, feature_layers=(),
                               attn_layers=tuple(range(1, backbone.num_blocks + 1)))
        batch = Batch(rgb, images, masks, labels, cams)
        for name, method in METHODS.items():
            tic = time.perf_counter()
            matrices[name].update(method(batch, cfg), masks)
            seconds[name] += time.perf_counter() - tic
    return {
        "presence_map": presence_map(np.concatenate(scores), np.concatenate(truth)),
        "miou": {name: 100 * m.miou() for name, m in matrices.items()},
        "iou": {name: dict(zip(("background",) + names.classes, (100 * m.iou()).round(2).tolist()))
                for name, m in matrices.items()},
        "method_seconds": {name: round(s, 2) for name, s in seconds.items()},
    }


# ---------------------------------------------------------------------------------------------------------------
# The decoder study (--train).

@dataclass(frozen=True)
class TrainRun:
    name: str  # views_<v>, weclip_no_rfm or weclip_online
    seed: int
    cfg: Config
    online: bool = False


def study_runs(cfg: Config, views: list[int], seeds: list[int], online: bool) -> list[TrainRun]:
    """Every decoder the study trains; `weclip` is the views run at the preset's extract.views."""
    default = cfg.extract.views
    runs = []
    for seed in seeds:
        cached = cfg.replace(extract={"views": max(views)}, train={"seed": seed})
        runs += [TrainRun(f"views_{v}", seed, cached.replace(train={"views": v})) for v in views]
        runs.append(TrainRun("weclip_no_rfm", seed, cached.replace(train={"views": default},
                                                                   refine={"rfm_start_iter": cfg.train.iterations})))
        if online:
            runs.append(TrainRun("weclip_online", seed, cfg.replace(train={"seed": seed}), online=True))
    return runs


def train_and_score(run: TrainRun, cache: Path, train_manifest: Path, val_manifest: Path, workdir: Path,
                    progress: bool) -> dict:
    """Train one decoder (resuming what a previous call left) and score it on the val manifest."""
    out = workdir / "runs" / f"{run.name}-seed{run.seed}"
    summary = train.run(run.cfg, cache, out, resume=(out / train.CHECKPOINT_NAME).exists(),
                        online_manifest=train_manifest if run.online else None, progress=progress)
    saved = out / "eval" / evaluate_stage.REPORT_JSON  # a rerun reuses the score of the same checkpoint step
    report = json.loads(saved.read_text()) if saved.exists() else {}
    if report.get("step") != summary.final_step or Path(report.get("manifest", "")) != val_manifest:
        report = evaluate_stage.run(summary.checkpoint, val_manifest, out / "eval", crf=False,
                                    progress=progress).to_dict()
    steps = [json.loads(line) for line in Path(summary.metrics).read_text().splitlines()]
    return {"name": run.name, "seed": run.seed, "miou": round(100 * report["miou"], 2), "steps": summary.final_step,
            "s_per_step": round(float(np.mean([m["s_per_step"] for m in steps])), 3),
            "last_loss": round(steps[-1]["loss"], 4), "eval_images_per_s": round(report["images_per_s"], 2)}


def train_study(cfg: Config, workdir: Path, val_manifest: Path, views: list[int], seeds: list[int],
                train_images: int, online: bool, progress: bool) -> dict:
    """Extract the train world's cache once, train every run of `study_runs`, and average each over the seeds."""
    demo = DemoConfig()
    train_manifest = shapes_dataset(workdir / f"train-s{demo.seed}-n{train_images}" / "data", "train", train_images,
                                    demo.seed, cfg.aug.crop)
    cache = workdir / f"cache-{max(views)}v"
    extract.run(cfg.replace(extract={"views": max(views)}), train_manifest, cache, executor="inline",
                progress=progress)
    results = [train_and_score(run, cache, train_manifest, val_manifest, workdir, progress)
               for run in study_runs(cfg, views, seeds, online)]
    mean = {name: round(float(np.mean([r["miou"] for r in results if r["name"] == name])), 2)
            for name in dict.fromkeys(r["name"] for r in results)}
    decoders = {"weclip": mean[f"views_{cfg.extract.views}"], "weclip_no_rfm": mean["weclip_no_rfm"]}
    if online:
        decoders["weclip_online"] = mean["weclip_online"]
    return {"decoders": decoders, "views": {v: mean[f"views_{v}"] for v in views},
            "train_images": train_images, "iterations": cfg.train.iterations, "seeds": seeds, "train_runs": results}


def main() -> None:
    cfg = preset("shapes")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=2024, help="val world seed (the tiny CLIP trains on seed 0)")
    parser.add_argument("--size", type=int, default=cfg.aug.crop)
    parser.add_argument("--checkpoint", default=cfg.model.pretrained, help="default: the shipped tiny CLIP")
    parser.add_argument("--static-layers", type=int, default=cfg.refine.static_layers)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--workdir", type=Path, default=Path("runs/shapes_quality"),
                        help="worlds, caches and training runs; a rerun reuses them")
    parser.add_argument("--train", action="store_true", help="also train and score the WeCLIP decoder (slow)")
    parser.add_argument("--views", type=int, nargs="+", default=[1, 2, 4, 8], help="views per image to compare")
    parser.add_argument("--train-images", type=int, default=DemoConfig().train_images)
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[cfg.train.seed])
    parser.add_argument("--no-online", action="store_true", help="skip the online-training run")
    parser.add_argument("--record", type=Path, help="also store the result under 'quality' in this JSON file")
    args = parser.parse_args()
    cfg = cfg.replace(model={"pretrained": args.checkpoint}, refine={"static_layers": args.static_layers})
    if args.train and cfg.extract.views not in args.views:
        parser.error(f"--views must include the preset's extract.views ({cfg.extract.views}): it is `weclip`")
    torch.set_num_threads(2)
    tic = time.time()
    val_root = args.workdir / f"val-s{args.seed}-n{args.count}" / "data"
    val_manifest = shapes_dataset(val_root, "val", args.count, args.seed, args.size)
    ids = (val_root / "ImageSets/Segmentation/val.txt").read_text().split()
    result = evaluate(cfg, val_root, ids, args.batch_size)
    if args.train:
        study = train_study(cfg, args.workdir, val_manifest, args.views, args.train_seeds, args.train_images,
                            not args.no_online, progress=sys.stderr.isatty())
        result["miou"].update(study.pop("decoders"))
        result["train_study"] = study
    result = {"images": args.count, "seed": args.seed, "size": args.size, "model": cfg.model.name,
              "checkpoint": repo_relative(cfg.model.pretrained), "sha256": sha256_file(Path(cfg.model.pretrained)),
              "static_layers": cfg.refine.static_layers,
              "bg_power": cfg.refine.bg_power, **result, "seconds": round(time.time() - tic, 1)}
    print(json.dumps(result, indent=2))
    if args.record:
        record = json.loads(args.record.read_text())
        if record.get("sha256") != result["sha256"]:
            raise SystemExit(f"{args.record} describes another checkpoint (sha256 {record.get('sha256')}); "
                             f"record only the figures of the checkpoint it describes")
        record["quality"] = result
        atomic_write_text(args.record, json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
