"""cupyep.capture.KeptArrays: fresh arrays outside graph capture, kept ones during it.
Runs without a GPU (NumPy stands in for CuPy)."""
import sys
import types

import numpy as np
import pytest

from cupyep.capture import KeptArrays, is_capturing


@pytest.fixture
def numpy_as_cupy(monkeypatch):
    fake = types.ModuleType("cupy")
    fake.empty, fake.zeros = np.empty, np.zeros
    monkeypatch.setitem(sys.modules, "cupy", fake)


def test_fresh_outside_capture(numpy_as_cupy):
    kept = KeptArrays()
    a, b = kept.get("x", 4, np.int32, False), kept.get("x", 4, np.int32, False)
    assert a is not b and a.shape == (4,)
    assert not kept.get("z", (2, 3), np.float32, False, zero=True).any()


def test_kept_per_key_shape_and_dtype_while_capturing(numpy_as_cupy):
    kept = KeptArrays()
    a = kept.get("x", (2, 3), np.int32, True)
    assert kept.get("x", [2, 3], np.int32, True) is a
    assert kept.get("y", (2, 3), np.int32, True) is not a
    assert kept.get("x", (3, 2), np.int32, True) is not a
    assert kept.get("x", (2, 3), np.int64, True) is not a
    a[...] = 7
    assert not kept.get("x", (2, 3), np.int32, True, zero=True).any()  # zeroed again, same array


def test_is_capturing_tolerates_streams_without_the_query():
    assert is_capturing(object()) is False
    assert is_capturing(types.SimpleNamespace(is_capturing=lambda: True)) is True
