"""The cached training source as `weclip train` runs it: batches read in DataLoader worker processes."""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader
from zarr.storage import LocalStore

from tests.cache import cache_fakes as fk
from tests.cache.cache_fakes import ARRAY_NAMES

from weclip.pipeline.cache.store import CacheReader, CacheWriter
from weclip.pipeline.config import preset
from weclip.pipeline.training import sources
from weclip.pipeline.training.schedule import batch_positions

CFG = preset("shapes").replace(train={"batch_size": 3, "seed": 5})


def tiny_cache(root) -> None:
    spec = fk.tiny_spec()
    writer = CacheWriter.create_or_open(str(root), spec, fk.tiny_fingerprint())
    for shard in range(spec.n_shards):
        writer.write_shard(shard, *fk.shard_inputs(spec, shard))
    writer.finalize()


def test_worker_processes_deliver_the_batches_of_the_schedule(tmp_path):
    root = tmp_path / "cache"
    tiny_cache(root)
    rows = np.arange(1, 10)  # row 0 left out, as train.views may leave rows out
    dataset = sources.CachedSteps(str(root), rows, (4, 4), 2, 8, CFG)
    group = zarr.open_group(LocalStore(root), mode="r")
    seen = []
    for item in DataLoader(dataset, batch_size=None, num_workers=2):
        step = int(item["step"])
        want_rows = rows[batch_positions(step, len(rows), 3, 5)[1]]
        np.testing.assert_array_equal(item["rows"], want_rows)
        for name in ARRAY_NAMES:
            assert isinstance(item[name], torch.Tensor), name
            want = np.stack([np.asarray(group[name][r]) for r in want_rows])  # zarr's own reads
            np.testing.assert_array_equal(item[name].numpy(), want, err_msg=name)
        seen.append(step)
    assert seen == list(range(2, 8))


def test_each_worker_opens_its_own_reader_sharing_the_cpus(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    tiny_cache(root)
    dataset = sources.CachedSteps(str(root), np.arange(10), (4, 4), 0, 2, CFG)
    main = dataset._open()
    assert main is dataset._open() and main._batch.threads == (os.cpu_count() or 1)
    monkeypatch.setattr(sources, "get_worker_info", lambda: SimpleNamespace(num_workers=2))
    monkeypatch.setattr(dataset, "_pid", -1)  # as in a forked worker
    path = root / "image" / "c" / "0" / "0" / "0" / "0"
    path.write_bytes(path.read_bytes() + b"x")  # a size the commit record does not state
    worker = dataset._open()
    assert worker is not main and worker._batch.threads == max(1, (os.cpu_count() or 1) // 2)
    assert CacheReader(str(root), check_files=False).damaged() == {0: ["image"]}  # the check it leaves out
