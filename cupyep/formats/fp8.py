"""FP8 (e4m3) casting with one fp32 scale per 128 channels, in NumPy.

The GPU kernels implement the same arithmetic (raw_kernels/cupyep/fp8.cuh):
``scale = max(amax, 1e-4) / 448``, optionally rounded up to a power of two,
``q = saturate(x * (1 / scale))`` rounded to nearest even (the reciprocal and
the product each rounded to fp32).
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

FP8_GROUP = 128
FP8_MAX = 448.0
AMAX_FLOOR = 1e-4
bfloat16 = np.dtype(ml_dtypes.bfloat16)
float8_e4m3 = np.dtype(ml_dtypes.float8_e4m3fn)


def per_token_cast_to_fp8(x: np.ndarray, round_scale: bool = False):
    """Cast rows to e4m3 with per-128-channel scales.

    Args:
        x: [N, H] bf16 or fp32, H a multiple of 128.
        round_scale: round each scale up to a power of two.

    Returns:
        (q, scales): q [N, H] float8_e4m3fn, scales [N, H/128] fp32.
    """
    n, h = x.shape
    xf = x.astype(np.float32).reshape(n, h // FP8_GROUP, FP8_GROUP)
    amax = np.maximum(np.abs(xf).max(axis=-1), np.float32(AMAX_FLOOR))
    scale = (amax / np.float32(FP8_MAX)).astype(np.float32)
    if round_scale:
        scale = round_scale_to_pow2(scale)
    inv = (np.float32(1.0) / scale).astype(np.float32)
    q = np.clip(xf * inv[..., None], -FP8_MAX, FP8_MAX).astype(float8_e4m3)
    return q.reshape(n, h), scale


def round_scale_to_pow2(scale: np.ndarray) -> np.ndarray:
    """Round positive fp32 scales up to the next power of two (exact)."""
    mant, exp = np.frexp(scale.astype(np.float32))
    # frexp gives mant in [0.5, 1): a scale that is already 2^k has mant 0.5.
    exp = np.where(mant == 0.5, exp - 1, exp)
    return np.ldexp(np.float32(1.0), exp).astype(np.float32)


def pack_ue8m0(scale: np.ndarray) -> np.ndarray:
    """Pack power-of-two fp32 scales as UE8M0 bytes, four per int32.

    Args:
        scale: [..., G] fp32 powers of two, G a multiple of 4.

    Returns:
        [..., G/4] int32; byte g % 4 of word g // 4 is the biased exponent of
        group g (little-endian).
    """
    bits = np.ascontiguousarray(scale, dtype=np.float32).view(np.uint32)
    exps = ((bits >> 23) & 0xFF).astype(np.uint8)
    return np.ascontiguousarray(exps).view(np.int32)


def unpack_ue8m0(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_ue8m0`: [..., G/4] int32 to [..., G] fp32."""
    exps = np.ascontiguousarray(packed).view(np.uint8).astype(np.uint32)
    return (exps << 23).view(np.float32)


def dequantize(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """e4m3 [N, H] and fp32 scales [N, H/128] back to fp32 [N, H]."""
    n, h = q.shape
    qf = q.astype(np.float32).reshape(n, h // FP8_GROUP, FP8_GROUP)
    return (qf * scales[..., None]).reshape(n, h)
