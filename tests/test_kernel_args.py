"""Kernels launch with a packed block of one 8-byte slot per parameter
(cupyep.jit.PackedKernel): the low-latency calls' declared counts must match
the kernels' signatures, and every argument must have an int value (no GPU
needed)."""
import os
import re

import numpy as np
import pytest

from cupyep import gpu_low_latency, jit
from cupyep.errors import CupyepError


def _num_params(source: str, kernel: str) -> int:
    m = re.search(r"\n" + kernel + r"\(([^)]*)\)\s*\{", source)
    assert m, f"{kernel} not found"
    return len([p for p in m.group(1).split(",") if p.strip()])


@pytest.mark.parametrize("kernel, declared", [("low_latency_dispatch", gpu_low_latency.DISPATCH_ARGS),
                                              ("low_latency_combine", gpu_low_latency.COMBINE_ARGS)])
def test_declared_argument_counts_match_the_kernels(kernel, declared):
    with open(os.path.join(jit.kernel_dir(), "cupyep", "low_latency.cu")) as f:
        source = f.read()
    assert _num_params(source, kernel) == declared


class _DeviceArray:
    """Stands in for a CuPy array: what jit reads of one is .data.ptr."""
    class data:  # noqa: N801
        ptr = 0x7F0000001000


def test_argument_values():
    assert [jit._arg_value(a) for a in (None, 5, -1, np.int32(-2), np.uint64(2 ** 40), np.int64(7),
                                        True, np.bool_(True), _DeviceArray())] == \
        [0, 5, -1, -2, 2 ** 40, 7, 1, 1, 0x7F0000001000]


@pytest.mark.parametrize("bad", [0.5, np.float32(1.0), "x", np.zeros(2)])
def test_an_argument_without_an_int_value_is_refused(bad):
    with pytest.raises(CupyepError, match="kernel argument"):
        jit._arg_value(bad)
