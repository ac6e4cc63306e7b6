"""VOC reader on a tiny fake VOC tree: labels from mask (WeCLIP) vs XML (CLIP-ES), layouts, rejects."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from tests.data import data_fakes as fk

from weclip.pipeline.data.manifest import validate
from weclip.pipeline.data.voc import read_voc
from weclip.pipeline.errors import DataError
from weclip.pipeline.model.text import VOC_CLASSES

CAT, DOG, PERSON = VOC_CLASSES.index("cat"), VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")


def build(root: Path, mask_dir: str = "SegmentationClassAug") -> Path:
    # masks hold class_id + 1; the XML of "b" disagrees with its mask on purpose (dog+cat vs person+cat+person)
    return fk.make_voc(root, {
        "2007_000001": ([CAT + 1, DOG + 1], ["dog", "cat"]),
        "2007_000002": ([PERSON + 1, CAT + 1], ["person", "cat", "person"]),
        "2007_000003": ([20], ["tvmonitor"]),
    }, mask_dir=mask_dir)


def rows_of(root: Path, **kw):
    listing = read_voc(root, "train", VOC_CLASSES, **kw)
    rows, rejects = validate(listing.candidates, root, len(VOC_CLASSES), progress=False, workers=2)
    return {r.image_id: r for r in rows}, listing.rejects + rejects


@pytest.mark.parametrize("mask_dir", ["SegmentationClassAug", "SegmentationClass"])
def test_labels_from_mask(tmp_path, mask_dir):
    rows, rejects = rows_of(build(tmp_path, mask_dir))
    assert rejects == []
    assert rows["2007_000001"].labels == tuple(sorted((CAT, DOG)))
    assert rows["2007_000002"].labels == tuple(sorted((CAT, PERSON)))
    assert rows["2007_000003"].labels == (19,)
    r = rows["2007_000001"]
    assert (r.image_path, r.mask_path, r.height, r.width, r.split) == (
        "JPEGImages/2007_000001.jpg", f"{mask_dir}/2007_000001.png", 24, 32, "train")


def test_labels_from_xml_differ_where_xml_does(tmp_path):
    root = build(tmp_path)
    # XML of 000001 says only "dog","cat"; make 000003's XML name a different class than its mask
    fk.write_xml(root / "Annotations/2007_000003.xml", ["horse"], 24, 32)
    rows, rejects = rows_of(root, labels_from="xml")
    assert rejects == []
    assert rows["2007_000002"].labels == tuple(sorted((PERSON, CAT)))  # deduplicated, ascending
    assert rows["2007_000003"].labels == (VOC_CLASSES.index("horse"),)
    assert rows["2007_000003"].mask_path == "SegmentationClassAug/2007_000003.png"
    mask_rows, _ = rows_of(root, labels_from="mask")
    assert mask_rows["2007_000003"].labels == (19,)


def test_xml_mode_without_mask_is_trainable(tmp_path):
    root = build(tmp_path)
    (root / "SegmentationClassAug/2007_000002.png").unlink()
    rows, rejects = rows_of(root, labels_from="xml")
    assert rejects == [] and rows["2007_000002"].mask_path is None
    rows, rejects = rows_of(root, labels_from="mask")
    assert [(r.image_id, r.reason) for r in rejects] == [("2007_000002", "mask_missing")]


def test_xml_problems_are_rejects(tmp_path):
    root = build(tmp_path)
    fk.write_xml(root / "Annotations/2007_000001.xml", ["dog", "unicorn"], 24, 32)
    (root / "Annotations/2007_000002.xml").write_text("<annotation><object>")
    (root / "Annotations/2007_000003.xml").unlink()
    rows, rejects = rows_of(root, labels_from="xml")
    assert rows == {}
    assert {r.image_id: r.reason for r in rejects} == {
        "2007_000001": "unknown_class", "2007_000002": "annotation_corrupt", "2007_000003": "annotation_missing"}
    assert "unicorn" in rejects[0].detail


def test_list_file_and_missing_layout_errors(tmp_path):
    root = build(tmp_path)
    (root / "train_aug.txt").write_text("/JPEGImages/2007_000003.jpg /SegmentationClassAug/2007_000003.png\n")
    rows, _ = rows_of(root, list_file="train_aug.txt")
    assert list(rows) == ["2007_000003"]
    with pytest.raises(FileNotFoundError, match="no list file for split 'val'"):
        read_voc(root, "val", VOC_CLASSES)
    with pytest.raises(ValueError, match="labels_from"):
        read_voc(root, "train", VOC_CLASSES, labels_from="json")


def test_no_mask_folder_is_a_clear_error(tmp_path):
    root = build(tmp_path)
    (root / "SegmentationClassAug").rename(root / "elsewhere")
    with pytest.raises(FileNotFoundError, match="SegmentationClassAug or SegmentationClass"):
        read_voc(root, "train", VOC_CLASSES)


def test_bad_files_become_rejects_with_reasons(tmp_path):
    root = fk.make_voc(tmp_path, {
        "ok": ([3], []), "missing": ([3], []), "zero": ([3], []), "corrupt": ([3], []), "png_as_jpg": ([3], []),
        "cmyk": ([3], []), "rgba": ([3], []), "gray": ([3], []), "size": ([3], []), "range": ([3, 40], []),
        "bg_only": ([], []),
    })
    img = root / "JPEGImages"
    (img / "missing.jpg").unlink()
    (img / "zero.jpg").write_bytes(b"")
    data = (img / "corrupt.jpg").read_bytes()
    (img / "corrupt.jpg").write_bytes(data[: len(data) // 3])
    arr = fk.rgb(24, 32, seed=9)
    fk.write_image(img / "png_as_jpg.jpg", arr, fmt="PNG")
    fk.write_image(img / "cmyk.jpg", arr, mode="CMYK")
    fk.write_image(img / "rgba.jpg", arr, fmt="PNG", mode="RGBA")
    fk.write_image(img / "gray.jpg", arr, mode="L")
    fk.write_mask(root / "SegmentationClassAug/size.png", fk.mask_with(32, 24, [3]))
    rows, rejects = rows_of(root)
    assert sorted(rows) == ["cmyk", "gray", "ok", "png_as_jpg", "rgba"]
    assert all(r.labels == (2,) and (r.height, r.width) == (24, 32) for r in rows.values())
    assert {r.image_id: r.reason for r in rejects} == {
        "missing": "image_missing", "zero": "image_empty", "corrupt": "image_corrupt",
        "size": "mask_size_mismatch", "range": "label_out_of_range", "bg_only": "no_foreground"}
    with Image.open(img / "png_as_jpg.jpg") as im:
        assert im.format == "PNG"


def test_png_images_are_found(tmp_path):
    root = build(tmp_path)
    jpg = root / "JPEGImages/2007_000001.jpg"
    fk.write_image(jpg.with_suffix(".png"), fk.rgb(24, 32), fmt="PNG")
    jpg.unlink()
    rows, rejects = rows_of(root)
    assert rejects == [] and rows["2007_000001"].image_path == "JPEGImages/2007_000001.png"


def test_unreadable_xml_is_a_reject(tmp_path):
    root = build(tmp_path)
    xml = root / "Annotations/2007_000001.xml"
    xml.unlink()
    xml.symlink_to(xml.name)
    rows, rejects = rows_of(root, labels_from="xml")
    assert sorted(rows) == ["2007_000002", "2007_000003"]
    assert [(r.image_id, r.path, r.reason) for r in rejects] == [
        ("2007_000001", "Annotations/2007_000001.xml", "annotation_missing")]
    assert "symbolic links" in rejects[0].detail


def test_bad_list_lines_name_the_list_and_line(tmp_path):
    root = build(tmp_path)
    (root / "spaces.txt").write_text("2007_000001\n2007_000002 copy\n")
    with pytest.raises(DataError, match=r"spaces\.txt, line 2: id '2007_000002 copy' contains whitespace"):
        read_voc(root, "train", VOC_CLASSES, list_file="spaces.txt")
    (root / "latin1.txt").write_bytes("2007_000001\ncafé\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt, line 2: byte 0xe9 is not UTF-8"):
        read_voc(root, "train", VOC_CLASSES, list_file="latin1.txt")
