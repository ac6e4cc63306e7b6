"""Stage `evaluate`: a trained decoder with the frozen backbone online, multi-scale + flip, optional DenseCRF, mIoU.

For every manifest image (docs/algorithm.md §8.1): the image normalised with the checkpoint's statistics → msc + flip
logits (long side 512, scales 1.0 / 0.75, h-flip) → argmax, or with `crf` softmax → DenseCRF with WeCLIP's
parameters on the RGB image (§8.1 step 6), in the counted process pool of `pipeline.inference.crf_pool` → confusion
matrix against the GT mask (255 ignored, mean over classes with GT pixels, §5.3) → `report.json` + `report.md`;
optional VOC-palette prediction PNGs and a visualisation grid. A report always counts every image of the manifest.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from weclip.pipeline.config import EvalConfig
from weclip.pipeline.data.manifest import ManifestRow, read_manifest
from weclip.pipeline.errors import EvalError
from weclip.pipeline.files import require_local
from weclip.pipeline.inference.crf_pool import CrfJob, crf_pool, labelled
from weclip.pipeline.inference.predict import cam_panels_of, check_classes, load_predictor, read_gt, read_rgb
from weclip.pipeline.inference.report import GRID_NAME, REPORT_JSON, REPORT_MD, markdown_report, percent, score_dict, write_reports
from weclip.pipeline.metrics import ConfusionMatrix
from weclip.pipeline.model.backbone import default_device
from weclip.pipeline.palette import colorize, save_label_png
from weclip.pipeline.visualize import GRID_COLUMNS, cam_captions, save_sample_grid

PREDICTIONS_DIR = "predictions"


@dataclass(frozen=True)
class EvalReport:
    checkpoint: str
    step: int
    manifest: str
    dataset: str
    images: int  # always the manifest's row count
    crf: bool
    eval: dict[str, Any]  # the EvalConfig used
    miou: float | None
    pixel_accuracy: float | None
    pixels: int
    iou: dict[str, float | None]
    gt_pixels: dict[str, int]
    confusion: list[list[int]]
    device: str
    seconds: float
    images_per_s: float
    report_json: str
    report_md: str
    predictions: str | None
    visualization: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        return "\n".join([
            f"evaluated {self.images} images of {self.manifest} with {self.checkpoint} (step {self.step}), "
            f"CRF {'on' if self.crf else 'off'}, on {self.device}",
            f"  mIoU {percent(self.miou)}  pixel accuracy {percent(self.pixel_accuracy)}  "
            f"({self.seconds:.1f} s, {self.images_per_s:.2f} images/s)",
            f"  report {self.report_md}"
            + (f", predictions {self.predictions}" if self.predictions else "")
            + (f", grid {self.visualization}" if self.visualization else "")])


def run(checkpoint: str | Path, manifest: str | Path, out_dir: str | Path, cfg: EvalConfig | None = None,
        crf: bool | None = None, save_predictions: bool = False, visualize: int = 0, workers: int | None = None,
        device: str | None = None, model_configs: Sequence[str | Path] = (), progress: bool = True,
        pretrained: str | None = None) -> EvalReport:
    """Evaluate a checkpoint on every image of a manifest with masks.

    cfg: inference settings (default: the checkpoint's `eval` section); crf: DenseCRF on/off (default cfg.crf);
    save_predictions: VOC-palette PNGs in out_dir/predictions; visualize: a grid of the first N images (image,
    CAM, refined CAM, pseudo label, prediction, GT) in out_dir/visualize.png; workers: CRF processes (default
    cfg.crf_workers); model_configs: extra open_clip configs to register (e.g. a test's tiny ViT).
    """
    started = time.perf_counter()
    out_dir = require_local(out_dir, "output folder")
    dev = default_device(device)
    predictor = load_predictor(checkpoint, dev, model_configs, pretrained)
    ckpt = predictor.checkpoint
    cfg = ckpt.config.eval if cfg is None else cfg
    crf = cfg.crf if crf is None else crf
    data = read_manifest(manifest)
    check_classes(ckpt, data)
    unlabelled = [r.image_id for r in data.rows if r.mask_path is None]
    if unlabelled:
        raise EvalError(f"manifest {data.path} has {len(unlabelled)} images without a mask (e.g. {unlabelled[:3]}); "
                        "evaluation needs ground truth — use `weclip infer` for unlabelled images")
    names = predictor.class_names
    cm = ConfusionMatrix(len(names))
    pred_dir = out_dir / PREDICTIONS_DIR if save_predictions else None
    grid_rows: dict[int, tuple[str, dict[str, np.ndarray], dict[str, str]]] = {}
    rows = list(enumerate(data.rows))

    def predict(item: tuple[int, ManifestRow]) -> np.ndarray | CrfJob:
        index, row = item
        rgb = read_rgb(data, row)
        if index < visualize:
            grid_rows[index] = (row.image_id, cam_panels_of(predictor, rgb, row.labels, cfg),
                                cam_captions(row.labels, names))
        return predictor.predict(row.image_id, rgb, cfg, crf)

    counted = 0
    bar = tqdm(total=len(rows), desc="evaluate", unit="img", disable=not progress)
    with bar:
        for (index, row), labels in labelled(rows, predict, crf_pool(crf, cfg, workers)):
            gt = read_gt(data, row)
            cm.update(labels, gt)
            if pred_dir is not None:
                save_label_png(pred_dir / f"{row.image_id}.png", labels)
            if index in grid_rows:
                grid_rows[index][1].update({"prediction": colorize(labels), "ground truth": colorize(gt)})
            counted += 1
            bar.update(1)
    if counted != len(data):
        raise EvalError(f"scored {counted} images but the manifest has {len(data)}; the report would be incomplete")
    grid_path = None
    if grid_rows:
        grid_path = save_sample_grid(out_dir / GRID_NAME, [grid_rows[i] for i in sorted(grid_rows)], GRID_COLUMNS,
                                     class_names=names)
    seconds = time.perf_counter() - started
    scores = score_dict(cm, names)
    report = EvalReport(
        checkpoint=str(ckpt.path), step=ckpt.step, manifest=str(data.path), dataset=data.dataset, images=counted,
        crf=crf, eval=asdict(cfg), miou=scores["miou"], pixel_accuracy=scores["pixel_accuracy"],
        pixels=scores["pixels"], iou=scores["iou"], gt_pixels=scores["gt_pixels"], confusion=scores["confusion"],
        device=str(dev), seconds=seconds, images_per_s=counted / seconds if seconds > 0 else 0.0,
        report_json=str(out_dir / REPORT_JSON), report_md=str(out_dir / REPORT_MD),
        predictions=None if pred_dir is None else str(pred_dir),
        visualization=None if grid_path is None else str(grid_path))
    lines = [f"checkpoint `{ckpt.path}` (step {ckpt.step})", f"manifest `{data.path}` ({data.dataset}), "
             f"{counted} images", f"scales {list(cfg.scales)}, flip {cfg.flip}, long side {cfg.long_side}, "
             f"CRF {'on' if crf else 'off'}"]
    write_reports(out_dir, report.to_dict(), markdown_report("weclip evaluate", lines, scores))
    return report
