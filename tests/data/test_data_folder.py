"""Folder of images + CSV/JSON labels: names and ids, separators, unknown classes, duplicate ids."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.data import data_fakes as fk

from weclip.pipeline.data.folder import load_class_names, parse_labels, read_folder
from weclip.pipeline.data.manifest import validate
from weclip.pipeline.errors import DataError, StorageError

NAMES = ("cat", "dog", "traffic light", "tree")


def build(root: Path) -> Path:
    for n, name in enumerate(["a.jpg", "sub/b.png", "c.jpg", "a.png"]):
        fk.write_image(root / name, fk.rgb(8, 6 + n, n), fmt="PNG" if name.endswith("png") else "JPEG")
    return root


def rows_of(root: Path, labels_file: str):
    listing = read_folder(root, labels_file, NAMES, split="train")
    rows, rejects = validate(listing.candidates, root, len(NAMES), progress=False, workers=2)
    return {r.image_id: r for r in rows}, listing.rejects + rejects


def test_parse_labels():
    index = {n: i for i, n in enumerate(NAMES)}
    assert parse_labels("dog cat", index) == ((1, 0), [])
    assert parse_labels("traffic light; 3", index) == ((2, 3), [])
    assert parse_labels(["tree", 0, "7"], index) == ((3, 0, 7), [])
    assert parse_labels("Dog bird", index) == ((), ["Dog", "bird"])


def test_csv(tmp_path):
    root = build(tmp_path)
    (root / "labels.csv").write_text("image,labels\n"
                                     "a.jpg,dog cat\n"
                                     "sub/b.png,traffic light;tree\n"
                                     "c.jpg,unicorn\n"
                                     "a.png,1\n")
    rows, rejects = rows_of(root, "labels.csv")
    assert rows["a"].labels == (0, 1) and (rows["a"].height, rows["a"].width) == (8, 6)
    assert rows["sub/b"].labels == (2, 3) and rows["sub/b"].image_path == "sub/b.png"
    assert rows["sub/b"].mask_path is None and rows["sub/b"].split == "train"
    assert {r.image_id: r.reason for r in rejects} == {"c": "unknown_class", "a": "duplicate_id"}
    assert "a.png" in [r.path for r in rejects]


def test_json_dict_and_list_with_mask(tmp_path):
    root = build(tmp_path)
    fk.write_mask(root / "masks/c.png", fk.mask_with(8, 8, [2]))
    (root / "l.json").write_text(json.dumps({"a.jpg": ["tree"], "c.jpg": "cat;dog"}))
    rows, rejects = rows_of(root, "l.json")
    assert rejects == [] and rows["a"].labels == (3,) and rows["c"].labels == (0, 1)
    (root / "l2.json").write_text(json.dumps([{"image": "c.jpg", "labels": [1], "mask": "masks/c.png"},
                                              {"image": "sub/b.png", "labels": [9]},
                                              {"image": "a.jpg", "labels": []}]))
    rows, rejects = rows_of(root, "l2.json")
    assert rows["c"].mask_path == "masks/c.png" and rows["c"].labels == (1,)
    assert {r.image_id: r.reason for r in rejects} == {"sub/b": "label_out_of_range", "a": "no_foreground"}


def test_bad_label_files(tmp_path):
    root = build(tmp_path)
    (root / "x.csv").write_text("file,classes\na.jpg,cat\n")
    with pytest.raises(ValueError, match=r"x.csv lacks the column\(s\) \['image', 'labels'\]"):
        read_folder(root, "x.csv", NAMES)
    (root / "x.txt").write_text("a.jpg cat\n")
    with pytest.raises(ValueError, match="must be .csv or .json"):
        read_folder(root, "x.txt", NAMES)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_folder(root, "nope.csv", NAMES)


def test_class_name_file(tmp_path):
    (tmp_path / "c.txt").write_text("# classes\ncat\n\ntraffic light\n")
    assert load_class_names(tmp_path / "c.txt") == ("cat", "traffic light")
    (tmp_path / "d.txt").write_text("cat\ncat\n")
    with pytest.raises(ValueError, match="twice"):
        load_class_names(tmp_path / "d.txt")


def test_csv_with_byte_order_mark_reads_like_without(tmp_path):
    root = build(tmp_path)
    text = "image,labels\na.jpg,dog cat\nsub/b.png,tree\n"
    (root / "plain.csv").write_text(text, encoding="utf-8")
    (root / "bom.csv").write_text(text, encoding="utf-8-sig")  # what Excel's "CSV UTF-8" writes
    assert (root / "bom.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    assert rows_of(root, "bom.csv") == rows_of(root, "plain.csv")
    assert rows_of(root, "bom.csv")[0]["a"].labels == (0, 1)


def test_non_utf8_label_and_class_files_name_the_line(tmp_path):
    root = build(tmp_path)
    (root / "l.csv").write_bytes("image,labels\na.jpg,cat\nné.jpg,dog\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"label file .*l\.csv, line 3: byte 0xe9 is not UTF-8"):
        read_folder(root, "l.csv", NAMES)
    (root / "l.json").write_bytes(b'{"a.jpg": ["cat"],\n "\xe9.jpg": ["dog"]}')
    with pytest.raises(DataError, match=r"label file .*l\.json, line 2: byte 0xe9"):
        read_folder(root, "l.json", NAMES)
    (root / "c.txt").write_bytes("cat\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"class-name file .*c\.txt, line 2: byte 0xe9"):
        load_class_names(root / "c.txt")


def test_label_file_symlink_loop_is_a_storage_error(tmp_path):
    root = build(tmp_path)
    (root / "loop.csv").symlink_to("loop.csv")
    with pytest.raises(StorageError, match=r"label file .*loop\.csv cannot be read"):
        read_folder(root, "loop.csv", NAMES)
