"""Outputs that stay valid across CUDA graph replays.

Calls allocate their outputs fresh. While the caller's stream is being
captured into a CUDA graph they take arrays kept per (key, shape, dtype)
instead, so that every replay writes memory that is still owned: a graph may
hold one call of each kind and shape, and each shape should run once outside
capture first (kernels compile, the memory pool fills).
"""
from __future__ import annotations

import numpy as np


def is_capturing(stream) -> bool:
    """True while ``stream`` (a CuPy stream) is being captured into a graph."""
    try:
        return bool(stream.is_capturing())
    except Exception:
        return False


class KeptArrays:
    """Fresh arrays outside capture, kept ones during it."""

    def __init__(self):
        self._arrays = {}

    def get(self, key, shape, dtype, capturing: bool, zero: bool = False):
        import cupy
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if not capturing:
            return cupy.zeros(shape, dtype) if zero else cupy.empty(shape, dtype)
        k = (key, shape, np.dtype(dtype).str)
        a = self._arrays.get(k)
        if a is None:
            a = self._arrays[k] = cupy.empty(shape, dtype)
        if zero:
            a.fill(0)
        return a
