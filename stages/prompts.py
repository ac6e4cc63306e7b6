"""Stage `prompts`: rank candidate prompt templates by CLIP-ES's sharpness ([PC] §3.2.1, Eq. 5; docs/algorithm.md
§3.4) over a manifest, optionally with each template's raw-CAM mIoU when the manifest has masks.

Sharpness needs only image-level labels, so it can pick a template for a dataset without masks; with `cam_miou` the
table also says how each template's CAMs score, and the Spearman correlation between the two columns says how well
sharpness predicted it on this data (CLIP-ES: "roughly negatively correlated"). The table goes to `out` as CSV
(`.csv`: template, sharpness, cam_miou) or the whole report as JSON (`.json`).
"""
from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from weclip.pipeline.config import Config
from weclip.pipeline.data.manifest import read_manifest
from weclip.pipeline.errors import ConfigError
from weclip.pipeline.files import atomic_write_text, require_local
from weclip.pipeline.inference.prompt_search import TemplateScore, score_templates, spearman
from weclip.pipeline.model.backbone import default_device
from weclip.pipeline.model.prompts import load_templates

FORMATS = (".csv", ".json")


@dataclass(frozen=True)
class PromptReport:
    manifest: str
    templates_from: str
    images: int
    unlabelled: list[str]  # images without a class, left out of the score
    softmax: str  # text.sharpness_softmax
    model: str
    device: str
    scores: list[TemplateScore]  # lowest sharpness first
    spearman: float | None  # between sharpness and raw-CAM mIoU (None without --cam-miou or when undefined)
    seconds: float
    out: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        with_miou = any(s.cam_miou is not None for s in self.scores)
        width = max(len(s.template) for s in self.scores)
        head = f"| rank | {'template'.ljust(width)} | sharpness |" + (" raw CAM mIoU % |" if with_miou else "")
        rule = f"|-----:|{'-' * (width + 2)}|----------:|" + ("---------------:|" if with_miou else "")
        lines = [f"{len(self.scores)} templates on {self.images} images of {self.manifest} ({self.model}, softmax over "
                 f"{self.softmax}, {self.seconds:.1f} s on {self.device})", "", head, rule]
        for rank, s in enumerate(self.scores, start=1):
            miou = f" {100 * s.cam_miou:14.2f} |" if with_miou else ""
            lines.append(f"| {rank:4d} | {s.template.ljust(width)} | {s.sharpness:9.5f} |{miou}")
        if with_miou:
            rho = "undefined" if self.spearman is None else f"{self.spearman:+.3f}"
            lines += ["", f"Spearman correlation of sharpness and raw-CAM mIoU: {rho} (negative: sharpness predicts)"]
        if self.unlabelled:
            lines.append(f"{len(self.unlabelled)} images without a class were left out (e.g. {self.unlabelled[:3]})")
        if self.out:
            lines.append(f"table written to {self.out}")
        return "\n".join(lines)


def table_text(report: PromptReport, suffix: str) -> str:
    """The CSV table (template, sharpness, cam_miou) or the JSON report."""
    if suffix == ".json":
        return json.dumps(report.to_dict(), indent=2) + "\n"
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["rank", "template", "sharpness", "cam_miou"])
    for rank, s in enumerate(report.scores, start=1):
        writer.writerow([rank, s.template, repr(s.sharpness), "" if s.cam_miou is None else repr(s.cam_miou)])
    return buffer.getvalue()


def run(cfg: Config, manifest: str | Path, templates: str | Path = "builtin", out: str | Path | None = None,
        cam_miou: bool = False, device: str | None = None, model_configs: Sequence[str | Path] = (),
        progress: bool = True) -> PromptReport:
    """Score `templates` ("builtin" or a file of one template per line) on `manifest` and write the table to `out`."""
    started = time.perf_counter()
    target = None if out is None else require_local(out, "table path")
    if target is not None and target.suffix.lower() not in FORMATS:
        raise ConfigError(f"table path {target} must end in .csv or .json (the format it is written in)")
    candidates = load_templates(templates)
    data = read_manifest(manifest)
    dev = default_device(device)
    result = score_templates(cfg, data, candidates, dev, cam_miou, model_configs, progress)
    report = PromptReport(
        manifest=str(data.path), templates_from=str(templates), images=result.images,
        unlabelled=list(result.unlabelled), softmax=cfg.text.sharpness_softmax, model=cfg.model.name, device=str(dev),
        scores=list(result.scores),
        spearman=spearman([s.sharpness for s in result.scores], [s.cam_miou for s in result.scores])
        if cam_miou else None,
        seconds=time.perf_counter() - started, out=None if target is None else str(target))
    if target is not None:
        atomic_write_text(target, table_text(report, target.suffix.lower()))
    return report
