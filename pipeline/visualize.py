"""Pictures for people, drawn with PIL and numpy only: sample grids (image, CAMs, labels), label overlays, and the
training curves of a `metrics.jsonl` (`plot_metrics`).

A grid row can name what its cells show: the band above the row holds the sample's name, a caption per column
(`cam_captions`: the classes whose CAMs the max-over-classes heat maps combine) and, over the label columns, a legend
of the classes their maps contain (colour swatch + name; recovered from the VOC colours, `legend_entries`).

Layout sizes (cell and plot pixels) are presentation, not method settings, so they live here.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from weclip.pipeline.errors import DataError, MissingFile
from weclip.pipeline.files import atomic_write
from weclip.pipeline.palette import VOC_COLORMAP, colorize

GRID_COLUMNS = ("image", "CAM", "refined CAM", "pseudo label", "prediction", "ground truth")
LABEL_COLUMNS = ("pseudo label", "prediction", "ground truth")  # panels that are label maps in VOC colours
CAM_COLUMNS = ("CAM", "refined CAM")
IGNORE_NAME = "ignore"  # label 255
CELL = (192, 144)  # width, height of one grid cell; panels are fitted inside, aspect kept
BAND = 16  # height of the text band above the column titles and above each row
BACKGROUND, INK, MUTED = (32, 32, 32), (235, 235, 235), (140, 140, 140)
PLOT_SIZE = (900, 300)  # one panel of `plot_metrics`
PLOT_MARGIN = (70, 20, 20, 30)  # left, top, right, bottom
SERIES_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))
MARKER = (120, 120, 120)  # the RFM-switch line of `plot_metrics`


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


def cam_captions(labels: Sequence[int], class_names: Sequence[str]) -> dict[str, str]:
    """Captions of the CAM columns of a row: the names of the classes (0-based foreground ids, the CAMs' order) whose
    maps the max-over-classes heat map shows. `class_names` are the decoder's outputs, background first."""
    names = " + ".join(class_names[c + 1] if c + 1 < len(class_names) else f"class {c}" for c in labels)
    return {column: names or "no class" for column in CAM_COLUMNS}


_COLOUR_INDEX = {int(r) << 16 | int(g) << 8 | int(b): i for i, (r, g, b) in enumerate(VOC_COLORMAP)}


def label_ids(panel: np.ndarray) -> list[int]:
    """The label indices a VOC-coloured panel (H×W×3, from `colorize`) shows, ascending; other colours are skipped."""
    rgb = np.asarray(panel, dtype=np.int64).reshape(-1, 3)
    packed = np.unique(rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2])
    return sorted(_COLOUR_INDEX[int(v)] for v in packed if int(v) in _COLOUR_INDEX)


def legend_entries(panels: dict[str, np.ndarray], class_names: Sequence[str] = ()
                   ) -> list[tuple[int, str, tuple[int, int, int]]]:
    """(label, name, colour) of every label present in a row's label panels (LABEL_COLUMNS), ascending; a label
    without a name is named by its number, 255 is 'ignore'."""
    present = sorted({i for name in LABEL_COLUMNS if name in panels for i in label_ids(panels[name])})

    def name(i: int) -> str:
        return IGNORE_NAME if i == 255 else class_names[i] if i < len(class_names) else str(i)

    return [(i, name(i), tuple(int(v) for v in VOC_COLORMAP[i])) for i in present]


