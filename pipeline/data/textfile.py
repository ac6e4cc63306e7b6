"""Reading the text inputs of a dataset (split lists, label CSV/JSON, class-name files) with one encoding rule.

The files come from other tools (Excel, Notepad, scripts on other machines), so the encoding is explicit rather
than the locale's: UTF-8, with a leading byte-order mark dropped (`utf-8-sig`) instead of being glued to the first
id or column name. Every failure names the file, and a byte that is not UTF-8 also names its line.
"""
from __future__ import annotations

from pathlib import Path

from weclip.pipeline.errors import DataError, StorageError

ENCODING = "utf-8-sig"


class MissingFileError(StorageError, FileNotFoundError):
    """A dataset input that does not exist; still a FileNotFoundError for callers that catch that."""


def line_number(data: bytes, offset: int) -> int:
    """1-based line of the byte at `offset`."""
    return data.count(b"\n", 0, offset) + 1


def read_text(path: str | Path, what: str) -> str:
    """The decoded text of `path`; `what` ("split list", "label file", ...) names the file's role in errors."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MissingFileError(f"{what} {path} does not exist") from None
    except OSError as err:
        raise StorageError(f"{what} {path} cannot be read ({err.strerror or err}); "
                           f"point to a readable file") from None
    try:
        return data.decode(ENCODING)
    except UnicodeDecodeError as err:
        raise DataError(f"{what} {path}, line {line_number(data, err.start)}: byte {data[err.start]:#04x} is not "
                        f"UTF-8; save the file as UTF-8") from None
