"""pipeline/palette.py and pipeline/visualize.py: VOC-palette PNGs, heat maps, overlays, sample grids, metric plots."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from weclip.pipeline.data.images import load_mask
from weclip.pipeline.palette import VOC_COLORMAP, colorize, save_label_png
from weclip.pipeline.visualize import (BAND, CELL, MARKER, PLOT_MARGIN, PLOT_SIZE, SERIES_COLOURS, cam_captions, cam_panels, ema,
                                heatmap, label_ids, legend_entries, overlay, plot_metrics, read_metrics, rfm_switch_step,
                                sample_grid, step_ticks)

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


def test_ema_smooths_and_keeps_gaps():
    assert ema([1.0, None, 3.0, 5.0], 0.5) == [1.0, None, 2.0, 3.5]
    assert ema([4.0, 2.0, None], 0.0) == [4.0, 2.0, None]
    assert ema([None, 2.0, 4.0], 0.75) == [None, 2.0, 2.5]
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ema([1.0], 1.0)


def test_rfm_switch_step_is_the_first_step_with_rfm_on(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    write_metrics(metrics)
    assert rfm_switch_step(read_metrics(metrics)) == 21.0  # rfm = step > 20
    assert rfm_switch_step([{"step": 0, "rfm": False}, {"step": 1, "rfm": False}]) is None
    assert rfm_switch_step([{"step": 5, "rfm": True}, {"step": 6, "rfm": True}]) is None  # switched before these


def test_step_ticks_are_round_and_inside_the_range():
    assert step_ticks(0, 49) == [0, 10, 20, 30, 40]
    assert step_ticks(0, 30000) == [0, 10000, 20000, 30000]
    assert step_ticks(1500, 2600) == [1500, 2000, 2500]  # 1100 / 5 = 220 → every 500
    assert step_ticks(3, 3) == [3]


def test_plot_marks_the_rfm_switch_smooths_and_adds_the_val_panel(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    write_metrics(metrics)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    for r in records:
        if r["step"] % 10 == 9:
            r["val_miou"] = 0.3 + r["step"] / 100
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = plot_metrics(metrics, tmp_path / "smooth.png", smooth=0.9)
    with Image.open(out) as im:
        assert im.size == (PLOT_SIZE[0], 3 * PLOT_SIZE[1])  # losses, lr, validation mIoU
        pixels = np.array(im.convert("RGB"))
    left, right = PLOT_MARGIN[0], PLOT_SIZE[0] - PLOT_MARGIN[2]
    switch_x = round(left + 21 / 49 * (right - left))
    top = pixels[:PLOT_SIZE[1]]
    marker = (top == MARKER).all(axis=-1)
    assert marker[:, switch_x - 1:switch_x + 2].sum() > 20 and not marker[:, left + 5:switch_x - 5].any()
    faint = tuple(round(255 - 0.3 * (255 - c)) for c in SERIES_COLOURS[0])
    assert (top == faint).all(axis=-1).sum() > 20  # the raw loss under its EMA
    val = pixels[2 * PLOT_SIZE[1]:]
    assert (val == SERIES_COLOURS[0]).all(axis=-1).sum() > 50
    blue = (val == SERIES_COLOURS[0]).all(axis=-1)
    assert not blue[:, left + 2:round(left + 8 / 49 * (right - left))].any()  # first val at step 9: shared x axis


def test_cam_captions_name_the_classes_of_the_cams():
    names = ("background", "cat", "dog", "bird")
    assert cam_captions([1, 0], names) == {"CAM": "dog + cat", "refined CAM": "dog + cat"}
    assert cam_captions([], names)["CAM"] == "no class"
    assert cam_captions([7], names)["CAM"] == "class 7"


def test_legend_entries_are_the_labels_present_in_the_label_panels():
    gt = np.array([[0, 2], [255, 2]])
    prediction = np.array([[0, 3], [0, 0]])
    panels = {"image": colorize(np.array([[5, 6]])), "ground truth": colorize(gt), "prediction": colorize(prediction)}
    assert label_ids(colorize(gt)) == [0, 2, 255]
    names = ("background", "cat", "dog", "bird")
    assert legend_entries(panels, names) == [(0, "background", KNOWN_COLOURS[0]), (2, "dog", KNOWN_COLOURS[2]),
                                             (3, "bird", KNOWN_COLOURS[3]), (255, "ignore", KNOWN_COLOURS[255])]
    assert [e[1] for e in legend_entries(panels)] == ["0", "2", "3", "ignore"]  # without names: the numbers
    assert legend_entries({"image": colorize(gt)}) == []  # the image column is no label map


def test_sample_grid_draws_the_legend_and_captions_in_the_row_band():
    gt = colorize(np.array([[0, 1], [1, 1]]))
    rows = [("one", {"image": gt, "CAM": gt, "ground truth": gt}, cam_captions([0], ("background", "plane")))]
    grid = np.array(sample_grid(rows, ["image", "CAM", "ground truth"], ("background", "plane")))
    assert grid.shape == (BAND + BAND + CELL[1], 3 * CELL[0], 3)  # the legend takes no extra room
    band = grid[BAND:2 * BAND]
    legend = band[:, 2 * CELL[0]:]
    assert (legend == KNOWN_COLOURS[1]).all(axis=-1).sum() >= 64  # a 10×10 swatch of class 1
    assert not (band[:, :2 * CELL[0]] == KNOWN_COLOURS[1]).all(axis=-1).any()
    bare = np.array(sample_grid([(title, panels) for title, panels, _ in rows], ["image", "CAM", "ground truth"]))
    assert (band[:, CELL[0]:2 * CELL[0]] != bare[BAND:2 * BAND, CELL[0]:2 * CELL[0]]).any()  # the CAM caption


def test_cli_plot_smooths(tmp_path):
    from weclip import cli
    metrics = tmp_path / "metrics.jsonl"
    write_metrics(metrics)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plot", str(metrics), "-o", str(tmp_path / "a.png"), "--smooth", "0.8"])
    assert exit_info.value.code == 0
    with Image.open(tmp_path / "a.png") as im:
        pixels = np.array(im.convert("RGB"))
    faint = tuple(round(255 - 0.3 * (255 - c)) for c in SERIES_COLOURS[0])
    assert (pixels == faint).all(axis=-1).any()  # smoothed: the raw curve drawn faint
