"""The low-latency calls launch with a packed block of one slot per kernel
parameter (cupyep.jit.PackedKernel): the counts they declare must match the
kernels' signatures in the source (no GPU needed)."""
import os
import re

import pytest

from cupyep import gpu_low_latency, jit


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
