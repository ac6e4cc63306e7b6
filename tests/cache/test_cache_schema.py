"""Cache schema: shapes, shard plan, compressor names, dtype casts (bfloat16 against torch)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from zarr.codecs import BloscCodec, ZstdCodec

from tests.cache import cache_fakes as fk
from tests.cache.cache_fakes import ARRAY_NAMES

from weclip.pipeline.cache.schema import CacheSpec, bfloat16_bits, bfloat16_to_float32, compressor_codecs
from weclip.pipeline.errors import CacheError, ConfigError


def test_vit_b16_shapes_and_sizes():
    spec = CacheSpec(total_samples=1000, samples_per_shard=64, feature_layers=11, attn_layers=12, grid=(20, 20),
                     dim=768, k_max=4, crop=320, dtype="float16", compressor="none")
    arrays = spec.arrays()
    assert list(arrays) == list(ARRAY_NAMES)
    assert arrays["features"].shape == (11, 400, 768) and arrays["features"].sample_nbytes == 11 * 400 * 768 * 2
    assert arrays["attn"].shape == (12, 400, 400)
    assert arrays["cams"].shape == (4, 20, 20) and arrays["cam_classes"].shape == (4,)
    assert arrays["image"].sample_nbytes == 3 * 320 * 320 and arrays["valid"].sample_nbytes == 320 * 320
    kw = arrays["attn"].zarr_kwargs(spec)
    assert kw["shape"] == (1000, 12, 400, 400) and kw["chunks"] == (1, 12, 400, 400)
    assert kw["shards"] == (64, 12, 400, 400)


def test_shard_plan_covers_every_row_once():
    spec = fk.tiny_spec(total_samples=11, samples_per_shard=4)
    assert spec.n_shards == 3
    rows = [r for s in range(spec.n_shards) for r in spec.shard_rows(s)]
    assert rows == list(range(11))
    assert spec.shard_rows(2) == range(8, 11)
    with pytest.raises(IndexError):
        spec.shard_rows(3)


def test_spec_dict_round_trip():
    spec = fk.tiny_spec()
    assert CacheSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="dtype"):
        fk.tiny_spec(dtype="float64")
    with pytest.raises(ValueError, match="unknown compressor"):
        fk.tiny_spec(compressor="gzip")


def test_compressor_names():
    assert compressor_codecs("none") == ()
    assert compressor_codecs("zstd") == (ZstdCodec(level=3),)
    assert compressor_codecs("zstd:9") == (ZstdCodec(level=9),)
    (b,) = compressor_codecs("blosc-zstd:1")
    assert isinstance(b, BloscCodec) and b.cname.value == "zstd" and b.clevel == 1 and b.shuffle.value == "shuffle"
    (b,) = compressor_codecs("blosc-lz4-bit")
    assert b.cname.value == "lz4" and b.clevel == 5 and b.shuffle.value == "bitshuffle"
    with pytest.raises(ValueError):
        compressor_codecs("none:3")


def test_bfloat16_matches_torch():
    rng = np.random.default_rng(0)
    values = np.concatenate([
        (rng.standard_normal(10000) * 10.0 ** rng.integers(-30, 30, 10000)).astype(np.float32),
        np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, 3.4e38, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8], np.float32),
    ])
    want = torch.from_numpy(values).bfloat16()
    bits = bfloat16_bits(values)
    np.testing.assert_array_equal(bits, want.view(torch.int16).numpy().view(np.uint16))
    np.testing.assert_array_equal(bfloat16_to_float32(bits), want.float().numpy())
    assert np.isnan(bfloat16_to_float32(bfloat16_bits(np.array([np.nan], np.float32))))[0]


def test_to_storage_casts_floats_and_checks_the_rest():
    arrays = fk.tiny_spec().arrays()
    x = np.random.default_rng(0).standard_normal((2, 2, 16, 8))
    np.testing.assert_array_equal(arrays["features"].to_storage(x), x.astype(np.float16))
    with pytest.raises(ValueError, match="per-sample shape"):
        arrays["features"].to_storage(x[:, :1])
    with pytest.raises(TypeError, match="floating"):
        arrays["cams"].to_storage(np.zeros((1, 3, 4, 4), np.int32))
    with pytest.raises(TypeError, match="uint8"):
        arrays["image"].to_storage(np.zeros((1, 3, 32, 32), np.int16))


def test_each_array_declares_its_codec_and_float_kind():
    spec = fk.tiny_spec(compressor="blosc-zstd:1")
    arrays = spec.arrays()
    assert {a.compressor for a in arrays.values()} == {"blosc-zstd:1"}
    assert [n for n, a in arrays.items() if a.floating] == ["features", "attn", "cams"]
    (b,) = arrays["valid"].zarr_kwargs(spec)["compressors"]
    assert b.cname.value == "zstd" and b.clevel == 1
    own = dataclasses.replace(arrays["valid"], compressor="zstd:9")
    assert own.zarr_kwargs(spec)["compressors"] == (ZstdCodec(level=9),)
    assert fk.tiny_spec(dtype="bfloat16").arrays()["attn"].floating


def test_bad_spec_settings_are_config_errors():
    with pytest.raises(ConfigError, match=r"'float64' \(extract.dtype\)"):
        fk.tiny_spec(dtype="float64")
    with pytest.raises(ConfigError, match=r"'gzip' \(extract.compressor\)"):
        fk.tiny_spec(compressor="gzip")
    with pytest.raises(ConfigError, match="level after ':' must be a whole number"):
        compressor_codecs("zstd:fast")
    with pytest.raises(ConfigError, match="samples_per_shard 0"):
        fk.tiny_spec(samples_per_shard=0)
    with pytest.raises(CacheError, match="per-sample shape"):
        fk.tiny_spec().arrays()["valid"].to_storage(np.zeros((1, 3, 3), bool))


def test_features_and_attn_have_their_own_storage_and_codec():
    spec = CacheSpec(total_samples=8, samples_per_shard=4, feature_layers=11, attn_layers=8, grid=(20, 20), dim=768,
                     k_max=4, crop=320, dtype="float16", compressor="blosc-zstd:1", features_storage="fp8",
                     features_compressor="none", attn_storage="log8", attn_compressor="zstd:1")
    arrays = spec.arrays()
    assert {n: (a.storage, a.compressor) for n, a in arrays.items()} == {
        "features": ("fp8", "none"), "attn": ("log8", "zstd:1"), "cams": ("plain", "blosc-zstd:1"),
        "cam_classes": ("plain", "blosc-zstd:1"), "image": ("plain", "blosc-zstd:1"),
        "valid": ("plain", "blosc-zstd:1")}
    features, attn = arrays["features"], arrays["attn"]
    assert features.shape == (11, 400, 768) and features.stored_shape == (11, 400, 772)
    assert features.sample_nbytes == 11 * 400 * (768 + 4) and attn.sample_nbytes == 8 * 400 * (400 + 4)
    kw = features.zarr_kwargs(spec)
    assert kw["chunks"] == (1, 11, 400, 772) and kw["shards"] == (4, 11, 400, 772) and kw["dtype"] == np.uint8
    assert kw["compressors"] == () and kw["attributes"]["weclip_storage"] == "fp8"
    assert attn.zarr_kwargs(spec)["compressors"] == (ZstdCodec(level=1),)
    assert CacheSpec.from_dict(spec.to_dict()) == spec


def test_to_storage_quantises_and_from_storage_decodes():
    spec = fk.tiny_spec(features_storage="int8")
    features = spec.arrays()["features"]
    x = np.zeros((1, 2, 16, 8), np.float16)
    x[0, 0, 0, :3] = [2.0, -1.0, 0.5]  # s = 2 / 127
    stored = features.to_storage(x)
    assert stored.dtype == np.int8 and stored.shape == (1, 2, 16, 12)
    assert stored[0, 0, 0, :3].tolist() == [127, -64, 32]  # rint(-63.5) = -64, rint(31.75) = 32
    np.testing.assert_allclose(features.from_storage(stored)[0, 0, 0, :3], np.array([127, -64, 32]) * 2 / 127,
                               rtol=1e-6)
    bad = x.astype(np.float32)
    bad[0, 1, 3, 2] = np.nan
    with pytest.raises(CacheError, match="array 'features': values hold NaN or inf"):
        features.to_storage(bad)


def test_bad_storage_settings_are_config_errors():
    with pytest.raises(ConfigError, match=r"features_storage 'log8' \(extract.features_storage\)"):
        fk.tiny_spec(features_storage="log8")
    with pytest.raises(ConfigError, match=r"attn_storage 'int8' \(extract.attn_storage\)"):
        fk.tiny_spec(attn_storage="int8")
    with pytest.raises(ConfigError, match=r"'gzip' \(extract.attn_compressor\)"):
        fk.tiny_spec(attn_compressor="gzip")
    with pytest.raises(ConfigError, match="'valid' of dtype bool cannot have storage 'uint8'"):
        dataclasses.replace(fk.tiny_spec().arrays()["valid"], storage="uint8")


def test_gt_mask_crops_are_an_optional_array():
    assert "gt_mask" not in fk.tiny_spec().arrays()
    arrays = fk.tiny_spec(masks=True).arrays()
    assert list(arrays) == [*ARRAY_NAMES, "gt_mask"]  # appended: the other arrays' order and checksums stay
    mask = arrays["gt_mask"]
    assert (mask.shape, mask.dtype, mask.fill, mask.sample_nbytes) == ((32, 32), "uint8", 255, 32 * 32)


def test_a_spec_recorded_before_masks_existed_reopens(tmp_path):
    """A cache whose recorded spec has no `masks` key (made before the field) resumes without a mismatch."""
    import zarr
    from weclip.pipeline.cache.schema import ROOT_ATTR
    from weclip.pipeline.cache.store import CacheWriter

    spec, fingerprint = fk.tiny_spec(), fk.tiny_fingerprint()
    CacheWriter.create_or_open(str(tmp_path), spec, fingerprint)
    group = zarr.open_group(str(tmp_path), mode="r+")
    meta = dict(group.attrs[ROOT_ATTR])
    meta["spec"] = {k: v for k, v in meta["spec"].items() if k != "masks"}
    group.attrs[ROOT_ATTR] = meta
    assert CacheWriter.create_or_open(str(tmp_path), spec, fingerprint).spec == spec
    with pytest.raises(CacheError, match="spec.masks"):
        CacheWriter.create_or_open(str(tmp_path), fk.tiny_spec(masks=True), fingerprint)
