"""The dry run's bill (pipeline/extract/estimate.py): geometry from the open_clip config, exact and estimated bytes,
the measured ratios against the benchmark's file, time at a throughput."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import conftest
from weclip.pipeline.config import preset
from weclip.pipeline.data.manifest import ManifestRow, read_manifest, write_manifest
from weclip.pipeline.errors import BackboneError, ConfigError
from weclip.pipeline.extract import estimate
from weclip.pipeline.extract.plan import ExtractPlan, cache_layout, make_plan
from weclip.pipeline.model.text import VOC_CLASSES

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "cache_storage.json"
VOC = preset("voc")
UNCOMPRESSED = {"compressor": "none", "features_compressor": "none", "attn_compressor": "none"}


def voc_plan(tmp_path: Path, images: int = 10, k_max: int = 3) -> ExtractPlan:
    """The plan of a VOC manifest of `images` images that do not exist (a dry run only plans); image i carries
    1 + i % k_max classes."""
    rows = [ManifestRow(f"i{i}", f"JPEGImages/i{i}.jpg", None, tuple(range(1 + i % k_max)), 375, 500, "train")
            for i in range(images)]
    path = write_manifest(tmp_path / "voc.parquet", rows, dataset="voc", class_names=VOC_CLASSES,
                          root=tmp_path / "absent", command="test", class_set="voc")
    return make_plan(read_manifest(path), VOC)


def test_vit_b16_voc_figures_are_exact_without_weights(tmp_path):
    plan = voc_plan(tmp_path, images=10, k_max=3)
    bill = estimate.dry_run(VOC.replace(extract=UNCOMPRESSED), plan, "cache")
    assert (bill.patch_size, bill.width, bill.num_blocks, bill.grid) == (16, 768, 12, (20, 20))
    assert (bill.images, bill.views, bill.samples_per_shard, bill.shards, bill.k_max) == (10, 40, 64, 1, 3)
    raw = {a.name: (a.shape, a.raw_bytes_per_view) for a in bill.arrays}
    # fp8 features, log8 attention: one byte per value and a float32 scale per token / attention row
    assert raw == {"features": ((11, 400, 768), 11 * 400 * (768 + 4)), "attn": ((8, 400, 400), 8 * 400 * (400 + 4)),
                   "cams": ((3, 20, 20), 3 * 400 * 2), "cam_classes": ((3,), 3 * 2),
                   "image": ((3, 320, 320), 3 * 320 * 320), "valid": ((320, 320), 320 * 320)}
    assert bill.exact and {a.basis for a in bill.arrays} == {"exact"}
    # per array: 40 samples with a 4-byte crc32c each, and one shard's index of 64 slots of 16 bytes and its crc32c
    assert bill.stored_bytes == 40 * (bill.raw_bytes_per_view + 6 * 4) + 6 * (64 * 16 + 4)
    assert "exact" in bill.format() and "estimated" not in bill.format()


def test_config_geometry_gives_the_spec_of_the_loaded_backbone(tmp_path):
    cfg = VOC.replace(model={"name": conftest.TINY_NAME, "pretrained": None}, aug={"crop": 48},
                      extract={"feature_layers": [1, 2], "attn_layers": [2, 3]})
    plan = voc_plan(tmp_path)
    backbone = conftest.build_tiny_backbone()
    geometry = estimate.config_geometry(conftest.TINY_NAME, [conftest.TINY_CONFIG])
    assert (geometry.patch_size, geometry.width, geometry.num_blocks) == (backbone.patch_size, backbone.width,
                                                                          backbone.num_blocks)
    _, loaded = cache_layout(cfg, plan, backbone)
    _, from_config = cache_layout(cfg, plan, geometry)
    assert from_config == loaded
    bill = estimate.dry_run(cfg, plan, "cache", [conftest.TINY_CONFIG])
    assert [(a.name, a.shape, a.raw_bytes_per_view) for a in bill.arrays] == [
        (a.name, a.shape, a.sample_nbytes) for a in loaded.arrays().values()]


def test_project_configs_are_known_without_being_named():
    assert estimate.config_geometry("weclip-tiny") == estimate.ConfigGeometry("weclip-tiny", 16, 96, 3)


def test_unknown_or_non_vit_models_are_refused():
    with pytest.raises(BackboneError, match="unknown model 'no-such-vit'"):
        estimate.config_geometry("no-such-vit")
    with pytest.raises(BackboneError, match="'RN50' .*ResNet"):
        estimate.config_geometry("RN50")


def test_layers_the_model_lacks_are_refused_as_in_the_run(tmp_path):
    cfg = VOC.replace(extract={"attn_layers": [5, 13]})
    with pytest.raises(BackboneError, match=r"extract.attn_layers = \[5, 13\].*12 blocks"):
        estimate.dry_run(cfg, voc_plan(tmp_path), "cache")


def test_measured_ratios_are_the_benchmark_file():
    measured = json.loads(BENCHMARK.read_text())["vit_b16"]
    assert (measured["model"], measured["crop"], measured["dtype"]) == ("ViT-B-16-quickgelu", 320,
                                                                        estimate.MEASURED_DTYPE)
    from_file = {}
    for row in measured["per_array"]:
        if row["codec"] != "none":  # uncompressed sizes are exact, not measured
            from_file.setdefault(f"{row['array']}:{row['storage']}", {})[row["codec"]] = row["ratio"]
    assert from_file.keys() == estimate.MEASURED_RATIOS.keys()
    for key, ratios in estimate.MEASURED_RATIOS.items():
        assert ratios == pytest.approx(from_file[key], rel=5e-4), key


def test_compressed_arrays_are_estimated_with_the_measured_ratio(tmp_path):
    plan = voc_plan(tmp_path)
    bill = estimate.dry_run(VOC, plan, "cache")  # the preset: fp8 features and log8 attention with zstd:1
    arrays = {a.name: a for a in bill.arrays}
    features, attn = arrays["features"], arrays["attn"]
    assert (features.storage, features.compressor, features.basis) == ("fp8", "zstd:1", "measured")
    assert features.ratio == estimate.MEASURED_RATIOS["features:fp8"]["zstd:1"]
    assert attn.ratio == estimate.MEASURED_RATIOS["attn:log8"]["zstd:1"] and attn.storage == "log8"
    assert features.stored_bytes == pytest.approx(40 * 11 * 400 * 772 / features.ratio)
    plain = {a.name: a for a in estimate.dry_run(VOC.replace(extract={"features_storage": "plain",
                                                                      "features_compressor": "zstd"}), plan, "c").arrays}
    assert plain["features"].ratio == estimate.MEASURED_RATIOS["features:plain"]["zstd:3"]  # zstd = zstd:3
    text = bill.format()
    assert not bill.exact and f"estimated (measured ratio {features.ratio:g})" in text
    assert "random weights" in text and "fp8     zstd:1" in text and "log8    zstd:1" in text


def test_unmeasured_compression_shows_the_raw_size(tmp_path):
    plan = voc_plan(tmp_path)
    bf16 = {a.name: a for a in estimate.dry_run(VOC.replace(extract={"dtype": "bfloat16"}), plan, "c").arrays}
    # quantised arrays code the values whatever the cache dtype; a plain bfloat16 array was not measured
    assert (bf16["features"].basis, bf16["cams"].basis, bf16["image"].basis) == ("measured", "not measured",
                                                                                  "measured")
    assert bf16["cams"].stored_bytes == 40 * (bf16["cams"].raw_bytes_per_view + 4) + 64 * 16 + 4
    level = estimate.dry_run(VOC.replace(extract={"compressor": "zstd:5", "features_compressor": "zstd:5",
                                                  "attn_compressor": "zstd:5"}), plan, "c")
    assert {a.basis for a in level.arrays} == {"not measured"} and "not measured" in level.format()


def test_time_is_priced_only_at_a_given_throughput(tmp_path):
    plan = voc_plan(tmp_path)
    unknown = estimate.dry_run(VOC, plan, "cache")
    assert unknown.seconds is None and "time: unknown; give --views-per-s" in unknown.format()
    priced = estimate.dry_run(VOC, plan, "cache", views_per_s=0.01)
    assert priced.seconds == pytest.approx(4000) and "time: 1:06:40 (h:mm:ss) at 0.01 views/s" in priced.format()
    as_json = json.loads(json.dumps(priced.to_dict()))
    assert (as_json["seconds"], as_json["views"], as_json["arrays"][0]["name"]) == (pytest.approx(4000), 40,
                                                                                     "features")
    assert as_json["stored_bytes"] == pytest.approx(priced.stored_bytes)
    for bad in (0, -1.5):
        with pytest.raises(ConfigError, match="--views-per-s must be a positive"):
            estimate.dry_run(VOC, plan, "cache", views_per_s=bad)
