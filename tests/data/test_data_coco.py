"""COCO reader: category ids mapped by name to our 0..79 order, mask labels, both folder layouts."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.data import data_fakes as fk

from weclip.pipeline.data.coco import category_map, mask_name, read_coco
from weclip.pipeline.data.manifest import validate
from weclip.pipeline.errors import DataError
from weclip.pipeline.model.text import COCO_CLASSES

OURS = {c["id"]: COCO_CLASSES.index(n) for c, n in zip(fk.COCO_CATEGORIES, [
    "person", "motorbike", "aeroplane", "sofa", "pottedplant", "diningtable", "tvmonitor", "toothbrush"])}


def rows_of(root: Path, split: str = "train", **kw):
    listing = read_coco(root, split, COCO_CLASSES, **kw)
    rows, rejects = validate(listing.candidates, root, len(COCO_CLASSES), progress=False, workers=2)
    return {r.image_id: r for r in rows}, listing.rejects + rejects


def test_category_ids_map_by_name():
    mapping = category_map(fk.COCO_CATEGORIES, COCO_CLASSES, Path("x.json"))
    assert mapping == OURS
    assert mapping[1] == 0 and mapping[90] == 79  # first and last of the official order
    with pytest.raises(ValueError, match="x.json.*'zebra crossing'"):
        category_map([{"id": 3, "name": "zebra crossing"}], COCO_CLASSES, Path("x.json"))


@pytest.mark.parametrize("layout", ["weclip", "official"])
def test_json_labels(tmp_path, layout):
    root = fk.make_coco(tmp_path, "train", {9: [4, 72, 4], 25: [90, 1], 30: []}, layout=layout)
    rows, rejects = rows_of(root, labels_from="json")
    r = rows["COCO_train2014_000000000009"]
    assert r.labels == tuple(sorted({OURS[4], OURS[72]}))
    assert rows["COCO_train2014_000000000025"].labels == (0, 79)
    prefix = "JPEGImages/train" if layout == "weclip" else "train2014"
    assert r.image_path == f"{prefix}/COCO_train2014_000000000009.jpg" and r.mask_path is None
    assert (r.height, r.width, r.split) == (20, 28, "train")
    assert [(x.image_id, x.reason) for x in rejects] == [("COCO_train2014_000000000030", "no_foreground")]


def test_mask_labels_and_names(tmp_path):
    masks = {9: [1, 80, 255], 25: [64]}
    root = fk.make_coco(tmp_path, "val", {9: [1], 25: [5]}, masks=masks)
    rows, rejects = rows_of(root, split="val")
    assert rejects == []
    assert rows["COCO_val2014_000000000009"].labels == (0, 79)
    assert rows["COCO_val2014_000000000009"].mask_path == "SegmentationClass/val/000000000009.png"
    assert rows["COCO_val2014_000000000025"].labels == (63,)  # mask value k = class k-1, not the json's
    json_rows, _ = rows_of(root, split="val", labels_from="json")
    assert json_rows["COCO_val2014_000000000025"].labels == (OURS[5],)
    assert json_rows["COCO_val2014_000000000025"].mask_path == "SegmentationClass/val/000000000025.png"
    assert mask_name("COCO_val2014_000000000025") == "000000000025.png" and mask_name("x") == "x.png"


def test_ids_without_json_come_from_list_or_folder(tmp_path):
    root = fk.make_coco(tmp_path, "train", {9: [1], 25: [1]}, masks={9: [3], 25: [7]})
    (root / "annotations/instances_train2014.json").unlink()
    rows, _ = rows_of(root)
    assert sorted(rows) == ["COCO_train2014_000000000009", "COCO_train2014_000000000025"]
    (root / "train.txt").write_text("COCO_train2014_000000000025 6\n")  # CLIP-ES list format
    rows, _ = rows_of(root, list_file="train.txt")
    assert list(rows) == ["COCO_train2014_000000000025"] and rows["COCO_train2014_000000000025"].labels == (6,)
    with pytest.raises(FileNotFoundError, match="labels_from='json' needs"):
        read_coco(root, "train", COCO_CLASSES, labels_from="json")


def test_list_id_absent_from_json_is_a_reject(tmp_path):
    root = fk.make_coco(tmp_path, "train", {9: [1]})
    (root / "l.txt").write_text("COCO_train2014_000000000009\nCOCO_train2014_000000000077\n")
    rows, rejects = rows_of(root, labels_from="json", list_file="l.txt")
    assert list(rows) == ["COCO_train2014_000000000009"]
    assert [(r.image_id, r.reason) for r in rejects] == [("COCO_train2014_000000000077", "annotation_missing")]


def test_layout_errors(tmp_path):
    root = fk.make_coco(tmp_path, "train", {9: [1]})
    with pytest.raises(FileNotFoundError, match="SegmentationClass/train"):
        read_coco(root, "train", COCO_CLASSES)  # default labels_from='mask' but no masks
    with pytest.raises(FileNotFoundError, match="expected JPEGImages/val/ or val2014/"):
        read_coco(root, "val", COCO_CLASSES, labels_from="json")
    bad = root / "annotations/bad.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="bad.json is not a COCO instances file"):
        read_coco(root, "train", COCO_CLASSES, labels_from="json", annotations="annotations/bad.json")


def test_non_utf8_instances_json_names_the_line(tmp_path):
    root = fk.make_coco(tmp_path, "train", {9: [1]})
    path = root / "annotations/instances_train2014.json"
    path.write_bytes(path.read_bytes().replace(b'"images"', b'\n"im\xe9ages"'))
    with pytest.raises(DataError, match=r"COCO annotation file .*instances_train2014\.json, line 2: byte 0xe9"):
        read_coco(root, "train", COCO_CLASSES, labels_from="json")


def test_folder_listing_refuses_non_utf8_file_names(tmp_path):
    root = fk.make_coco(tmp_path, "train", {9: [1]}, masks={9: [1]})
    (root / "annotations/instances_train2014.json").unlink()
    image = root / "JPEGImages/train/COCO_train2014_000000000009.jpg"
    os.link(image, os.fsencode(image.parent) + b"/caf\xe9.jpg")
    with pytest.raises(DataError, match=r"JPEGImages/train: file name b'caf\\xe9\.jpg' is not UTF-8"):
        read_coco(root, "train", COCO_CLASSES)
    (root / "ids.txt").write_text("COCO_train2014_000000000009\n")  # a list names the ids: the stray file is unused
    rows, rejects = rows_of(root, list_file="ids.txt")
    assert list(rows) == ["COCO_train2014_000000000009"] and rejects == []
