"""8-bit codings of the cache (pipeline/cache/quantize.py) on tiny arrays against hand computations: codes, packed
scales, round-trip error bounds, zero and maximum handling, NaN/inf and negative refusals."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from weclip.pipeline.cache import quantize as qz
from weclip.pipeline.errors import CacheError

ONE_LE = [0, 0, 128, 63]  # float32 1.0 = 0x3F800000, little-endian bytes


def codes_and_scale(stored: np.ndarray) -> tuple[list[int], list[int]]:
    raw = stored.view(np.uint8).reshape(-1)
    return raw[:-4].tolist(), raw[-4:].tolist()


def test_int8_codes_by_hand():
    stored = qz.encode("int8", np.array([127.0, -63.5, 0.4, 0.0, -127.0], np.float32))
    assert stored.dtype == np.int8 and stored.shape == (9,)
    assert stored[:5].tolist() == [127, -64, 0, 0, -127]  # s = 127 / 127 = 1; rint(-63.5) = -64 (to even)
    assert codes_and_scale(stored)[1] == ONE_LE
    np.testing.assert_array_equal(qz.decode("int8", stored), [127.0, -64.0, 0.0, 0.0, -127.0])


def test_fp8_codes_by_hand():
    # s = 448 / 448 = 1; 1.0625 lies halfway between 1.0 (mantissa 0) and 1.125 (1) -> the even 1.0;
    # 1.1875 halfway between 1.125 and 1.25 (mantissa 2) -> 1.25; 2^-9 is the smallest subnormal
    x = np.array([448.0, 1.0, -0.5, 0.0, 1.0625, 1.1875, 2.0 ** -9], np.float32)
    codes, scale = codes_and_scale(qz.encode("fp8", x))
    assert codes == [0x7E, 0x38, 0xB0, 0x00, 0x38, 0x3A, 0x01] and scale == ONE_LE
    np.testing.assert_array_equal(qz.decode("fp8", qz.encode("fp8", x)), [448, 1, -0.5, 0, 1, 1.25, 2.0 ** -9])


def test_fp8_value_table_is_torchs_float8_e4m3fn():
    want = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(qz.fp8_e4m3_values(), want)  # NaN at 0x7F and 0xFF on both sides


def test_uint8_codes_by_hand():
    # step = max / 255 = 1/256: codes 255, 128, rint(0.5) = 0, 0; the scale keeps the row's sum: 767/512 / 383
    a = np.array([255 / 256, 0.5, 1 / 512, 0.0], np.float32)
    codes, scale = codes_and_scale(qz.encode("uint8", a))
    assert codes == [255, 128, 0, 0]
    assert np.frombuffer(bytes(scale), "<f4")[0] == np.float32(767 / 512 / 383)
    back = qz.decode("uint8", qz.encode("uint8", a))
    np.testing.assert_allclose(back, np.array([255, 128, 0, 0]) * 767 / 512 / 383, rtol=1e-7)
    assert back.sum() == pytest.approx(a.sum(), rel=1e-7)


def test_log8_codes_by_hand():
    # code = rint(16 · log2(a / max)) + 255: 0.5 -> 239, 2^-0.1 -> rint(-1.6) = -2 -> 253, 2^-16 -> -1 -> 0;
    # the scale gives the decoded row the row's sum: Σa / (1 + 0.5 + 2^(-2/16))
    a = np.array([1.0, 0.5, 2 ** -0.1, 2.0 ** -16, 0.0], np.float32)
    codes, scale = codes_and_scale(qz.encode("log8", a))
    assert codes == [255, 239, 253, 0, 0]
    units = np.array([1.0, 0.5, 2 ** (-2 / 16), 0.0, 0.0])
    want_scale = a.astype(np.float64).sum() / units.sum()
    assert np.frombuffer(bytes(scale), "<f4")[0] == np.float32(want_scale)
    np.testing.assert_allclose(qz.decode("log8", qz.encode("log8", a)), units * want_scale, rtol=1e-6)


def test_round_trip_error_bounds():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 50, 64)) * rng.uniform(0.01, 100, (3, 50, 1))).astype(np.float32)
    step = np.abs(x).max(-1, keepdims=True) / qz.INT8_MAX
    assert (np.abs(qz.decode("int8", qz.encode("int8", x)) - x) <= step / 2 * (1 + 1e-5)).all()
    scaled = np.abs(x) / (np.abs(x).max(-1, keepdims=True) / qz.FP8_MAX)
    normal = scaled >= 2.0 ** -6
    rel = np.abs(qz.decode("fp8", qz.encode("fp8", x)) - x) / np.abs(x)
    assert rel[normal].max() <= 2.0 ** -4 * (1 + 1e-5)
    a = rng.dirichlet(np.ones(64) * 0.3, size=(3, 50)).astype(np.float32)
    a[0, 0, :5] = 1e-9  # below the lowest floor, max · 2^-16
    for coding in ("uint8", "log8"):
        back = qz.decode(coding, qz.encode(coding, a))
        np.testing.assert_allclose(back.sum(-1), a.sum(-1), rtol=1e-5, err_msg=coding)  # rows keep their sums
    step = a.max(-1, keepdims=True) / qz.UINT8_MAX
    codes = np.rint(a / step)
    np.testing.assert_allclose(qz.decode("uint8", qz.encode("uint8", a)),
                               codes * (a.sum(-1, keepdims=True) / codes.sum(-1, keepdims=True)), rtol=1e-6)
    back = qz.decode("log8", qz.encode("log8", a))
    floor = a.max(-1, keepdims=True) * 2 ** (-254.5 / qz.LOG8_STEPS)
    half_step = 2 ** (1 / (2 * qz.LOG8_STEPS))  # before the sum correction, which itself lies within it
    assert (np.abs(back[a >= floor] / a[a >= floor] - 1) <= half_step ** 2 - 1 + 1e-6).all()
    assert (back[a < floor] == 0).all() and (back[0, 0, :5] == 0).all()


def test_maxima_are_exact_and_zeros_stay_zero():
    """The per-vector maximum codes exactly in the feature codings; zeros stay zero and an all-zero vector
    stores all-zero bytes in every coding."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 16)).astype(np.float32)
    x[2] = 0.0
    for coding, v in (("int8", x), ("fp8", x)):
        back = qz.decode(coding, qz.encode(coding, v))
        peak = np.abs(v).argmax(-1)
        np.testing.assert_allclose(back[np.arange(4), peak], v[np.arange(4), peak], rtol=1e-6, err_msg=coding)
        assert (back[v == 0] == 0).all() and (qz.encode(coding, v)[2] == 0).all(), coding
    a = np.abs(x) * (rng.random((4, 16)) > 0.3)
    for coding in ("uint8", "log8"):
        back = qz.decode(coding, qz.encode(coding, a))
        assert (back[a == 0] == 0).all() and (back[a > 0] > 0).all() and (qz.encode(coding, a)[2] == 0).all()


def test_all_zero_bytes_decode_to_zeros():
    """The fill value of a skipped row."""
    for coding in ("int8", "fp8", "uint8", "log8"):
        stored = np.zeros((2, 3, 8 + qz.SCALE_BYTES), qz.code_dtype(coding))
        back = qz.decode(coding, stored)
        assert back.shape == (2, 3, 8) and back.dtype == np.float32 and not back.any()


def test_nan_inf_negative_and_integers_are_refused():
    for coding in ("int8", "fp8", "uint8", "log8"):
        for bad in (np.nan, np.inf, -np.inf):
            with pytest.raises(CacheError, match=f"NaN or inf.*{coding}"):
                qz.encode(coding, np.array([[0.5, bad]], np.float32))
        with pytest.raises(TypeError, match="floating point"):
            qz.encode(coding, np.array([[1, 2]], np.int32))
    for coding in ("uint8", "log8"):
        with pytest.raises(CacheError, match="non-negative"):
            qz.encode(coding, np.array([[0.5, -0.25]], np.float32))
