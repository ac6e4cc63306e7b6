"""Text inputs of a dataset: explicit UTF-8, a byte-order mark dropped, every failure naming the file (and line)."""
from __future__ import annotations

import pytest

from weclip.pipeline.data.textfile import MissingFileError, line_number, read_text
from weclip.pipeline.errors import DataError, StorageError


def test_utf8_with_or_without_bom(tmp_path):
    (tmp_path / "plain.txt").write_bytes("café\nb\n".encode())
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + "café\nb\n".encode())
    assert read_text(tmp_path / "plain.txt", "list") == read_text(tmp_path / "bom.txt", "list") == "café\nb\n"


def test_non_utf8_byte_names_file_and_line(tmp_path):
    path = tmp_path / "l.txt"
    path.write_bytes(b"a\nb\nc\xe9d\ne\n")  # Latin-1 'é' on line 3
    with pytest.raises(DataError, match=r"split list .*l\.txt, line 3: byte 0xe9 is not UTF-8"):
        read_text(path, "split list")


def test_line_number_counts_newlines_before_the_offset():
    data = b"ab\ncd\n\nxy"
    assert [line_number(data, i) for i in (0, 2, 3, 6, 7, 9)] == [1, 1, 2, 3, 4, 4]


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(MissingFileError, match="label file .*nope.csv does not exist") as err:
        read_text(tmp_path / "nope.csv", "label file")
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, StorageError)
    (tmp_path / "loop.csv").symlink_to("loop.csv")
    with pytest.raises(StorageError, match="label file .*loop.csv cannot be read .*symbolic links"):
        read_text(tmp_path / "loop.csv", "label file")
    with pytest.raises(StorageError, match=r"cannot be read \(Is a directory\)"):
        read_text(tmp_path, "label file")
