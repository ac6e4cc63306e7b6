"""Dataset registry: each layout lists like its reader called by hand, refuses inputs it would ignore."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.data import data_fakes as fk

from weclip.pipeline.data.coco import read_coco
from weclip.pipeline.data.folder import read_folder
from weclip.pipeline.data.manifest import Candidate, Listing
from weclip.pipeline.data.registry import Inputs, Layout, layout, names, resolve_classes
from weclip.pipeline.data.voc import read_voc
from weclip.pipeline.errors import DataError
from weclip.pipeline.model.text import COCO_CLASSES, VOC_CLASSES, class_set


def test_the_four_formats():
    assert names() == ("voc", "coco", "folder", "shapes")
    with pytest.raises(DataError, match=r"unknown manifest format 'ade'; choose one of \('voc', 'coco'"):
        layout("ade")


def test_defaults_are_the_readers_own_with_the_released_defaults(tmp_path):
    voc = fk.make_voc(tmp_path / "voc", {"a": ([8], ["cat"]), "b": ([15], ["dog"])}, split="train_aug")
    assert layout("voc").list(Inputs(voc, "train_aug", VOC_CLASSES)) == read_voc(voc, "train_aug", VOC_CLASSES)
    assert layout("voc").list(Inputs(voc, "train_aug", VOC_CLASSES, labels_from="xml")) == read_voc(
        voc, "train_aug", VOC_CLASSES, labels_from="xml")
    coco = fk.make_coco(tmp_path / "coco", "train", {9: [72]}, masks={9: [3]})
    assert layout("coco").list(Inputs(coco, "train", COCO_CLASSES)) == read_coco(coco, "train", COCO_CLASSES)
    fk.write_image(tmp_path / "f/x.jpg", fk.rgb(5, 5))
    (tmp_path / "f/l.csv").write_text("image,labels\nx.jpg,b\n")
    assert layout("folder").list(Inputs(tmp_path / "f", "train", ("a", "b"), labels_file="l.csv")) == read_folder(
        tmp_path / "f", "l.csv", ("a", "b"))
    assert [(e.split, e.class_set, e.preset) for e in map(layout, names())] == [
        ("train_aug", "voc", "voc"), ("train", "coco", "coco"), ("train", None, None), ("train", "shapes", "shapes")]


def test_inputs_a_layout_would_ignore_are_refused(tmp_path):
    with pytest.raises(DataError, match=r"format 'voc' does not read annotations=; drop it \(it reads: list_file\)"):
        layout("voc").list(Inputs(tmp_path, "train", VOC_CLASSES, annotations="x.json"))
    with pytest.raises(DataError, match="format 'coco' does not read labels_file="):
        layout("coco").list(Inputs(tmp_path, "train", COCO_CLASSES, labels_file="l.csv"))
    with pytest.raises(DataError, match=r"format 'coco' reads labels_from \('mask', 'json'\), not 'xml'"):
        layout("coco").list(Inputs(tmp_path, "train", COCO_CLASSES, labels_from="xml"))
    with pytest.raises(DataError, match="format 'folder' has a single label source; do not pass labels_from"):
        layout("folder").list(Inputs(tmp_path, "train", ("a",), labels_from="mask", labels_file="l.csv"))
    with pytest.raises(DataError, match="format 'folder' needs labels_file="):
        layout("folder").list(Inputs(tmp_path, "train", ("a",)))


def test_classes(tmp_path):
    assert resolve_classes(layout("shapes"), None, None) == (class_set("shapes").classes, "shapes")
    assert resolve_classes(layout("folder"), "voc", None) == (VOC_CLASSES, "voc")
    (tmp_path / "c.txt").write_text("x\ny\n")
    assert resolve_classes(layout("voc"), None, tmp_path / "c.txt") == (("x", "y"), None)
    with pytest.raises(DataError, match="not both"):
        resolve_classes(layout("voc"), "voc", tmp_path / "c.txt")
    with pytest.raises(DataError, match="format 'folder' needs class_set= .* or class_names_file="):
        resolve_classes(layout("folder"), None, None)


def test_a_new_layout_is_one_entry(tmp_path):
    seen: list[Inputs] = []

    def read(inputs: Inputs) -> Listing:
        seen.append(inputs)
        return Listing([Candidate("x", "x.jpg", inputs.split, None, (0,))])

    toy = Layout("toy", read, split="all", class_set="voc", labels_from=("tags", "mask"), options=("list_file",))
    listing = toy.list(Inputs(Path("/d"), "all", VOC_CLASSES, list_file="ids.txt"))
    assert listing.candidates[0].image_id == "x"
    assert seen == [Inputs(Path("/d"), "all", VOC_CLASSES, labels_from="tags", list_file="ids.txt")]
