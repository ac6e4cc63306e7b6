"""The embedded shapes world (pipeline/data/shapes.py): determinism, exact masks, files, captions."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from weclip.pipeline.config import preset
from weclip.pipeline.data import shapes
from weclip.pipeline.data.images import load_mask, load_rgb
from weclip.pipeline.model.text import SHAPES_CLASSES, class_set, prompts

TEMPLATE = preset("shapes").text.template


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    shapes.generate(a, "train", 5, seed=7, size=96)
    shapes.generate(b, "train", 5, seed=7, size=96)
    shapes.generate(c, "train", 5, seed=8, size=96)
    files_a = _files(a)
    assert len(files_a) == 2 * 5 + 2  # images, masks, split list, captions
    assert files_a == _files(b)
    files_c = _files(c)
    assert files_a.keys() == files_c.keys()
    assert all(files_a[k] != files_c[k] for k in files_a if k.endswith(".jpg"))


def test_a_longer_run_starts_with_the_shorter_one():
    short = list(shapes.iter_samples(3, 64, TEMPLATE, count=2))
    long = list(shapes.iter_samples(3, 64, TEMPLATE, count=4))
    for s, l in zip(short, long):
        np.testing.assert_array_equal(s.image, l.image)
        np.testing.assert_array_equal(s.mask, l.mask)


@pytest.fixture(scope="module")
def samples() -> list[shapes.ShapeSample]:
    return list(shapes.iter_samples(11, 224, TEMPLATE, count=40))


def test_labels_are_the_mask_ids(samples):
    for s in samples:
        ids = np.unique(s.mask)
        assert set(ids.tolist()) <= set(range(len(SHAPES_CLASSES) + 1))  # no ignore pixels
        assert s.labels == tuple(int(v) - 1 for v in ids if v != 0)
        assert 1 <= len(s.objects) <= 3
        assert set(s.labels) == {o.class_id for o in s.objects}


def test_every_mask_pixel_has_its_objects_colour(samples):
    """Recolouring: each pixel of a class region is its object's colour × a texture factor in [1 − a, 1 + a]."""
    a = shapes.TEXTURE_AMPLITUDE
    for s in samples:
        for class_id in s.labels:
            region = s.image[s.mask == class_id + 1].astype(np.float64)  # P×3
            fits = np.zeros(len(region), dtype=bool)
            for obj in (o for o in s.objects if o.class_id == class_id):
                colour = np.asarray(obj.colour, dtype=np.float64)
                low, high = np.floor(colour * (1 - a)) - 1, np.minimum(np.ceil(colour * (1 + a)) + 1, 255)
                fits |= ((region >= low) & (region <= high)).all(axis=1)
            assert fits.all(), f"{(~fits).sum()} pixels of {SHAPES_CLASSES[class_id]} are not its colour"


def _expected_area(obj: shapes.ShapeObject) -> float | None:
    """Area of the simple shapes from geometry alone (circumradius r)."""
    r = obj.radius
    return {"ball": math.pi * r * r, "ring": math.pi * r * r * (1 - shapes.RING_INNER ** 2), "box": 2 * r * r,
            "triangle": 3 * math.sqrt(3) / 4 * r * r}.get(SHAPES_CLASSES[obj.class_id])


def test_unoccluded_simple_shapes_have_their_geometric_area_and_centre(samples):
    checked = 0
    for s in samples:
        if len(s.objects) != 1:
            continue
        obj = s.objects[0]
        expected = _expected_area(obj)
        inside = obj.radius <= min(obj.cx, obj.cy, 224 - obj.cx, 224 - obj.cy)
        if expected is None or not inside:
            continue
        ys, xs = np.nonzero(s.mask == obj.class_id + 1)
        assert abs(len(ys) - expected) < 0.04 * expected + 2 * math.pi * obj.radius
        if SHAPES_CLASSES[obj.class_id] in ("ball", "ring", "box"):  # centrally symmetric: centroid = centre
            assert abs(xs.mean() + 0.5 - obj.cx) < 1.0 and abs(ys.mean() + 0.5 - obj.cy) < 1.0
        checked += 1
    assert checked >= 3


def test_occluded_objects_keep_most_of_their_area(samples):
    checked = 0
    for s in samples:
        classes = [o.class_id for o in s.objects]
        if len(set(classes)) != len(classes):
            continue
        for obj in s.objects:
            expected = _expected_area(obj)
            if expected is None or obj.radius > min(obj.cx, obj.cy, 224 - obj.cx, 224 - obj.cy):
                continue
            visible = (s.mask == obj.class_id + 1).sum()
            assert visible >= shapes.MIN_VISIBLE * expected - 2 * math.pi * obj.radius
            checked += 1
    assert checked >= 10


def test_captions_use_the_class_prompts():
    names = class_set("shapes")
    assert shapes.caption((0, 1), 1, TEMPLATE) == "a photo of a ball and a star on grass."
    assert shapes.caption((2,), 0, TEMPLATE) == "a photo of a box on sky."
    assert shapes.caption((0, 3, 5), 4, TEMPLATE) == "a photo of a ball, a triangle and a heart on bricks."
    class_prompts = prompts(names.prompt_names, TEMPLATE)
    assert [TEMPLATE.format(shapes.describe((c,), None)) for c in range(6)] == class_prompts
    assert [TEMPLATE.format(shapes.describe((), b)) for b in range(6)] == prompts(names.background, TEMPLATE)


def test_files_are_readable_voc_layout(tmp_path):
    ids = shapes.generate(tmp_path, "val", 4, seed=5, size=96)
    shapes.generate(tmp_path, "train", 3, seed=6, size=96)
    assert (tmp_path / "ImageSets/Segmentation/val.txt").read_text().split() == ids
    records = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert sorted(r["split"] for r in records) == ["train"] * 3 + ["val"] * 4  # both splits kept
    by_id = {r["image_id"]: r for r in records}
    for image_id, s in zip(ids, shapes.iter_samples(5, 96, TEMPLATE, count=4)):
        with Image.open(tmp_path / "SegmentationClass" / f"{image_id}.png") as png:
            assert png.mode == "P"
        mask = load_mask(tmp_path / "SegmentationClass" / f"{image_id}.png")
        np.testing.assert_array_equal(mask, s.mask)
        rgb = load_rgb(tmp_path / "JPEGImages" / f"{image_id}.jpg")
        assert rgb.shape == (96, 96, 3)
        assert np.abs(rgb.astype(int) - s.image.astype(int)).mean() < 4  # quality-95 JPEG of the same drawing
        assert by_id[image_id]["labels"] == list(s.labels)
        assert by_id[image_id]["caption"] == s.caption


def test_the_manifest_stage_reads_the_world(tmp_path):
    from weclip.stages import manifest

    root = tmp_path / "world"
    shapes.generate(root, "val", 4, seed=5, size=96)
    summary = manifest.run("shapes", root, tmp_path / "m.parquet", split="val", progress=False)
    assert summary.images == 4 and not summary.rejected
    expected = [s.labels for s in shapes.iter_samples(5, 96, TEMPLATE, count=4)]
    import pyarrow.parquet as pq
    table = pq.read_table(summary.manifest_path).to_pydict()
    assert [tuple(v) for v in table["labels"]] == expected
