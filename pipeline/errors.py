"""One family for every error weclip raises on purpose.

The CLI prints a `WeclipError` as one `error: <message>` line and exits 2 (`--debug` shows the traceback); any
other exception is a bug and keeps its traceback. Each class also derives from the builtin it replaces, so code
that caught `ValueError` or `RuntimeError` before still catches it.
"""
from __future__ import annotations


class WeclipError(Exception):
    """Base of the errors raised on purpose: the message names the bad input and the fix."""


class ConfigError(WeclipError, ValueError):
    """A config field has a wrong type, value or combination."""


class DataError(WeclipError, ValueError):
    """A dataset, manifest, list file or image cannot be used as given."""


class StorageError(WeclipError, OSError):
    """A file, folder or URL cannot be read or written as asked (missing, read-only, of the wrong kind)."""


class BackboneError(WeclipError, ValueError):
    """The frozen backbone cannot be loaded or does not fit the request (weights, layers, patch size)."""


class ExtractError(WeclipError, RuntimeError):
    """An extraction run cannot start or a shard failed."""


class CacheError(WeclipError, ValueError):
    """A feature cache is missing, damaged, incomplete, or was made with other settings."""


class CheckpointError(WeclipError, ValueError):
    """A checkpoint file is missing, damaged or of another format."""


class TrainError(WeclipError, ValueError):
    """The training inputs (cache, checkpoint, output folder, config) cannot be used as asked."""


class EvalError(WeclipError, ValueError):
    """The evaluation inputs (checkpoint, manifest, images) cannot be used as asked."""


class InferError(WeclipError, ValueError):
    """The input or output folder of `weclip infer` cannot be used as asked."""


class CrfError(WeclipError, RuntimeError):
    """The DenseCRF of an image failed on every attempt; the message names the image."""


class MissingFile(StorageError, FileNotFoundError):
    """A file or folder the command needs does not exist; the message names it."""
