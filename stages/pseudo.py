"""Stage `pseudo`: pseudo masks for a training manifest, the input of a fully supervised second stage.

Two sources:
* `clip-es` (CLIP-ES, docs/algorithm.md §5): per image, bicubic resize up to a multiple of the patch size and CLIP
  normalisation (`eval.clipes_normalisation`; the shapes preset uses its model's) (§5.1) → Softmax-Grad-CAM of the
  image's classes on the whole image (§4) → CAA: static attention refinement with box masks (§5.2) → bilinear to the
  original size → [bg = (1 − max)^1, CAMs] → DenseCRF with CLIP-ES's parameters (§5.3) → CGL as coded: pixels whose
  posterior max is below `eval.clipes_confidence` (0.95) become 255 (§9 row 24).
* `weclip` (WeCLIP [PW] Tab. 8): a trained checkpoint's multi-scale + flip predictions (§8.1), DenseCRF if
  `eval.crf`; no ignore region.

Masks are VOC-palette PNGs in `<out>/masks/<image_id>.png`. When the manifest has GT masks, the report scores the
pseudo masks (mIoU, 255 pixels of the pseudo mask excluded from the score, as CLIP-ES's seed evaluation ignores
them) and gives the fraction of pixels left at 255. The CRF runs in `pipeline.inference.crf_pool.CrfPool`, so every image
gets its mask or the run fails naming the image.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from tqdm import tqdm

from weclip.pipeline.config import IGNORE_INDEX, Config
from weclip.pipeline.data.manifest import ManifestRow, read_manifest
from weclip.pipeline.errors import ConfigError, EvalError
from weclip.pipeline.files import require_local
from weclip.pipeline.inference.crf_pool import CrfJob, crf_pool, labelled
from weclip.pipeline.inference.predict import BACKGROUND, check_classes, clipes_predictor, load_predictor, read_gt, read_rgb
from weclip.pipeline.inference.report import GRID_NAME, REPORT_JSON, REPORT_MD, markdown_report, percent, score_dict, write_reports
from weclip.pipeline.metrics import ConfusionMatrix
from weclip.pipeline.model.backbone import default_device
from weclip.pipeline.model.text import manifest_class_set
from weclip.pipeline.palette import colorize, save_label_png
from weclip.pipeline.visualize import GRID_COLUMNS, cam_captions, save_sample_grid

Source = Literal["clip-es", "weclip"]
SOURCES: tuple[str, ...] = ("clip-es", "weclip")
MASKS_DIR = "masks"


@dataclass(frozen=True)
class PseudoReport:
    source: str
    manifest: str
    checkpoint: str | None
    images: int  # masks written: always the manifest's row count
    scored_images: int  # images with a GT mask
    ignored_fraction: float  # pixels set to 255 (CGL) over all pixels of all masks
    miou: float | None
    pixel_accuracy: float | None
    pixels: int  # scored pixels: GT not 255 and pseudo label not 255
    iou: dict[str, float | None]
    gt_pixels: dict[str, int]
    confusion: list[list[int]]
    eval: dict[str, Any]
    device: str
    seconds: float
    images_per_s: float
    masks: str
    report_json: str
    report_md: str
    visualization: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        score = (f"mIoU {percent(self.miou)} on {self.scored_images} images with masks" if self.scored_images
                 else "no GT masks to score against")
        return "\n".join([
            f"{self.source} pseudo masks for {self.images} images of {self.manifest} → {self.masks}",
            f"  {score}; {100 * self.ignored_fraction:.2f}% of pixels ignored (255) "
            f"({self.seconds:.1f} s, {self.images_per_s:.2f} images/s on {self.device})",
            f"  report {self.report_md}" + (f", grid {self.visualization}" if self.visualization else "")])


def run(manifest: str | Path, out_dir: str | Path, cfg: Config | None = None, source: Source = "clip-es",
        checkpoint: str | Path | None = None, workers: int | None = None, visualize: int = 0,
        device: str | None = None, model_configs: Sequence[str | Path] = (), progress: bool = True,
        pretrained: str | None = None) -> PseudoReport:
    """Write the pseudo mask of every image of `manifest` into out_dir/masks and score them against GT masks.

    cfg: for `clip-es`, the model, text, refinement and eval settings (required); for `weclip`, defaults to the
    checkpoint's config (only its `eval` section is used). checkpoint: the trained decoder (`weclip` only).
    workers: CRF processes (default cfg.eval.crf_workers). visualize: a grid of the first N images.
    """
    if source not in SOURCES:
        raise ConfigError(f"unknown pseudo-mask source {source!r}; choose one of {SOURCES}")
    started = time.perf_counter()
    out_dir = require_local(out_dir, "output folder")
    dev = default_device(device)
    data = read_manifest(manifest)
    panels: dict[str, dict[str, np.ndarray]] = {}
    if source == "clip-es":
        if cfg is None:
            raise ConfigError("source 'clip-es' needs a config (model, text, refine and eval settings): pass cfg")
        if checkpoint is not None:
            raise ConfigError("source 'clip-es' uses no trained checkpoint; pass checkpoint only with source 'weclip'")
        classes = manifest_class_set(data, cfg.text, EvalError)
        predict_fn = clipes_predictor(cfg, classes, dev, model_configs, visualize, panels)
        names = (BACKGROUND, *data.class_names)
        use_crf = True  # the DenseCRF and its confidence threshold are part of CLIP-ES's masks (§5.3)
    else:
        if checkpoint is None:
            raise ConfigError("source 'weclip' needs the trained checkpoint")
        predictor = load_predictor(checkpoint, dev, model_configs, pretrained)
        check_classes(predictor.checkpoint, data)
        cfg = predictor.checkpoint.config if cfg is None else cfg
        names = predictor.class_names
        use_crf = cfg.eval.crf

        def predict_fn(item: tuple[int, ManifestRow, np.ndarray]) -> np.ndarray | CrfJob:
            return predictor.predict(item[1].image_id, item[2], cfg.eval, use_crf)

    pool = crf_pool(use_crf, cfg.eval, workers)
    items = ((index, row, read_rgb(data, row)) for index, row in enumerate(data.rows))
    cm = ConfusionMatrix(len(names))
    written = scored = ignored = total = 0
    grid_rows: dict[int, tuple[str, dict[str, np.ndarray]]] = {}
    with tqdm(total=len(data), desc=f"pseudo ({source})", unit="img", disable=not progress) as bar:
        for (index, row, rgb), labels in labelled(items, predict_fn, pool):
            save_label_png(out_dir / MASKS_DIR / f"{row.image_id}.png", labels)
            unconfident = labels == IGNORE_INDEX
            ignored, total = ignored + int(unconfident.sum()), total + labels.size
            gt = read_gt(data, row) if row.mask_path is not None else None
            if gt is not None:
                cm.update(labels[~unconfident], gt[~unconfident])
                scored += 1
            if index < visualize:
                # the weclip source's masks are the decoder's predictions
                column = "pseudo label" if source == "clip-es" else "prediction"
                row_panels = {**panels.pop(row.image_id, {"image": rgb}), column: colorize(labels)}
                if gt is not None:
                    row_panels["ground truth"] = colorize(gt)
                grid_rows[index] = (row.image_id, row_panels, cam_captions(row.labels, names))
            written += 1
            bar.update(1)
    if written != len(data):
        raise EvalError(f"wrote {written} pseudo masks but the manifest has {len(data)} images")
    grid = save_sample_grid(out_dir / GRID_NAME, [grid_rows[i] for i in sorted(grid_rows)], GRID_COLUMNS,
                            class_names=names) if grid_rows else None
    seconds = time.perf_counter() - started
    scores = score_dict(cm, names)
    report = PseudoReport(
        source=source, manifest=str(data.path), checkpoint=None if checkpoint is None else str(checkpoint),
        images=written, scored_images=scored, ignored_fraction=ignored / total if total else 0.0,
        miou=scores["miou"], pixel_accuracy=scores["pixel_accuracy"], pixels=scores["pixels"], iou=scores["iou"],
        gt_pixels=scores["gt_pixels"], confusion=scores["confusion"], eval=asdict(cfg.eval), device=str(dev),
        seconds=seconds, images_per_s=written / seconds if seconds > 0 else 0.0, masks=str(out_dir / MASKS_DIR),
        report_json=str(out_dir / REPORT_JSON), report_md=str(out_dir / REPORT_MD),
        visualization=None if grid is None else str(grid))
    lines = [f"source `{source}`" + (f", checkpoint `{checkpoint}`" if checkpoint is not None else ""),
             f"manifest `{data.path}` ({data.dataset}), {written} images, {scored} with GT masks",
             f"{100 * report.ignored_fraction:.2f}% of pixels ignored (255), excluded from the score"]
    write_reports(out_dir, report.to_dict(), markdown_report(f"weclip pseudo ({source})", lines,
                                                             scores if scored else None))
    return report
