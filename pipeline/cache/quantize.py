"""8-bit codings of the cache's float arrays: pure quantise / dequantise functions (docs/design.md §3.2).

Every coding works along the last axis (a feature token's D-vector, an attention row over the N keys) and keeps
that vector's scale inside the vector: the encoded array has SCALE_BYTES more bytes on the last axis, the scale's
float32 bits (little-endian), so one sample of one array stays one chunk and one read. All-zero bytes decode to
zeros in every coding (the fill value of a skipped row). NaN or inf cannot be coded and raise a CacheError.

    int8   x ≈ q · s, q = rint(x / s) in [-127, 127], s = max|x| / 127          |error| <= s / 2
    fp8    x ≈ e4m3(x / s) · s, s = max|x| / 448 (the e4m3 maximum)           relative error <= 2^-4 (normals)
    uint8  a ≈ q · s, q = rint(255 · a / max a) in [0, 255]          (a >= 0)
    log8   a ≈ 2^((q - 255) / LOG8_STEPS) · s, q = rint(LOG8_STEPS · log2(a / max a)) + 255 in 1..255, q = 0 codes 0

fp8 is OCP / torch `float8_e4m3fn` (1 sign, 4 exponent bits of bias 7, 3 mantissa bits; no inf, 0x7F / 0xFF are
NaN, which a scaled value never reaches), rounded to nearest-even by torch. The two attention codings code rows of
probabilities. Their scale s is chosen so that the decoded row has the row's exact sum, s = Σa / Σ(decoded units):
CAA's and RFM's layer sums stay those of the float values, and RFM's signed layer choice depends on nothing else.
log8 keeps every value above max · 2^(-254.5 / 16) (1.6e-5 of the row's maximum) within 2^(1/32) - 1 = 2.2 % of
the others' ratios, and flushes smaller ones to 0: attention rows of trained models are mostly tiny values, which
a linear code resolves only relative to the row's maximum. Measured choices: benchmarks/cache_storage.py.
"""
from __future__ import annotations

from typing import Callable, Literal

import numpy as np
import torch

from weclip.pipeline.errors import CacheError

Coding = Literal["int8", "fp8", "uint8", "log8"]
SCALE_BYTES = 4  # one float32 scale per vector, appended to it
_SCALE = np.dtype("<f4")
INT8_MAX = 127
FP8_MAX = 448.0  # largest finite float8_e4m3fn
UINT8_MAX = 255
LOG8_STEPS = 16  # log8 codes per octave (factor 2): codes 1..255 span 2^-15.9 .. 1 of the row's maximum


