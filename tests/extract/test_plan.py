"""The extract plan's image paths: absolute, as `Path.resolve()` makes them, for 100k images at the cost of a few."""
from __future__ import annotations

import os
from pathlib import Path

from weclip.pipeline.extract.plan import resolved_paths


def test_resolved_paths_equal_path_resolve(tmp_path, monkeypatch):
    data = tmp_path / "disk" / "coco"
    (data / "train2014").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    root = tmp_path / "datasets"
    root.mkdir()
    os.symlink(data, root / "coco")  # a symlinked dataset folder, as on a cluster's shared disk
    relative = ["coco/train2014/a.jpg", "coco/train2014/b.jpg", "coco/./train2014/../train2014/c.jpg", "top.jpg",
                "coco//train2014/f.jpg", "/g.jpg",
                "../other/d.jpg", str(tmp_path / "elsewhere" / "e.jpg")]
    monkeypatch.chdir(tmp_path)
    for given_root in (root, Path("datasets")):  # a recorded root may be relative to where the driver runs
        want = [str((given_root / p).resolve()) for p in relative]
        assert resolved_paths(given_root, relative) == want
    assert resolved_paths(root, relative)[0] == str(data / "train2014" / "a.jpg")
