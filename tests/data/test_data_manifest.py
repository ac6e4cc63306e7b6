"""Manifest contract: schema from the JSON, validation reasons, Parquet round trip, rejects file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.data import data_fakes as fk

from weclip.pipeline.data.manifest import (Candidate, ManifestRow, Reject, arrow_schema, manifest_target, mask_labels,
                                    read_id_list, read_manifest, read_rejects, rejects_path, schema_spec, validate,
                                    write_manifest, write_rejects)
from weclip.pipeline.errors import DataError, StorageError


def uint8_trick(mask: np.ndarray) -> tuple[int, ...]:
    """WeCLIP's rule literally (docs/algorithm.md §2.1): unique values minus 1 in uint8, drop 254 and 255."""
    u = np.unique(mask).astype(np.uint8) - np.uint8(1)
    return tuple(int(v) for v in u if v not in (254, 255))


@pytest.mark.parametrize("values", [[1, 15], [20], [], [2, 2, 9, 254], [0, 5, 255]])
def test_mask_labels_match_uint8_trick(values):
    mask = fk.mask_with(12, 40, values)
    assert mask_labels(mask) == uint8_trick(mask)


def test_schema_built_from_json():
    spec = schema_spec()
    schema = arrow_schema()
    assert schema.names == [c["name"] for c in spec["columns"]]
    assert schema.field("labels").type == pa.list_(pa.int16())
    assert schema.field("height").type == pa.int32() and schema.field("mask_path").nullable
    assert not schema.field("image_id").nullable


def test_candidate_needs_a_label_source():
    with pytest.raises(ValueError, match="neither labels nor a mask"):
        Candidate("a", "a.jpg", "train")


def _tree(tmp_path: Path) -> Path:
    fk.write_image(tmp_path / "good.jpg", fk.rgb(10, 14))
    fk.write_mask(tmp_path / "good.png", fk.mask_with(10, 14, [3, 1]))
    fk.write_mask(tmp_path / "small.png", fk.mask_with(9, 14, [3]))
    fk.write_mask(tmp_path / "big.png", fk.mask_with(10, 14, [22]))
    fk.write_mask(tmp_path / "empty_fg.png", fk.mask_with(10, 14, []))
    (tmp_path / "zero.jpg").write_bytes(b"")
    return tmp_path


def test_validate_reasons(tmp_path):
    root = _tree(tmp_path)
    cands = [
        Candidate("ok_mask", "good.jpg", "train", "good.png"),
        Candidate("ok_labels", "good.jpg", "train", None, (4, 0, 4)),
        Candidate("ok_mask", "good.jpg", "train", None, (1,)),  # duplicate id
        Candidate("missing", "nope.jpg", "train", None, (1,)),
        Candidate("zero", "zero.jpg", "train", None, (1,)),
        Candidate("size", "good.jpg", "train", "small.png"),
        Candidate("range_mask", "good.jpg", "train", "big.png"),
        Candidate("range_label", "good.jpg", "train", None, (20,)),
        Candidate("neg_label", "good.jpg", "train", None, (-1,)),
        Candidate("no_fg_mask", "good.jpg", "train", "empty_fg.png"),
        Candidate("no_fg_label", "good.jpg", "train", None, ()),
        Candidate("no_mask", "good.jpg", "train", "gone.png"),
    ]
    rows, rejects = validate(cands, root, num_classes=20, progress=False, workers=3)
    assert rows == [ManifestRow("ok_mask", "good.jpg", "good.png", (0, 2), 10, 14, "train"),
                    ManifestRow("ok_labels", "good.jpg", None, (0, 4), 10, 14, "train")]
    reasons = {r.image_id: r.reason for r in rejects}
    assert reasons == {"ok_mask": "duplicate_id", "missing": "image_missing", "zero": "image_empty",
                       "size": "mask_size_mismatch", "range_mask": "label_out_of_range",
                       "range_label": "label_out_of_range", "neg_label": "label_out_of_range",
                       "no_fg_mask": "no_foreground", "no_fg_label": "no_foreground", "no_mask": "mask_missing"}
    by_id = {r.image_id: r for r in rejects}
    assert by_id["size"].path == "small.png" and "9x14" in by_id["size"].detail
    assert by_id["no_mask"].path == "gone.png"
    assert len(rows) + len(rejects) == len(cands)
    known = set(schema_spec()["rejects"]["reasons"])
    assert {r.reason for r in rejects} <= known


def test_write_read_round_trip(tmp_path):
    rows = [ManifestRow("a", "img/a.jpg", "m/a.png", (0, 7), 10, 20, "val"),
            ManifestRow("b", "img/b.jpg", None, (3,), 11, 21, "val")]
    out = write_manifest(tmp_path / "m.parquet", rows, dataset="voc", class_names=["x"] * 8, root=tmp_path,
                         command="test", class_set="voc")
    m = read_manifest(out)
    assert m.rows == tuple(rows) and len(m) == 2
    assert m.dataset == "voc" and m.class_set == "voc" and m.num_classes == 8 and m.command == "test"
    assert m.root == tmp_path.resolve()
    assert m.image_abspath(rows[0]) == tmp_path.resolve() / "img/a.jpg"
    assert m.mask_abspath(rows[1]) is None
    assert pq.read_schema(out).field("labels").type == pa.list_(pa.int16())
    moved = read_manifest(out, root="/elsewhere")
    assert moved.image_abspath(rows[1]) == Path("/elsewhere/img/b.jpg")


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        read_manifest(tmp_path / "missing.parquet")
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"x": [1]}), plain)
    with pytest.raises(ValueError, match="plain.parquet.*no weclip manifest metadata"):
        read_manifest(plain)
    rows = [ManifestRow("a", "a.jpg", None, (0,), 1, 1, "train")]
    path = write_manifest(tmp_path / "v.parquet", rows, dataset="voc", class_names=["x"], root=tmp_path, command="")
    table = pq.read_table(path)
    key = schema_spec()["metadata_key"].encode()
    meta = json.loads(table.schema.metadata[key])
    meta["schema_version"] = 999
    pq.write_table(table.replace_schema_metadata({key: json.dumps(meta)}), tmp_path / "old.parquet")
    with pytest.raises(ValueError, match="old.parquet.*schema version 999"):
        read_manifest(tmp_path / "old.parquet")
    (tmp_path / "junk.parquet").write_text("junk")
    with pytest.raises(ValueError, match="junk.parquet"):
        read_manifest(tmp_path / "junk.parquet")