def fp8_e4m3_values() -> np.ndarray:
    """The float32 value of each of the 256 float8_e4m3fn codes (NaN for 0x7F and 0xFF), from the format's
    definition: subnormals m/8 · 2^-6 for exponent field 0, else (1 + m/8) · 2^(e - 7)."""
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exponent, mantissa = (codes >> 3) & 0xF, codes & 0x7
    magnitude = np.where(exponent == 0, mantissa / 8 * 2.0 ** -6, (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    values = (sign * magnitude).astype(np.float32)
    values[(codes & 0x7F) == 0x7F] = np.nan
    return values


_FP8_VALUES = fp8_e4m3_values()


def encode(coding: Coding, values: np.ndarray) -> np.ndarray:
    """`values` (..., D) floating -> (..., D + SCALE_BYTES) int8 (coding "int8") or uint8 (the others)."""
    return _CODINGS[coding][0](_finite(values, coding))


def decode(coding: Coding, stored: np.ndarray) -> np.ndarray:
    """The float32 values (..., D) of an `encode`d array (..., D + SCALE_BYTES)."""
    codes, scale = unpack(stored)
    return _CODINGS[coding][1](codes) * scale


def code_dtype(coding: Coding) -> np.dtype:
    return np.dtype(np.int8 if coding == "int8" else np.uint8)


def pack(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Codes (..., D) and one scale per vector (..., 1) -> (..., D + SCALE_BYTES), the scale's float32 bytes last."""
    tail = np.ascontiguousarray(scale, dtype=_SCALE).view(codes.dtype)
    return np.concatenate([codes, tail], axis=-1)


def unpack(stored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of `pack`: codes (..., D) and float32 scales (..., 1)."""
    scale = np.ascontiguousarray(stored[..., -SCALE_BYTES:]).view(_SCALE).astype(np.float32)
    return stored[..., :-SCALE_BYTES], scale


def _finite(values: np.ndarray, coding: Coding) -> np.ndarray:
    if values.dtype.kind != "f":
        raise TypeError(f"{coding} coding takes floating point values, got {values.dtype}")
    values = values.astype(np.float32, copy=False)
    if not np.isfinite(values).all():
        raise CacheError(f"values hold NaN or inf, which {coding} storage cannot code; find where the backbone "
                         "overflows (model.precision fp32 avoids fp16 overflow) or store them as float "
                         "(extract.features_storage / extract.attn_storage = plain)")
    return values


def _nonnegative(values: np.ndarray, coding: Coding) -> None:
    if (values < 0).any():
        raise CacheError(f"{coding} storage codes non-negative values (attention weights), got {values.min():g}; "
                         "store this array as float (extract.attn_storage = plain)")


def _divide(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """values / scale, 0 where the scale is 0 (an all-zero vector)."""
    return np.divide(values, scale, out=np.zeros_like(values), where=scale > 0)


def _encode_int8(x: np.ndarray) -> np.ndarray:
    scale = np.abs(x).max(axis=-1, keepdims=True) / np.float32(INT8_MAX)
    codes = np.clip(np.rint(_divide(x, scale)), -INT8_MAX, INT8_MAX).astype(np.int8)
    return pack(codes, scale)


def _linear_units(codes: np.ndarray) -> np.ndarray:
    return codes.astype(np.float32)


def _encode_fp8(x: np.ndarray) -> np.ndarray:
    scale = np.abs(x).max(axis=-1, keepdims=True) / np.float32(FP8_MAX)
    scaled = np.clip(_divide(x, scale), -FP8_MAX, FP8_MAX)  # float32 division can land a hair above 448
    codes = torch.from_numpy(np.ascontiguousarray(scaled)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    return pack(codes, scale)


def _fp8_units(codes: np.ndarray) -> np.ndarray:
    return _FP8_VALUES[codes]


def _sum_scale(a: np.ndarray, units: np.ndarray) -> np.ndarray:
    """The scale that gives the decoded row (`units` · scale) the row's own sum; 0 for an all-zero row."""
    total = a.sum(axis=-1, keepdims=True, dtype=np.float64)
    coded = units.sum(axis=-1, keepdims=True, dtype=np.float64)
    return np.divide(total, coded, out=np.zeros_like(total), where=coded > 0).astype(np.float32)


def _encode_uint8(a: np.ndarray) -> np.ndarray:
    _nonnegative(a, "uint8")
    step = a.max(axis=-1, keepdims=True) / np.float32(UINT8_MAX)
    codes = np.clip(np.rint(_divide(a, step)), 0, UINT8_MAX).astype(np.uint8)
    return pack(codes, _sum_scale(a, _linear_units(codes)))


def _encode_log8(a: np.ndarray) -> np.ndarray:
    _nonnegative(a, "log8")
    with np.errstate(divide="ignore"):  # log2(0) = -inf codes 0
        steps = np.rint(LOG8_STEPS * np.log2(_divide(a, a.max(axis=-1, keepdims=True)))) + UINT8_MAX
    codes = np.clip(steps, 0, UINT8_MAX).astype(np.uint8)
    return pack(codes, _sum_scale(a, _log8_units(codes)))


def log8_levels() -> np.ndarray:
    """The float32 fraction of the row's maximum that each log8 code stands for (code 0: exactly 0)."""
    levels = np.exp2((np.arange(256, dtype=np.float64) - UINT8_MAX) / LOG8_STEPS).astype(np.float32)
    levels[0] = 0.0
    return levels


_LOG8_LEVELS = log8_levels()


def _log8_units(codes: np.ndarray) -> np.ndarray:
    return _LOG8_LEVELS[codes]


_CODINGS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    "int8": (_encode_int8, _linear_units),  # (encode, the units a code stands for, before its vector's scale)
    "fp8": (_encode_fp8, _fp8_units),
    "uint8": (_encode_uint8, _linear_units),
    "log8": (_encode_log8, _log8_units),
}
