"""Pictures for people, drawn with PIL and numpy only: sample grids (image, CAMs, labels), label overlays, and the
training curves of a `metrics.jsonl` (`plot_metrics`).

Layout sizes (cell and plot pixels) are presentation, not method settings, so they live here.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.errors import DataError, MissingFile
from pipeline.files import atomic_write
from pipeline.palette import colorize

GRID_COLUMNS = ("image", "CAM", "refined CAM", "pseudo label", "prediction", "ground truth")
CELL = (192, 144)  # width, height of one grid cell; panels are fitted inside, aspect kept
BAND = 16  # height of the text band above the column titles and above each row
BACKGROUND, INK, MUTED = (32, 32, 32), (235, 235, 235), (140, 140, 140)
PLOT_SIZE = (900, 300)  # one panel of `plot_metrics`
PLOT_MARGIN = (70, 20, 20, 30)  # left, top, right, bottom
SERIES_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))


def heatmap(cam: np.ndarray) -> np.ndarray:
    """H×W values in [0, 1] → H×W×3 uint8, a jet-like ramp (blue 0 → cyan → yellow → red 1)."""
    x = np.clip(np.nan_to_num(np.asarray(cam, dtype=np.float32)), 0.0, 1.0)
    rgb = [np.clip(1.5 - np.abs(4 * x - shift), 0.0, 1.0) for shift in (3.0, 2.0, 1.0)]
    return (np.stack(rgb, axis=-1) * 255).round().astype(np.uint8)


def resize_map(values: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resize an h×w float (bilinear) or label (nearest) map to size = (H, W)."""
    values = np.asarray(values)
    if values.shape == tuple(size):
        return values
    if nearest:
        rows = (np.arange(size[0]) * values.shape[0] // size[0])
        cols = (np.arange(size[1]) * values.shape[1] // size[1])
        return values[rows][:, cols]
    image = Image.fromarray(np.ascontiguousarray(values, dtype=np.float32))
    return np.asarray(image.resize((size[1], size[0]), Image.Resampling.BILINEAR))


def cam_panels(rgb: np.ndarray, cams: np.ndarray, refined: np.ndarray, pseudo: np.ndarray | None = None
               ) -> dict[str, np.ndarray]:
    """The first grid columns at the image's size: the image, heat maps of the max over classes of the CAMs and of
    the refined CAMs (K×h×w in [0, 1]), and, when given, the pseudo label (any size, 0/c+1/255) in VOC colours."""
    size = rgb.shape[:2]

    def heat(maps: np.ndarray) -> np.ndarray:
        top = np.asarray(maps, dtype=np.float32).max(axis=0) if len(maps) else np.zeros(np.shape(maps)[1:])
        return heatmap(resize_map(top, size))

    panels = {"image": rgb, "CAM": heat(cams), "refined CAM": heat(refined)}
    if pseudo is not None:
        panels["pseudo label"] = colorize(resize_map(np.asarray(pseudo, dtype=np.int64), size, nearest=True))
    return panels


def overlay(rgb: np.ndarray, labels: np.ndarray, alpha: float) -> np.ndarray:
    """The image with its label map blended on top (weight `alpha` on the colours); background pixels stay as is."""
    if rgb.shape[:2] != labels.shape:
        raise ValueError(f"overlay needs labels of the image's size {rgb.shape[:2]}, got {labels.shape}")
    blended = (1 - alpha) * rgb.astype(np.float32) + alpha * colorize(labels).astype(np.float32)
    return np.where((labels == 0)[..., None], rgb, blended.round()).astype(np.uint8)


def _fit(panel: np.ndarray) -> Image.Image:
    """A panel scaled to fit one cell (aspect kept; labels stay crisp with nearest), centred on the background."""
    image = Image.fromarray(np.asarray(panel, dtype=np.uint8))
    scale = min(CELL[0] / image.width, CELL[1] / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    cell = Image.new("RGB", CELL, BACKGROUND)
    cell.paste(image.resize(size, Image.Resampling.NEAREST), ((CELL[0] - size[0]) // 2, (CELL[1] - size[1]) // 2))
    return cell


def sample_grid(rows: Sequence[tuple[str, dict[str, np.ndarray]]], columns: Sequence[str]) -> Image.Image:
    """One row per sample, one column per name in `columns`: column titles on top, the sample's name above its row;
    a panel a sample does not have is drawn as an empty cell marked 'n/a'."""
    if not rows:
        raise ValueError("sample_grid needs at least one row")
    font = ImageFont.load_default()
    width, row_height = CELL[0] * len(columns), BAND + CELL[1]
    canvas = Image.new("RGB", (width, BAND + row_height * len(rows)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(columns):
        draw.text((c * CELL[0] + 4, 2), name, fill=INK, font=font)
    for r, (title, panels) in enumerate(rows):
        top = BAND + r * row_height
        draw.text((4, top + 2), title, fill=MUTED, font=font)
        for c, name in enumerate(columns):
            if name in panels:
                canvas.paste(_fit(panels[name]), (c * CELL[0], top + BAND))
            else:
                draw.text((c * CELL[0] + CELL[0] // 2 - 8, top + BAND + CELL[1] // 2), "n/a", fill=MUTED, font=font)
    return canvas


def _save_png(image: Image.Image, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def save_rgb_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Write an H×W×3 uint8 array as a PNG (atomically)."""
    return _save_png(Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)), path)


def save_sample_grid(path: str | Path, rows: Sequence[tuple[str, dict[str, np.ndarray]]],
                     columns: Sequence[str] = GRID_COLUMNS) -> Path:
    """Write `sample_grid(rows, columns)` as a PNG (atomically)."""
    return _save_png(sample_grid(rows, columns), path)


def read_metrics(path: str | Path) -> list[dict]:
    """The JSON lines of a training `metrics.jsonl`, each with a `step`; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"metrics file {path} does not exist; `weclip train` writes it into its output folder")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {number} is not JSON ({err}); is this a metrics.jsonl?") from None
        if not isinstance(record, dict) or "step" not in record:
            raise DataError(f"{path} line {number} has no 'step'; is this a metrics.jsonl written by weclip train?")
        records.append(record)
    if not records:
        raise DataError(f"{path} holds no metrics yet; plot after the first training steps")
    return records


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        else None


def _tick(value: float) -> str:
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def _line_panel(steps: list[float], series: dict[str, list[float | None]], title: str) -> Image.Image:
    """One chart: the named series against the step, y range from their finite values, 5 y ticks, legend."""
    font = ImageFont.load_default()
    canvas = Image.new("RGB", PLOT_SIZE, "white")
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = PLOT_MARGIN[0], PLOT_MARGIN[1], PLOT_SIZE[0] - PLOT_MARGIN[2], PLOT_SIZE[1] - PLOT_MARGIN[3]
    values = [v for ys in series.values() for v in ys if v is not None]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
    x0, x1 = min(steps), max(steps)
    span = (x1 - x0) or 1.0

    def xy(step: float, value: float) -> tuple[float, float]:
        return (left + (step - x0) / span * (right - left), bottom - (value - lo) / (hi - lo) * (bottom - top))

    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    for i in range(5):
        value = lo + (hi - lo) * i / 4
        y = xy(x0, value)[1]
        draw.line((left - 4, y, left, y), fill=(0, 0, 0))
        draw.text((4, y - 6), _tick(value), fill=(0, 0, 0), font=font)
    for step in (x0, x1):
        x = xy(step, lo)[0]
        draw.text((x - 10, bottom + 6), f"{step:g}", fill=(0, 0, 0), font=font)
    draw.text(((left + right) // 2 - 10, bottom + 6), "step", fill=(0, 0, 0), font=font)
    draw.text((left + 6, 4), title, fill=(0, 0, 0), font=font)
    for n, (name, ys) in enumerate(series.items()):
        colour = SERIES_COLOURS[n % len(SERIES_COLOURS)]
        runs: list[list[tuple[float, float]]] = [[]]  # a missing value ends a run: gaps stay gaps
        for s, v in zip(steps, ys):
            if v is None:
                runs.append([])
            else:
                runs[-1].append(xy(s, v))
        for points in runs:
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            elif points:
                draw.ellipse((points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2), fill=colour)
        legend_y = top + 12 + 14 * n
        draw.line((right - 100, legend_y, right - 82, legend_y), fill=colour, width=2)
        draw.text((right - 76, legend_y - 6), name, fill=colour, font=font)
    return canvas


def plot_metrics(metrics_path: str | Path, out_path: str | Path | None = None,
                 terms: Sequence[str] = ("loss", "seg", "aff")) -> Path:
    """PNG of a training run's loss terms (top) and learning rate (bottom) against the step.

    Writes next to the metrics file (`metrics.png`) unless `out_path` is given; terms absent from the file are
    skipped; non-finite values leave gaps.
    """
    records = sorted(read_metrics(metrics_path), key=lambda r: r["step"])
    steps = [float(r["step"]) for r in records]
    present = [t for t in terms if any(t in r for r in records)]
    if not present and not any("lr" in r for r in records):
        raise DataError(f"{metrics_path} has none of the series {list(terms)} nor 'lr' to plot")
    losses = _line_panel(steps, {t: [_number(r.get(t)) for r in records] for t in present}, "loss terms")
    lr = _line_panel(steps, {"lr": [_number(r.get("lr")) for r in records]}, "learning rate")
    figure = Image.new("RGB", (PLOT_SIZE[0], 2 * PLOT_SIZE[1]), "white")
    figure.paste(losses, (0, 0))
    figure.paste(lr, (0, PLOT_SIZE[1]))
    out = Path(out_path) if out_path is not None else Path(metrics_path).with_name("metrics.png")
    return _save_png(figure, out)
