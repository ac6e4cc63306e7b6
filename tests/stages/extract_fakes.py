"""Shared pieces of the extract-stage tests: a tiny VOC-like tree and its manifest, the tiny-ViT config, checksums of
a finished cache, and a way to make a worker process SIGKILL itself inside a shard."""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from tests.data import data_fakes as fk

from tests import conftest
from weclip.pipeline.cache import store
from weclip.pipeline.cache.store import CacheReader
from weclip.pipeline.config import Config
from weclip.stages import manifest as manifest_stage

TESTS = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(conftest.TINY_CONFIG)  # passed on to Ray workers and child processes
# Mask pixel values per image (label = value - 1); up to 3 classes, so K_max = 3.
IMAGES = {"a": [8, 12], "b": [15], "c": [3, 5, 9], "d": [1], "e": [20, 2]}


def tiny_config(**extract: Any) -> Config:
    """Tiny ViT, crop 48 (grid 3×3, pos-emb resized from 4×4), 2 views, shards of 3 samples (an image's views
    then straddle shards), batches of 2, features of blocks 1–2 and attention of blocks 2–3 (3 = the grad block)."""
    return Config().replace(model={"name": "tiny-vit", "pretrained": None}, aug={"crop": 48},
                            extract={"views": 2, "samples_per_shard": 3, "batch_size": 2, "feature_layers": [1, 2],
                                     "attn_layers": [2, 3], **extract})


def make_dataset(root: Path, images: dict[str, list[int]] = IMAGES) -> Path:
    """A VOC tree of 40×56 JPEGs and its manifest (labels from the masks); returns the manifest path."""
    tree = fk.make_voc(root / "voc", {i: (values, []) for i, values in images.items()}, split="train_aug",
                       size=(40, 56))
    return manifest_stage.run("voc", tree, root / "manifest.parquet", progress=False).manifest_path


def checksums(cache: str | Path) -> tuple[dict[int, str], pa.Table]:
    """Per-shard checksums of the committed shards and the sample index of a cache."""
    reader = CacheReader(cache)
    shards = reader.tables.shards.to_pylist()
    return {s["shard"]: s["checksum"] for s in shards if s["status"] == "committed"}, reader.index


DeathPoint = Literal["after_some_arrays", "before_commit"]


def die_inside_shard(shard: int, point: DeathPoint, once_marker: str | None = None) -> None:
    """Make this process SIGKILL itself while writing `shard`: right after the shard file of `attn` is written
    (features and attn on disk, the other arrays not), or after every array but before the commit record. The hooks
    wrap the cache writer's own steps; nothing in the stage knows about them. With `once_marker`, only the first
    process to get there dies (it creates that file), so a retried task then succeeds."""
    def die() -> None:
        if once_marker is not None:
            try:
                open(once_marker, "x").close()
            except FileExistsError:
                return
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "after_some_arrays":
        size = store._size

        def size_then_die(s: Any, key: str) -> int:
            n = size(s, key)
            if key.split("/")[:3] == ["attn", "c", str(shard)]:
                die()
            return n
        store._size = size_then_die
    else:
        commit = store.CacheWriter._write_commit

        def commit_or_die(self: store.CacheWriter, record: Any) -> None:
            if record.shard == shard:
                die()
            commit(self, record)
        store.CacheWriter._write_commit = commit_or_die


DIE_ENV = "WECLIP_TEST_DIE"  # "<shard>:<point>:<once marker path>"


def ray_worker_setup() -> None:
    """Ray `worker_process_setup_hook`: `die_inside_shard` as the DIE_ENV variable says."""
    shard, point, marker = os.environ[DIE_ENV].split(":", 2)
    die_inside_shard(int(shard), point, marker)  # type: ignore[arg-type]
