"""Score and report writers shared by `evaluate` and `pseudo`: mIoU dicts, a Markdown page, atomic JSON + MD files."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from weclip.pipeline.files import atomic_write_text
from weclip.pipeline.metrics import ConfusionMatrix

REPORT_JSON, REPORT_MD, GRID_NAME = "report.json", "report.md", "visualize.png"


def score_dict(cm: ConfusionMatrix, names: Sequence[str]) -> dict[str, Any]:
    """mIoU, pixel accuracy, per-class IoU and GT pixel counts, and the confusion matrix (rows = GT)."""
    return {**cm.to_dict(list(names)), "gt_pixels": dict(zip(names, cm.matrix.sum(axis=1).tolist())),
            "confusion": cm.matrix.tolist()}


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def markdown_report(title: str, lines: Sequence[str], scores: dict[str, Any] | None) -> str:
    """A Markdown page: title, summary lines, and the per-class IoU table (classes without GT pixels are listed
    but not in the mean, §5.3)."""
    out = [f"# {title}", "", *(f"- {line}" for line in lines), ""]
    if scores is not None:
        out += [f"**mIoU {percent(scores['miou'])}** (pixel accuracy {percent(scores['pixel_accuracy'])}, "
                f"{scores['pixels']} pixels scored)", "", "| class | IoU (%) | GT pixels |", "|---|---:|---:|"]
        out += [f"| {name} | {percent(iou)}{'' if scores['gt_pixels'][name] else ' (not in mean)'} | "
                f"{scores['gt_pixels'][name]} |" for name, iou in scores["iou"].items()]
    return "\n".join(out) + "\n"


def write_reports(out_dir: Path, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """`report.json` and `report.md` in out_dir, each written atomically."""
    return (atomic_write_text(out_dir / REPORT_JSON, json.dumps(payload, indent=2) + "\n"),
            atomic_write_text(out_dir / REPORT_MD, markdown))