def test_rejects_file_round_trip(tmp_path):
    path = rejects_path(tmp_path / "voc_train.parquet")
    assert path.name == "voc_train.rejects.jsonl"
    rejects = [Reject("a", "a.jpg", "image_missing", "x"), Reject("b", "b.png", "no_foreground")]
    write_rejects(path, rejects)
    assert read_rejects(path) == rejects


def test_id_list_formats(tmp_path):
    path = tmp_path / "l.txt"
    path.write_text("# comment\n2007_000032\n\n/JPEGImages/2007_000039.jpg /SegmentationClassAug/2007_000039.png\n"
                    "COCO_train2014_000000000009 45 49\n")
    assert read_id_list(path) == ["2007_000032", "2007_000039", "COCO_train2014_000000000009"]
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_id_list(tmp_path / "nope.txt")


def test_id_list_bom_and_bad_lines_name_the_line(tmp_path):
    path = tmp_path / "l.txt"
    path.write_bytes(b"\xef\xbb\xbf2007_000032\n2007_000039\n")
    assert read_id_list(path) == ["2007_000032", "2007_000039"]
    path.write_text("# ids\n2007_000032\nmy image\n")
    with pytest.raises(DataError, match=r"l\.txt, line 3: id 'my image' contains whitespace"):
        read_id_list(path)
    path.write_text("/JPEGImages/my image.jpg /SegmentationClassAug/my image.png\n")
    with pytest.raises(DataError, match=r"l\.txt, line 1: id .*contains whitespace"):
        read_id_list(path)
    path.write_bytes(b"a\n\nb\xff\n")
    with pytest.raises(DataError, match=r"l\.txt, line 3: byte 0xff is not UTF-8"):
        read_id_list(path)
    path.write_text("# only a comment\n")
    with pytest.raises(DataError, match="contains no ids"):
        read_id_list(path)


def test_symlink_loops_are_rejects(tmp_path):
    root = _tree(tmp_path)
    (root / "loop.jpg").symlink_to("loop.jpg")
    (root / "x.png").symlink_to("y.png")
    (root / "y.png").symlink_to("x.png")
    cands = [Candidate("img", "loop.jpg", "train", None, (1,)), Candidate("mask", "good.jpg", "train", "x.png"),
             Candidate("ok", "good.jpg", "train", "good.png")]
    rows, rejects = validate(cands, root, num_classes=20, progress=False, workers=2)
    assert [r.image_id for r in rows] == ["ok"]
    assert [(r.image_id, r.path, r.reason) for r in rejects] == [("img", "loop.jpg", "image_missing"),
                                                                  ("mask", "x.png", "mask_missing")]
    assert all("symbolic links" in r.detail for r in rejects)


def test_manifest_target(tmp_path):
    assert manifest_target(tmp_path / "m.parquet", "voc", "val") == tmp_path / "m.parquet"
    assert manifest_target(tmp_path / "new/dir", "voc", "val") == tmp_path / "new/dir/voc_val.parquet"
    (tmp_path / "d.parquet").mkdir()
    with pytest.raises(StorageError, match=r"cannot write .*d\.parquet: it is an existing folder"):
        manifest_target(tmp_path / "d.parquet", "voc", "val")
    (tmp_path / "o/voc_val.parquet").mkdir(parents=True)
    with pytest.raises(StorageError, match=r"cannot write .*o/voc_val\.parquet: it is an existing folder"):
        manifest_target(tmp_path / "o", "voc", "val")
    (tmp_path / "r/voc_val.rejects.jsonl").mkdir(parents=True)
    with pytest.raises(StorageError, match=r"cannot write .*r/voc_val\.rejects\.jsonl: it is an existing folder"):
        manifest_target(tmp_path / "r", "voc", "val")
    (tmp_path / "f").write_text("")
    for out in (tmp_path / "f", tmp_path / "f/sub/m.parquet"):
        with pytest.raises(StorageError, match=r"f is a file, not a folder"):
            manifest_target(out, "voc", "val")


def test_errors_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="neither labels nor a mask"):
        Candidate("a", "a.jpg", "train")
    with pytest.raises(DataError, match="must end in .parquet"):
        write_manifest(tmp_path / "m.pq", [], dataset="voc", class_names=["x"], root=tmp_path, command="")
    (tmp_path / "junk.parquet").write_text("junk")
    with pytest.raises(DataError, match="junk.parquet is not a readable Parquet file"):
        read_manifest(tmp_path / "junk.parquet")
    with pytest.raises(StorageError, match="manifest .*missing.parquet does not exist"):
        read_manifest(tmp_path / "missing.parquet")
