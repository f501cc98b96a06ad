"""LogFMT-10: the optional encoding of low-latency combine traffic.

Each group of 64 channels of a bf16 row travels as 88 bytes instead of 128.
It is defined by two logs: log2 of the group's largest magnitude
(``log_amax``) and of its smallest non-zero one clipped to ``log_amax - 32``
(``log_amin``); each channel has a sign bit and a 9-bit code. Code 0 is
zero; code c >= 1 is ``2 ** (log_amin + (c - 1) * step)`` with
``step = (log_amax - log_amin) / 510``; a value takes the nearest code in
the log domain, and zero where that is more than half a step below code 1
(only where log_amin was clipped: magnitudes under ``2 ** -32`` of the
group's largest). Relative error per value is at most ``2 ** (step / 2) - 1``
(under 2.2%, and far less for groups of a narrow range), except for those
flushed to zero. On the wire: 8 bytes of header (what the decoder computes
each code's exponent with, worked out from the two logs by the sender), then
10 bytes per 8 channels (8 sign bits and eight codes), split 8 + 2 so that
each decoding thread loads aligned words.

This module is the NumPy definition (the reference backend and the tests use
it); raw_kernels/cupyep/low_latency.cu does the same in fp32 on the GPU,
where log2f/exp2f may round differently in the last bit, so a code can
differ by one step.
"""
from __future__ import annotations

import numpy as np

GROUP = 64
GROUP_BYTES = 8 + GROUP // 8 * 10
LOG_RANGE = 32.0
NUM_CODES = 512  # 9 bits


def encoded_bytes(hidden: int) -> int:
    """Bytes of one encoded row of ``hidden`` channels."""
    return hidden // GROUP * GROUP_BYTES


def quantize(y: np.ndarray) -> np.ndarray:
    """What a receiver decodes from rows ``y`` [..., H] (bf16 or fp32): fp32."""
    x = np.asarray(y, np.float32)
    shape = x.shape
    g = x.reshape(-1, shape[-1] // GROUP, GROUP)
    mag = np.abs(g)
    amax = mag.max(axis=-1, keepdims=True)
    nonzero_min = np.where(mag > 0, mag, np.float32(np.inf)).min(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_amax = np.log2(amax).astype(np.float32)
        log_amin = np.maximum(np.log2(nonzero_min).astype(np.float32), log_amax - np.float32(LOG_RANGE))
        step = ((log_amax - log_amin) / np.float32(NUM_CODES - 2)).astype(np.float32)
        pos = np.where(step > 0, (np.log2(mag).astype(np.float32) - log_amin) / step, np.float32(0))
    pos = np.where(mag > 0, pos, np.float32(-1))  # -1: code 0
    code = np.clip(np.rint(pos), -1, NUM_CODES - 2).astype(np.int32) + 1
    value = np.where(code > 0, np.exp2(log_amin + (code - 1).astype(np.float32) * step).astype(np.float32),
                     np.float32(0))
    value = np.where(amax > 0, value, np.float32(0))
    return (np.sign(g) * value).astype(np.float32).reshape(shape)
