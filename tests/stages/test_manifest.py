"""Stage `manifest`: end to end on tiny trees, summary counts, files written, clear failures."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.data import data_fakes as fk

from pipeline.config import ManifestConfig
from pipeline.data.manifest import read_manifest, read_rejects
from pipeline.model.text import COCO_CLASSES, VOC_CLASSES, class_set
from stages.manifest import run

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
    assert m.root == root.resolve() and "stages.manifest.run('voc'" in m.command
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
