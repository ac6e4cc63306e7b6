"""weclip: weakly supervised semantic segmentation with a frozen CLIP backbone. See pipeline/api.py."""
from __future__ import annotations

from typing import Any

__all__ = ["load", "open_cache", "Model", "Cache"]


def __getattr__(name: str) -> Any:  # lazy: `import weclip` (and `weclip --help`) stays free of torch
    if name in __all__:
        from weclip.pipeline import api
        return getattr(api, name)
    raise AttributeError(f"module 'weclip' has no attribute {name!r}")
