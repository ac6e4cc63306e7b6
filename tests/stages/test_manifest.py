"""Stage `manifest`: end to end on tiny trees, summary counts, files written, clear failures."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from tests.data import data_fakes as fk

from weclip.pipeline.config import ManifestConfig
from weclip.pipeline.data import registry
from weclip.pipeline.data.manifest import read_manifest, read_rejects
from weclip.pipeline.errors import DataError, StorageError
from weclip.pipeline.model.text import COCO_CLASSES, VOC_CLASSES, class_set
from weclip.stages.manifest import run

CFG = ManifestConfig(decode_threads=2)


def test_voc_end_to_end(tmp_path):
    root = fk.make_voc(tmp_path / "voc", {"a": ([8, 12], ["cat", "dog"]), "b": ([15], ["person"]),
                                          "c": ([], []), "d": ([8], ["cat"])}, split="train_aug")
    (root / "JPEGImages/d.jpg").write_bytes(b"")
    s = run("voc", root, tmp_path / "out", cfg=CFG, progress=False)
    assert s.manifest_path == tmp_path / "out/voc_train_aug.parquet" and s.split == "train_aug"
    assert (s.images, s.rejected) == (2, {"image_empty": 1, "no_foreground": 1})
    assert s.class_counts["cat"] == 1 and s.class_counts["person"] == 1 and sum(s.class_counts.values()) == 3
    assert list(s.class_counts) == list(VOC_CLASSES)
    m = read_manifest(s.manifest_path)
    assert [r.image_id for r in m.rows] == ["a", "b"] and m.rows[0].labels == (7, 11)
    assert m.dataset == "voc" and m.class_set == "voc" and m.class_names == VOC_CLASSES
    assert m.root == root.resolve() and "weclip.stages.manifest.run('voc'" in m.command
    assert {r.reason for r in read_rejects(s.rejects_path)} == {"image_empty", "no_foreground"}
    assert json.loads(json.dumps(s.to_dict()))["images"] == 2


def test_xml_labels_and_list_file(tmp_path):
    root = fk.make_voc(tmp_path, {"a": ([8], ["dog"])}, split="val")
    s = run("voc", root, tmp_path / "m.parquet", split="val", labels_from="xml", cfg=CFG, progress=False,
            command="weclip manifest voc")
    assert s.manifest_path == tmp_path / "m.parquet"
    m = read_manifest(s.manifest_path)
    assert m.rows[0].labels == (VOC_CLASSES.index("dog"),) and m.command == "weclip manifest voc"


def test_shapes_uses_shapes_class_set(tmp_path):
    shapes = class_set("shapes")
    root = fk.make_voc(tmp_path, {"s0": ([1, shapes.num_classes], []), "s1": ([shapes.num_classes + 1], [])})
    s = run("shapes", root, tmp_path, cfg=CFG, progress=False)
    m = read_manifest(s.manifest_path)
    assert m.class_names == shapes.classes and m.dataset == "shapes"
    assert m.rows[0].labels == (0, shapes.num_classes - 1) and s.rejected == {"label_out_of_range": 1}


def test_coco_json(tmp_path):
    root = fk.make_coco(tmp_path, "train", {9: [72], 10: []})
    s = run("coco", root, tmp_path, labels_from="json", cfg=CFG, progress=False)
    assert s.images == 1 and s.rejected == {"no_foreground": 1} and s.class_counts["tvmonitor"] == 1
    assert len(s.class_counts) == len(COCO_CLASSES)


def test_folder_with_class_file(tmp_path):
    fk.write_image(tmp_path / "x.jpg", fk.rgb(5, 5))
    (tmp_path / "classes.txt").write_text("apple\npear\n")
    (tmp_path / "l.csv").write_text("image,labels\nx.jpg,pear\n")
    s = run("folder", tmp_path, tmp_path / "f.parquet", labels_file="l.csv", class_names_file=tmp_path / "classes.txt",
            cfg=CFG, progress=False)
    m = read_manifest(s.manifest_path)
    assert m.class_names == ("apple", "pear") and m.class_set is None and m.rows[0].labels == (1,)


def test_clear_failures(tmp_path):
    with pytest.raises(ValueError, match="unknown manifest format"):
        run("ade", tmp_path, tmp_path)
    with pytest.raises(ValueError, match="needs class_set"):
        run("folder", tmp_path, tmp_path, labels_file="l.csv")
    with pytest.raises(ValueError, match="needs labels_file"):
        run("folder", tmp_path, tmp_path, class_set="voc")
    with pytest.raises(ValueError, match="unknown class set 'nope'"):
        run("voc", tmp_path, tmp_path, class_set="nope")
    root = fk.make_voc(tmp_path / "v", {"c": ([], [])})
    with pytest.raises(ValueError, match="all 1 were rejected; see .*rejects.jsonl"):
        run("voc", root, tmp_path / "o", split="train", cfg=CFG, progress=False)
    assert read_rejects(tmp_path / "o/voc_train.rejects.jsonl")[0].reason == "no_foreground"


def test_symlink_loop_image_is_a_recorded_reject(tmp_path):
    root = fk.make_voc(tmp_path / "voc", {"a": ([8], []), "b": ([15], []), "c": ([8], [])})
    (root / "JPEGImages/b.jpg").unlink()
    (root / "JPEGImages/b.jpg").symlink_to("b.jpg")
    (root / "JPEGImages/c.jpg").unlink()
    (root / "JPEGImages/c.jpg").symlink_to("c2.jpg")
    (root / "JPEGImages/c2.jpg").symlink_to("c.jpg")
    s = run("voc", root, tmp_path / "m.parquet", split="train", cfg=CFG, progress=False)
    assert (s.images, s.rejected) == (1, {"image_missing": 2})
    assert [(r.image_id, r.path) for r in read_rejects(s.rejects_path)] == [("b", "JPEGImages/b.jpg"),
                                                                          ("c", "JPEGImages/c.jpg")]


def test_output_that_is_a_folder_fails_before_any_work(tmp_path):
    root = fk.make_voc(tmp_path / "voc", {"a": ([8], [])})
    (tmp_path / "m.parquet").mkdir()
    with pytest.raises(StorageError, match=r"cannot write .*m\.parquet: it is an existing folder; remove it"):
        run("voc", root, tmp_path / "m.parquet", split="train", cfg=CFG, progress=False)
    assert list((tmp_path / "m.parquet").iterdir()) == [] and not (tmp_path / "m.rejects.jsonl").exists()
    (tmp_path / "out/voc_train.parquet").mkdir(parents=True)
    with pytest.raises(StorageError, match=r"out/voc_train\.parquet: it is an existing folder"):
        run("voc", root, tmp_path / "out", split="train", cfg=CFG, progress=False)


def test_list_and_csv_problems_name_file_and_line(tmp_path):
    root = fk.make_voc(tmp_path / "voc", {"a": ([8], []), "my": ([8], [])})
    (root / "ids.txt").write_text("a\nmy image\n")
    with pytest.raises(DataError, match=r"ids\.txt, line 2: id 'my image' contains whitespace"):
        run("voc", root, tmp_path, list_file="ids.txt", cfg=CFG, progress=False)
    (root / "ids.txt").write_bytes(b"a\n\xff\n")
    with pytest.raises(DataError, match=r"ids\.txt, line 2: byte 0xff is not UTF-8"):
        run("voc", root, tmp_path, list_file="ids.txt", cfg=CFG, progress=False)
    fk.write_image(tmp_path / "f/x.jpg", fk.rgb(5, 5))
    (tmp_path / "f/l.csv").write_text("image,labels\nx.jpg,dog\n", encoding="utf-8-sig")
    s = run("folder", tmp_path / "f", tmp_path / "f.parquet", labels_file="l.csv", class_set="voc", cfg=CFG,
            progress=False)
    assert read_manifest(s.manifest_path).rows[0].labels == (VOC_CLASSES.index("dog"),)


def test_a_registered_layout_needs_no_stage_change(tmp_path, monkeypatch):
    # the VOC reader under another name, whose split and label source default to 'every' and the XML
    root = fk.make_voc(tmp_path / "toy", {"a": ([15], ["cat"])}, split="every")  # mask says person, XML cat
    toy = replace(registry.layout("voc"), name="toy", split="every", labels_from=("xml", "mask"))
    monkeypatch.setitem(registry.LAYOUTS, "toy", toy)
    s = run("toy", root, tmp_path, cfg=CFG, progress=False)
    m = read_manifest(s.manifest_path)
    assert s.manifest_path == tmp_path / "toy_every.parquet" and (m.dataset, m.class_set) == ("toy", "voc")
    assert m.rows[0].labels == (VOC_CLASSES.index("cat"),)
    s = run("toy", root, tmp_path / "mask.parquet", labels_from="mask", cfg=CFG, progress=False)
    assert read_manifest(s.manifest_path).rows[0].labels == (VOC_CLASSES.index("person"),)
