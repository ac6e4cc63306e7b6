"""Stage `extract --dry-run`: the plan's bill without weights, images or writes, against a real run's cache."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.stages import extract_fakes as xf

from tests.test_cli import run_cli, user_error
from weclip.pipeline.cache.store import CacheReader
from weclip.pipeline.errors import ConfigError
from weclip.stages import extract

CFG = xf.tiny_config(compressor="none", features_compressor="none", attn_compressor="none")  # 8-bit, uncompressed


@pytest.fixture(scope="module")
def manifest_path(tmp_path_factory) -> Path:
    return xf.make_dataset(tmp_path_factory.mktemp("dry_run_data"))


def test_dry_run_loads_no_weights_reads_no_image_and_writes_nothing(tmp_path, monkeypatch):
    images = xf.make_dataset(tmp_path / "data")
    for jpeg in (tmp_path / "data").rglob("*.jpg"):
        jpeg.unlink()  # a dry run only plans: it never opens an image

    def no_weights(*args, **kwargs):
        raise AssertionError("a dry run loaded the backbone")
    monkeypatch.setattr(extract, "load_backbone", no_weights)
    out = tmp_path / "out" / "cache"
    bill = extract.run(CFG, images, out, executor="inline", progress=False, model_configs=[xf.TINY_CONFIG],
                       dry_run=True, views_per_s=4.0)
    assert not (tmp_path / "out").exists()
    assert (bill.images, bill.views, bill.shards, bill.k_max, bill.seconds) == (5, 10, 4, 3, 2.5)


def test_uncompressed_bill_is_the_cache_a_run_writes(manifest_path, tmp_path):
    bill = extract.run(CFG, manifest_path, tmp_path / "cache", progress=False, model_configs=[xf.TINY_CONFIG],
                       dry_run=True)
    summary = extract.run(CFG, manifest_path, tmp_path / "cache", executor="inline", progress=False,
                          model_configs=[xf.TINY_CONFIG])
    shards = CacheReader(tmp_path / "cache").tables.shards.to_pylist()
    on_disk = {a.name: sum(s[f"bytes_{a.name}"] for s in shards) for a in bill.arrays}
    assert {a.name: a.stored_bytes for a in bill.arrays} == on_disk
    assert bill.exact and bill.raw_bytes_per_view == summary.raw_bytes_per_view
    assert (bill.views, bill.shards) == (summary.views_planned, summary.shards)


def test_views_per_s_without_dry_run_is_refused(manifest_path, tmp_path):
    with pytest.raises(ConfigError, match="--views-per-s prices a dry run"):
        extract.run(CFG, manifest_path, tmp_path / "cache", executor="inline", progress=False,
                    model_configs=[xf.TINY_CONFIG], views_per_s=3.0)
    assert not (tmp_path / "cache").exists()


def test_cli_dry_run_prints_the_bill_of_the_voc_preset(manifest_path, tmp_path, capsys):
    out = tmp_path / "cache"
    code, stdout, _ = run_cli(["extract", str(manifest_path), "-o", str(out), "--dry-run", "--views-per-s", "2"])
    assert code == 0 and not out.exists()
    assert "5 images x 4 views = 20 views in 1 shards of 64" in stdout
    assert "features     11x400x768" in stdout and "time: 0:00:10 (h:mm:ss) at 2 views/s" in stdout
    assert "--views-per-s prices a dry run" in user_error(["extract", str(manifest_path), "-o", str(out),
                                                           "--views-per-s", "2"], capsys)