def _clipped(draw: ImageDraw.ImageDraw, text: str, width: float, font: ImageFont.ImageFont) -> str:
    """`text`, cut with '...' where it would run past `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _draw_legend(draw: ImageDraw.ImageDraw, entries: Sequence[tuple[int, str, tuple[int, int, int]]], x: int,
                 y: int, right: int, font: ImageFont.ImageFont) -> None:
    """Swatch + name per entry on one line from x to `right`; what does not fit ends in '...'."""
    for _, name, colour in entries:
        width = 14 + draw.textlength(name, font=font) + 8
        if x + width > right:
            draw.text((x, y), "...", fill=INK, font=font)
            return
        draw.rectangle((x, y + 1, x + 9, y + 10), fill=colour, outline=MUTED)
        draw.text((x + 14, y), name, fill=INK, font=font)
        x += int(width)


def sample_grid(rows: Sequence[tuple], columns: Sequence[str], class_names: Sequence[str] = ()) -> Image.Image:
    """One row per sample, one column per name in `columns`: column titles on top; above each row its name, the
    captions of its columns and the legend of its label panels (class names from `class_names`, background first).
    A row is (name, panels) or (name, panels, captions: column -> text); a panel a sample does not have is drawn as
    an empty cell marked 'n/a'."""
    if not rows:
        raise ValueError("sample_grid needs at least one row")
    font = ImageFont.load_default()
    width, row_height = CELL[0] * len(columns), BAND + CELL[1]
    canvas = Image.new("RGB", (width, BAND + row_height * len(rows)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(columns):
        draw.text((c * CELL[0] + 4, 2), name, fill=INK, font=font)
    labels_at = next((c for c, name in enumerate(columns) if name in LABEL_COLUMNS), None)
    for r, (title, panels, *rest) in enumerate(rows):
        captions: dict[str, str] = rest[0] if rest else {}
        top = BAND + r * row_height
        draw.text((4, top + 2), _clipped(draw, title, CELL[0] - 8, font), fill=MUTED, font=font)
        for c, name in enumerate(columns):  # the name holds column 0's band, the legend those of the label columns
            if name in captions and 0 < c and (labels_at is None or c < labels_at):
                draw.text((c * CELL[0] + 4, top + 2), _clipped(draw, captions[name], CELL[0] - 8, font), fill=INK,
                          font=font)
        if labels_at is not None:
            _draw_legend(draw, legend_entries(panels, class_names), labels_at * CELL[0] + 4, top + 2, width, font)
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


def save_sample_grid(path: str | Path, rows: Sequence[tuple], columns: Sequence[str] = GRID_COLUMNS,
                     class_names: Sequence[str] = ()) -> Path:
    """Write `sample_grid(rows, columns, class_names)` as a PNG (atomically)."""
    return _save_png(sample_grid(rows, columns, class_names), path)


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


def ema(values: Sequence[float | None], weight: float) -> list[float | None]:
    """Exponential moving average s = weight·s + (1 − weight)·v, started at the first value (weight 0: the values).
    A missing value stays missing and leaves the average where it was, so gaps stay gaps."""
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    out: list[float | None] = []
    state: float | None = None
    for v in values:
        if v is not None:
            state = v if state is None else weight * state + (1 - weight) * v
        out.append(None if v is None else state)
    return out


def rfm_switch_step(records: Sequence[dict]) -> float | None:
    """The first step logged with RFM on right after one with it off (records sorted by step); None when the
    records do not show the switch (RFM never on, or on from the first record)."""
    for before, after in zip(records, records[1:]):
        if not before.get("rfm") and after.get("rfm"):
            return float(after["step"])
    return None


def step_ticks(first: float, last: float, count: int = 6) -> list[float]:
    """About `count` round steps (1, 2 or 5 × 10^k apart) within [first, last]."""
    if last <= first:
        return [first]
    raw = (last - first) / max(1, count - 1)
    base = 10 ** math.floor(math.log10(raw))
    spacing = next(m * base for m in (1, 2, 5, 10) if m * base >= raw)
    start = math.ceil(first / spacing) * spacing
    return [float(start + i * spacing) for i in range(int((last - start) // spacing) + 1)]


def _faint(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(round(255 - 0.3 * (255 - c)) for c in colour)


def _polyline(draw: ImageDraw.ImageDraw, points: list[tuple[float, float] | None], colour: tuple[int, int, int],
              width: int) -> None:
    """Lines through the points; a None ends a run (gaps stay gaps), a lone point is a dot."""
    runs: list[list[tuple[float, float]]] = [[]]
    for point in points:
        if point is None:
            runs.append([])
        else:
            runs[-1].append(point)
    for run in runs:
        if len(run) > 1:
            draw.line(run, fill=colour, width=width)
        elif run:
            draw.ellipse((run[0][0] - 2, run[0][1] - 2, run[0][0] + 2, run[0][1] + 2), fill=colour)


def _line_panel(steps: list[float], series: dict[str, list[float | None]], title: str, smooth: float = 0.0,
                marker: float | None = None, x_range: tuple[float, float] | None = None) -> Image.Image:
    """One chart: the named series against the step (with `smooth` > 0 the EMA drawn over the faint raw values),
    y range from their finite values, 5 y ticks, round step ticks, legend; `marker` a dashed vertical line (the RFM
    switch); `x_range` the steps spanned (default: those of the series), so panels of sparse series line up."""
    font = ImageFont.load_default()
    canvas = Image.new("RGB", PLOT_SIZE, "white")
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = PLOT_MARGIN[0], PLOT_MARGIN[1], PLOT_SIZE[0] - PLOT_MARGIN[2], PLOT_SIZE[1] - PLOT_MARGIN[3]
    values = [v for ys in series.values() for v in ys if v is not None]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
    x0, x1 = x_range or (min(steps), max(steps))
    span = (x1 - x0) or 1.0

    def xy(step: float, value: float) -> tuple[float, float]:
        return (left + (step - x0) / span * (right - left), bottom - (value - lo) / (hi - lo) * (bottom - top))

    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    for i in range(5):
        value = lo + (hi - lo) * i / 4
        y = xy(x0, value)[1]
        draw.line((left - 4, y, left, y), fill=(0, 0, 0))
        draw.text((4, y - 6), _tick(value), fill=(0, 0, 0), font=font)
    for step in step_ticks(x0, x1):
        x = xy(step, lo)[0]
        draw.line((x, bottom, x, bottom + 4), fill=(0, 0, 0))
        draw.text((x - 3 * len(f"{step:g}"), bottom + 6), f"{step:g}", fill=(0, 0, 0), font=font)
    draw.text((right - 24, bottom + 16), "step", fill=(0, 0, 0), font=font)
    draw.text((left + 6, 4), title, fill=(0, 0, 0), font=font)
    if marker is not None and x0 <= marker <= x1:
        x = xy(marker, lo)[0]
        for y in range(top + 1, bottom, 8):
            draw.line((x, y, x, min(y + 4, bottom - 1)), fill=MARKER)
        draw.text((x + 4, top + 2), "RFM on", fill=MARKER, font=font)
    for n, (name, ys) in enumerate(series.items()):
        colour = SERIES_COLOURS[n % len(SERIES_COLOURS)]
        if smooth:
            _polyline(draw, [None if v is None else xy(s, v) for s, v in zip(steps, ys)], _faint(colour), 1)
        _polyline(draw, [None if v is None else xy(s, v) for s, v in zip(steps, ema(ys, smooth))], colour, 2)
        legend_y = top + 12 + 14 * n
        draw.line((right - 100, legend_y, right - 82, legend_y), fill=colour, width=2)
        draw.text((right - 76, legend_y - 6), name, fill=colour, font=font)
    return canvas


def plot_metrics(metrics_path: str | Path, out_path: str | Path | None = None,
                 terms: Sequence[str] = ("loss", "seg", "aff"), smooth: float = 0.0) -> Path:
    """PNG of a training run's loss terms (top), learning rate and, when the run validated, the validation mIoU
    against the step, with round step ticks and the RFM switch marked.

    Writes next to the metrics file (`metrics.png`) unless `out_path` is given; terms absent from the file are
    skipped; non-finite values leave gaps; `smooth` in [0, 1) is the EMA weight of the loss curves (the raw values
    stay as a faint line).
    """
    records = sorted(read_metrics(metrics_path), key=lambda r: r["step"])
    steps = [float(r["step"]) for r in records]
    present = [t for t in terms if any(t in r for r in records)]
    if not present and not any("lr" in r for r in records):
        raise DataError(f"{metrics_path} has none of the series {list(terms)} nor 'lr' to plot")
    switch = rfm_switch_step(records)
    panels = [_line_panel(steps, {t: [_number(r.get(t)) for r in records] for t in present}, "loss terms", smooth,
                          switch),
              _line_panel(steps, {"lr": [_number(r.get("lr")) for r in records]}, "learning rate", marker=switch)]
    validated = [r for r in records if _number(r.get("val_miou")) is not None]
    if validated:
        panels.append(_line_panel([float(r["step"]) for r in validated],
                                  {"val mIoU": [_number(r["val_miou"]) for r in validated]}, "validation mIoU",
                                  marker=switch, x_range=(steps[0], steps[-1])))
    figure = Image.new("RGB", (PLOT_SIZE[0], len(panels) * PLOT_SIZE[1]), "white")
    for i, panel in enumerate(panels):
        figure.paste(panel, (0, i * PLOT_SIZE[1]))
    out = Path(out_path) if out_path is not None else Path(metrics_path).with_name("metrics.png")
    return _save_png(figure, out)
