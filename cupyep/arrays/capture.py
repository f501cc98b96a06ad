"""Outputs that stay valid across CUDA graph replays.

Calls allocate their outputs fresh, through the caller's framework
(cupyep.arrays.interop's frontends). torch gives allocations made while a graph is
captured the graph's own pool, so they stay valid across replays. CuPy has no
such pool: while a CuPy caller's stream is being captured, calls take arrays
kept per (key, shape, dtype) instead, so that every replay writes memory that
is still owned: such a graph may hold one call of each kind and shape, and
each shape should run once outside capture first (kernels compile, the memory
pool fills).
"""
from __future__ import annotations

import math

import numpy as np


def is_capturing(stream) -> bool:
    """True while ``stream`` (a CuPy stream) is being captured into a graph.
    The legacy default stream (address 0) never is: no driver query for it."""
    try:
        return bool(stream.ptr) and bool(stream.is_capturing())
    except Exception:
        return False


class KeptArrays:
    """Fresh arrays outside capture, kept ones during it."""

    def __init__(self):
        self._arrays = {}

    def get(self, key, shape, dtype, capturing: bool, zero: bool = False, alloc=None, stream=None):
        """An array for the call in progress.

        Args:
            alloc: the caller's frontend (``empty(shape, dtype)``,
                ``keeps_outputs_in_capture``); None: CuPy.
            zero: zero it on ``stream`` (a CuPy stream; None: CuPy's current).
        """
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if not capturing or (alloc is not None and not alloc.keeps_outputs_in_capture):
            a = alloc.empty(shape, dtype) if alloc is not None else _cupy_empty(shape, dtype)
        else:
            k = (key, shape, np.dtype(dtype).str)
            a = self._arrays.get(k)
            if a is None:
                a = self._arrays[k] = _cupy_empty(shape, dtype)
        if zero:
            _zero(a, stream)
        return a


def _cupy_empty(shape, dtype):
    import cupy
    return cupy.empty(shape, dtype)


def _zero(a, stream):
    """memset on ``stream``: capturable, and the same for CuPy and torch arrays."""
    import cupy

    from cupyep.arrays.interop import dtype_of
    from cupyep.jit import address
    if stream is None:
        stream = cupy.cuda.get_current_stream()
    n = math.prod(a.shape) * dtype_of(a).itemsize
    if n:
        cupy.cuda.runtime.memsetAsync(address(a), 0, n, stream.ptr)

