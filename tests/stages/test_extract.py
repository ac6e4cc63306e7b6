"""Stage `extract`: plan, cache contents vs independent recomputation, resume, refusals, fsspec URL.

Ray: test_extract_ray.py; killed workers and unreadable images: test_extract_faults.py."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.stages import extract_fakes as xf

from tests.conftest import build_tiny_backbone
from weclip.pipeline.data.augment import ViewParams, apply_view, draw_view, normalise, valid_mask
from weclip.pipeline.cache.schema import commit_key
from weclip.pipeline.cache.store import CacheReader, FingerprintMismatch
from weclip.pipeline.model.cam import softmax_gradcam
from weclip.pipeline.data.images import load_rgb
from weclip.pipeline.data.manifest import read_manifest
from weclip.pipeline.extract.plan import make_plan
from weclip.pipeline.model.text import class_set, text_embeddings
from weclip.stages import extract

CFG = xf.tiny_config()


@pytest.fixture(scope="module")
def manifest_path(tmp_path_factory) -> Path:
    return xf.make_dataset(tmp_path_factory.mktemp("extract_data"))


@pytest.fixture(scope="module")
def inline(manifest_path, tmp_path_factory) -> tuple[extract.ExtractSummary, Path]:
    """One uninterrupted inline run, shared read-only by the tests below."""
    out = tmp_path_factory.mktemp("extract_inline") / "cache"
    return extract.run(CFG, manifest_path, out, executor="inline", progress=False,
                       model_configs=[xf.TINY_CONFIG]), out


def test_plan_depends_only_on_manifest_and_config(manifest_path):
    manifest = read_manifest(manifest_path)
    plan = make_plan(manifest, CFG)
    tasks = [plan.task(s) for s in range(plan.n_shards)]
    assert (plan.total_samples, plan.n_shards, plan.k_max) == (10, 4, 3)
    assert [s.row for t in tasks for s in t.samples] == list(range(10))
    assert [s.sample_id for t in tasks for s in t.samples] == [f"{i}#{v}" for i in "abcde" for v in (0, 1)]
    assert [s.sample_id for s in tasks[1].samples] == ["b#1", "c#0", "c#1"]  # b's views straddle shards 0 and 1
    assert tasks[3].samples[0].image.labels == (1, 19) and Path(tasks[3].samples[0].image.path).is_absolute()
    assert plan == make_plan(read_manifest(manifest_path), CFG.replace(extract={"max_retries": 9}))
    assert make_plan(manifest, CFG, limit=2).total_samples == 4
    with pytest.raises(IndexError, match="outside the plan"):
        plan.task(4)


def test_inline_run_writes_the_whole_plan(inline, manifest_path):
    summary, out = inline
    assert (summary.views_written, summary.views_skipped, summary.views_in_cache) == (10, 0, 10)
    assert (summary.shards, summary.shards_written, summary.shards_resumed, summary.skipped) == (4, 4, 0, [])
    assert summary.bytes_per_view > 0 and summary.raw_bytes_per_view > 0 and summary.views_per_s > 0
    assert "10 views written" in summary.format() and summary.to_dict()["views_per_s"] == summary.views_per_s
    reader = CacheReader(out)
    assert reader.verify() == {} and reader.fingerprint["digest"] == summary.fingerprint
    index = reader.index.to_pylist()
    labels = {r.image_id: list(r.labels) for r in read_manifest(manifest_path).rows}
    assert [r["row"] for r in index] == list(range(10))
    assert [r["shard"] for r in index] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert all(r["labels"] == labels[r["image_id"]] for r in index)  # same labels for every view
    assert reader.spec.grid == (3, 3) and reader.spec.dim == 64 and reader.spec.k_max == 3
    assert reader.fingerprint["feature_layers"] == [1, 2] and reader.fingerprint["attn_layers"] == [2, 3]


def test_recorded_views_reproduce_crops_and_cams(inline, manifest_path):
    """Each sample, rebuilt from the image file and its recorded parameters alone, equals what the cache holds; its
    Grad-CAM, features and attention recomputed one crop at a time by `softmax_gradcam` equal the stored ones."""
    _, out = inline
    reader = CacheReader(out)
    manifest = read_manifest(manifest_path)
    rows = {r.image_id: r for r in manifest.rows}
    backbone = build_tiny_backbone(seed=CFG.model.init_seed)
    assert backbone.identity == reader.fingerprint["checkpoint"]  # the workers built these very weights
    text = text_embeddings(backbone, class_set("voc"), CFG.text.template)
    for sample in reader.index.to_pylist():
        stored = reader.read_sample(sample["row"])
        image = rows[sample["image_id"]]
        params = ViewParams.from_dict(sample)
        assert params == draw_view(CFG.extract.seed, image.image_id, sample["view"], image.height, image.width,
                                   CFG.aug)
        crop = apply_view(load_rgb(manifest.image_abspath(image)), params)
        np.testing.assert_array_equal(stored["image"], crop.transpose(2, 0, 1))
        np.testing.assert_array_equal(stored["valid"], valid_mask(params))
        x = normalise(torch.from_numpy(crop).permute(2, 0, 1)[None], "imagenet")
        cams = softmax_gradcam(backbone, x, [image.labels], text, CFG.extract.feature_layers, CFG.extract.attn_layers,
                               k_max=3)
        k = len(image.labels)
        np.testing.assert_array_equal(stored["cam_classes"], list(image.labels) + [-1] * (3 - k))
        assert np.all(stored["cams"][:k].max(axis=(1, 2)) > 0.99) and not stored["cams"][k:].any()  # real CAMs
        np.testing.assert_allclose(stored["cams"].astype(np.float32), cams.cams[0].numpy(), atol=1e-3)
        # the default storage: fp8 features (relative error <= 2^-4), log8 attention (2.2 % per code and as much
        # again for the sum-keeping scale, tiny values flushed), each after the float16 rounding of the cache dtype
        np.testing.assert_allclose(stored["features"], cams.features[0].numpy(), rtol=2 ** -4 + 2e-3, atol=2e-3)
        np.testing.assert_allclose(stored["attn"], cams.attn[0].numpy(), rtol=2 ** (1 / 16) - 1 + 1e-3, atol=1e-4)
        np.testing.assert_allclose(stored["attn"].sum(-1), cams.attn[0].numpy().sum(-1), rtol=2e-3)


def test_resume_rewrites_only_missing_shards(inline, manifest_path, tmp_path):
    _, out = inline
    copy = tmp_path / "cache"
    shutil.copytree(out, copy)
    (copy / commit_key(2)).unlink()  # shard 2 as a crash would leave it: arrays there, no commit
    summary = extract.run(CFG, manifest_path, copy, executor="inline", progress=False, model_configs=[xf.TINY_CONFIG])
    assert (summary.shards_written, summary.shards_resumed, summary.views_written) == (1, 3, 3)
    assert summary.views_in_cache == 10
    expected_sums, expected_index = xf.checksums(out)
    sums, index = xf.checksums(copy)
    assert sums == expected_sums and index.equals(expected_index)
    again = extract.run(CFG, manifest_path, copy, executor="inline", progress=False, model_configs=[xf.TINY_CONFIG])
    assert (again.shards_written, again.shards_resumed, again.views_written) == (0, 4, 0)


@pytest.mark.parametrize("change, key", [({"extract": {"views": 3}}, "views"),
                                         ({"extract": {"attn_layers": [3]}}, "attn_layers"),
                                         ({"model": {"init_seed": 1}}, "checkpoint")])
def test_other_settings_on_the_same_out_are_refused(inline, manifest_path, change, key):
    _, out = inline
    with pytest.raises(FingerprintMismatch, match=f"fingerprint.{key}.*new --out"):
        extract.run(CFG.replace(**change), manifest_path, out, executor="inline", progress=False,
                    model_configs=[xf.TINY_CONFIG])
    with pytest.raises(FingerprintMismatch, match="manifest_sha256"):  # fewer images: another plan
        extract.run(CFG, manifest_path, out, executor="inline", limit=2, progress=False,
                    model_configs=[xf.TINY_CONFIG])


def test_bad_settings_fail_with_clear_messages(manifest_path, tmp_path):
    with pytest.raises(ValueError, match=r"extract.feature_layers = \[1, 4\].*1..3 of model 'tiny-vit'"):
        extract.run(xf.tiny_config(feature_layers=[1, 4]), manifest_path, tmp_path / "c", executor="inline",
                    progress=False, model_configs=[xf.TINY_CONFIG])
    with pytest.raises(ValueError, match="not a multiple of the model's patch size 16"):
        extract.run(CFG.replace(aug={"crop": 40}), manifest_path, tmp_path / "c", executor="inline", progress=False,
                    model_configs=[xf.TINY_CONFIG])
    with pytest.raises(ValueError, match="classes of dataset 'voc'.*--preset voc"):
        extract.run(CFG.replace(text={"classes": "coco"}), manifest_path, tmp_path / "c", executor="inline",
                    progress=False, model_configs=[xf.TINY_CONFIG])
    with pytest.raises(ValueError, match="executor must be"):
        extract.run(CFG, manifest_path, tmp_path / "c", executor="dask")
    assert not (tmp_path / "c").exists()


def test_fsspec_url_output_matches_local(inline, manifest_path):
    _, out = inline
    url = f"memory://weclip-test-{id(inline)}/cache"
    summary = extract.run(CFG, manifest_path, url, executor="inline", progress=False, model_configs=[xf.TINY_CONFIG])
    assert summary.out == url and CacheReader(url).verify() == {}
    sums, index = xf.checksums(url)
    expected_sums, expected_index = xf.checksums(out)
    assert sums == expected_sums and index.equals(expected_index)

