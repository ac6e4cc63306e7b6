"""pipeline/palette.py and pipeline/visualize.py: VOC-palette PNGs, heat maps, overlays, sample grids, metric plots."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import load_mask
from pipeline.palette import VOC_COLORMAP, colorize, save_label_png
from pipeline.visualize import (BAND, CELL, PLOT_MARGIN, PLOT_SIZE, SERIES_COLOURS, cam_panels, heatmap, overlay, plot_metrics,
                                read_metrics, sample_grid)

# The VOC devkit colours of a few indices, written out by hand.
KNOWN_COLOURS = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 7: (128, 128, 128),
                 8: (64, 0, 0), 15: (192, 128, 128), 20: (0, 64, 128), 255: (224, 224, 192)}


def test_voc_colormap_matches_the_devkit():
    assert VOC_COLORMAP.shape == (256, 3)
    for index, colour in KNOWN_COLOURS.items():
        assert tuple(VOC_COLORMAP[index]) == colour, index
    assert len({tuple(c) for c in VOC_COLORMAP}) == 256


def test_label_png_opens_with_the_voc_palette_and_the_labels(tmp_path):
    labels = np.array([[0, 1, 2], [15, 20, 255]], dtype=np.uint8)
    path = save_label_png(tmp_path / "sub" / "x.png", labels)
    with Image.open(path) as im:
        assert im.mode == "P"
        palette = np.array(im.getpalette()[:768]).reshape(256, 3)
        np.testing.assert_array_equal(palette, VOC_COLORMAP)
        np.testing.assert_array_equal(np.array(im), labels)
        rgb = np.array(im.convert("RGB"))
    assert tuple(rgb[1, 0]) == KNOWN_COLOURS[15] and tuple(rgb[1, 2]) == KNOWN_COLOURS[255]
    np.testing.assert_array_equal(load_mask(path), labels)  # reads back as a label map, like a VOC mask
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]  # no temp file left


def test_colorize_and_its_range_check():
    np.testing.assert_array_equal(colorize(np.array([[1, 255]])), [[KNOWN_COLOURS[1], KNOWN_COLOURS[255]]])
    with pytest.raises(ValueError, match="0..255"):
        colorize(np.array([[256]]))
    with pytest.raises(ValueError, match="0..255"):
        save_label_png("unused.png", np.array([[-1]]))


def test_heatmap_ends_and_middle():
    out = heatmap(np.array([[0.0, 0.5, 1.0, 7.0]]))
    assert out.dtype == np.uint8
    assert [tuple(v) for v in out[0]] == [(0, 0, 128), (128, 255, 128), (128, 0, 0), (128, 0, 0)]  # clipped


def test_overlay_keeps_background_and_blends_labels():
    rgb = np.full((2, 2, 3), 100, dtype=np.uint8)
    labels = np.array([[0, 1], [0, 0]])
    out = overlay(rgb, labels, 0.25)
    np.testing.assert_array_equal(out[0, 0], rgb[0, 0])
    np.testing.assert_array_equal(out[0, 1], [round(0.75 * 100 + 0.25 * 128), 75, 75])
    with pytest.raises(ValueError, match="size"):
        overlay(rgb, np.zeros((3, 2), dtype=np.int64), 0.5)


def test_cam_panels_are_at_the_image_size():
    rgb = np.zeros((20, 30, 3), dtype=np.uint8)
    cams = np.zeros((2, 2, 3), dtype=np.float32)
    cams[1, 0, 0] = 1.0
    panels = cam_panels(rgb, cams, cams, pseudo=np.array([[0, 2], [2, 255]]))
    assert set(panels) == {"image", "CAM", "refined CAM", "pseudo label"}
    assert all(p.shape == (20, 30, 3) for p in panels.values())
    assert tuple(panels["pseudo label"][0, 0]) == KNOWN_COLOURS[0]
    assert tuple(panels["pseudo label"][19, 29]) == KNOWN_COLOURS[255]  # nearest: bottom-right cell
    assert tuple(panels["CAM"][0, 0]) == (128, 0, 0) and tuple(panels["CAM"][19, 29]) == (0, 0, 128)
    assert "pseudo label" not in cam_panels(rgb, cams, cams)


def test_sample_grid_layout():
    red = np.zeros((30, 40, 3), dtype=np.uint8)
    red[..., 0] = 255
    grid = np.array(sample_grid([("one", {"a": red, "c": red}), ("two", {"b": red})], ["a", "b", "c"]))
    assert grid.shape == (BAND + 2 * (BAND + CELL[1]), 3 * CELL[0], 3)
    centre_y = BAND + BAND + CELL[1] // 2

    def centre(row: int, column: int) -> tuple[int, ...]:
        return tuple(grid[centre_y + row * (BAND + CELL[1]), column * CELL[0] + CELL[0] // 2 + 30])

    assert centre(0, 0) == (255, 0, 0) and centre(0, 2) == (255, 0, 0) and centre(1, 1) == (255, 0, 0)
    assert centre(0, 1) != (255, 0, 0) and centre(1, 0) != (255, 0, 0)  # missing panels stay empty
    with pytest.raises(ValueError, match="at least one row"):
        sample_grid([], ["a"])


def write_metrics(path, steps: int = 50) -> None:
    lines = []
    for step in range(steps):
        lr = 2e-3 * min(1.0, (step + 1) / 10) * (1 - step / steps)
        loss = 2.0 * math.exp(-step / 10) + 0.1
        lines.append(json.dumps({"step": step, "loss": loss, "seg": loss - 0.05, "aff": 0.5 if step != 7 else None,
                                 "lr": lr, "rfm": step > 20}))
    path.write_text("\n".join(lines) + "\n")


def test_plot_metrics_draws_every_series(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    write_metrics(metrics)
    out = plot_metrics(metrics)
    assert out == tmp_path / "metrics.png"
    with Image.open(out) as im:
        assert im.size == (PLOT_SIZE[0], 2 * PLOT_SIZE[1])
        pixels = np.array(im.convert("RGB"))
    top, bottom = pixels[:PLOT_SIZE[1]], pixels[PLOT_SIZE[1]:]
    for n in range(3):  # loss, seg, aff in the top panel
        assert (top == SERIES_COLOURS[n]).all(axis=-1).sum() > 50, n
    assert (bottom == SERIES_COLOURS[0]).all(axis=-1).sum() > 50  # lr
    left, right = PLOT_MARGIN[0], PLOT_SIZE[0] - PLOT_MARGIN[2]
    step7 = round(left + 7 / 49 * (right - left))  # aff is missing at step 7: a gap, not a line through it
    green = (top == SERIES_COLOURS[2]).all(axis=-1)
    assert not green[:, step7].any() and green[:, round(left + 3 / 49 * (right - left))].any()
    assert not (bottom == SERIES_COLOURS[1]).all(axis=-1).any()
    assert plot_metrics(metrics, tmp_path / "x" / "curves.png", terms=("loss",)).is_file()


def test_read_metrics_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        read_metrics(tmp_path / "nothing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl holds no metrics"):
        read_metrics(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 0}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl line 2"):
        read_metrics(bad)
    stepless = tmp_path / "stepless.jsonl"
    stepless.write_text('{"loss": 1}\n')
    with pytest.raises(ValueError, match="no 'step'"):
        plot_metrics(stepless)
