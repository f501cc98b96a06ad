"""cupyep.arrays.capture.KeptArrays: fresh arrays outside graph capture, kept ones during it.
Runs without a GPU (NumPy stands in for CuPy)."""
import sys
import types

import numpy as np
import pytest

from cupyep.arrays.capture import KeptArrays, is_capturing


@pytest.fixture
def numpy_as_cupy(monkeypatch):
    fake = types.ModuleType("cupy")
    fake.empty, fake.zeros = np.empty, np.zeros
    monkeypatch.setitem(sys.modules, "cupy", fake)


class HostAlloc:
    """A frontend stand-in: NumPy arrays; keeps_outputs_in_capture like CuPy's, or like torch's."""

    def __init__(self, keeps):
        self.keeps_outputs_in_capture = keeps

    def empty(self, shape, dtype):
        return np.full(shape, 7, dtype)


def test_fresh_outside_capture(numpy_as_cupy):
    kept = KeptArrays()
    a, b = kept.get("x", 4, np.int32, False), kept.get("x", 4, np.int32, False)
    assert a is not b and a.shape == (4,)
    alloc = HostAlloc(True)
    c = kept.get("x", 4, np.int32, False, alloc=alloc)
    assert c is not kept.get("x", 4, np.int32, False, alloc=alloc) and (c == 7).all()


def test_kept_per_key_shape_and_dtype_while_capturing(numpy_as_cupy):
    kept = KeptArrays()
    a = kept.get("x", (2, 3), np.int32, True)
    assert kept.get("x", [2, 3], np.int32, True) is a
    assert kept.get("y", (2, 3), np.int32, True) is not a
    assert kept.get("x", (3, 2), np.int32, True) is not a
    assert kept.get("x", (2, 3), np.int64, True) is not a


def test_graph_pool_allocators_are_not_kept(numpy_as_cupy):
    """torch gives allocations made during capture the graph's pool: nothing to keep."""
    kept = KeptArrays()
    torch_like = HostAlloc(False)
    a = kept.get("x", (2, 3), np.int32, True, alloc=torch_like)
    assert kept.get("x", (2, 3), np.int32, True, alloc=torch_like) is not a
    cupy_like = HostAlloc(True)
    b = kept.get("x", (2, 3), np.int32, True, alloc=cupy_like)
    assert kept.get("x", (2, 3), np.int32, True, alloc=cupy_like) is b


def test_is_capturing_tolerates_streams_without_the_query():
    assert is_capturing(object()) is False
    assert is_capturing(types.SimpleNamespace(ptr=1, is_capturing=lambda: True)) is True
    # the legacy default stream is never captured, so it is not asked
    assert is_capturing(types.SimpleNamespace(ptr=0, is_capturing=lambda: True)) is False
