"""Local files and fsspec URLs: atomic writes, content digests, and telling a URL from a path."""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

from weclip.pipeline.errors import ConfigError, StorageError

REPO_ROOT = Path(__file__).resolve().parents[1]  # the folder holding `pipeline/`


def is_url(location: str | Path) -> bool:
    """True for an fsspec URL other than file:// (s3://, gs://, memory://, ...)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def local_path(location: str | Path) -> Path:
    """A local path or file:// URL as a Path (callers check `is_url` first)."""
    return Path(str(location).removeprefix("file://"))


def join_location(root: str | Path, relative: str) -> str | Path:
    """`root/relative`: a URL string under a URL root (a Path would collapse `s3://` to `s3:/`), else a Path."""
    return f"{str(root).rstrip('/')}/{relative.lstrip('/')}" if is_url(root) else Path(root) / relative


def absolute_location(location: str | Path) -> str:
    """A URL as given; a local path made absolute (workers may run in another folder)."""
    return str(location) if is_url(location) else str(local_path(location).resolve())


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path: str | Path, write: Callable[[Path], object], fsync: bool = False) -> Path:
    """Create `path` by calling `write(tmp)` on a temporary name in the same folder, then renaming it over `path`.

    A crash leaves either the old file or the new one, never a half-written one; the temporary file is removed when
    `write` fails. `fsync` flushes the bytes to disk before the rename (for files a resume depends on)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write` of a UTF-8 text."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def repo_relative(path: str | Path) -> str:
    """`path` relative to the repository root when it lies inside it, else as given: records and rebuild commands
    must not name the folder of the machine they were made on."""
    resolved = Path(path).resolve()
    return resolved.relative_to(REPO_ROOT).as_posix() if resolved.is_relative_to(REPO_ROOT) else str(path)


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/")  # also `s3:/x`, what Path("s3://x") collapses to


def require_local(location: str | Path, what: str) -> Path:
    """`location` as a local Path (a file:// URL stripped), or StorageError for any other URL: run, report and output
    folders are written with local file calls, which would otherwise create a folder named `s3:` and lose the run."""
    text = str(location)
    scheme = _SCHEME.match(text)
    if scheme is None:
        return Path(text)
    if scheme.group(1).lower() == "file":
        return Path(re.sub(r"^file:(//)?", "", text, flags=re.IGNORECASE))
    raise StorageError(f"{what} {text} is a URL, but it must be a local path; write to a local folder and copy it "
                       f"to {scheme.group(1)}:// afterwards (only the feature cache of `weclip extract` and `weclip "
                       f"train --cache` may be a URL)")


def json_object_option(text: str, option: str, example: str) -> dict[str, Any]:
    """The JSON object an option gives inline or as @FILE (which keeps secrets out of the shell history and `ps`).
    The messages never quote the text, which may hold credentials; `example` shows the expected shape."""
    source = option
    if text.startswith("@"):
        source = text[1:]
        try:
            text = Path(source).read_text()
        except OSError as err:
            raise ConfigError(f"{option} file {source} cannot be read ({err.strerror}); give an existing JSON "
                              "file") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{source} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); give a "
                          f"JSON object such as {example}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{source} must be a JSON object such as {example}, got a {type(value).__name__}")
    return value
