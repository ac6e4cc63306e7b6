"""Shared piece of the training tests: a shapes world with its manifest and a feature cache (extract inline)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from weclip.pipeline.config import Config
from weclip.pipeline.data.shapes import generate
from weclip.stages import extract, manifest


def shapes_world(root: Path, cfg: Config, images: int, size: int, model_configs: Sequence[str | Path] = ()
                 ) -> dict[str, Any]:
    """`images` shapes images of `size` px under root/data, their manifest and root/cache extracted with `cfg`."""
    generate(root / "data", "train", images, seed=5, size=size)
    manifest_path = manifest.run("shapes", root / "data", root / "m.parquet", progress=False).manifest_path
    extract.run(cfg, manifest_path, root / "cache", executor="inline", progress=False, model_configs=model_configs)
    return {"root": root, "manifest": manifest_path, "cache": root / "cache", "cfg": cfg}
