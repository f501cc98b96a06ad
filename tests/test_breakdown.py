"""benchmarks/breakdown_*.py: every kernel variant is built from the current
kernels (its text edits still find their anchors) and each removes
something. The timing itself needs GPUs."""
import importlib.util
import os
import sys

import pytest

_BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")
# kernel file, and a text each kernel's inlined source holds
_CASES = {"breakdown_normal": ("receive_channel", "__global__ void __launch_bounds__(1024, 1)\ncombine("),
          "breakdown_low_latency": ("\ndispatch(const __nv_bfloat16", "\ncombine(const __nv_bfloat16")}


def _kernel_variants():
    """benchmarks/kernel_variants.py (a development tool, not in the package)."""
    spec = importlib.util.spec_from_file_location("kernel_variants", os.path.join(_BENCH, "kernel_variants.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=sorted(_CASES))
def breakdown(request):
    sys.path.insert(0, _BENCH)  # the breakdowns import kernel_variants, beside them
    try:
        spec = importlib.util.spec_from_file_location(request.param, os.path.join(_BENCH, request.param + ".py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(_BENCH)
    module.expected_text = _CASES[request.param]
    return module


def test_every_variant_applies_to_the_current_kernels(breakdown):
    texts = breakdown.variant_sources()
    assert set(texts) == {"full"} | set(breakdown.VARIANTS)
    full = texts["full"]
    assert '#include "cupyep/' not in full  # headers inlined
    for text in breakdown.expected_text:
        assert text in full
    for name in breakdown.VARIANTS:
        assert texts[name] != full, name


def test_a_stale_anchor_is_reported(breakdown, monkeypatch):
    monkeypatch.setitem(breakdown.VARIANTS, "stale", [("text no kernel contains", "")])
    with pytest.raises(ValueError, match="stale"):
        breakdown.variant_sources()


def test_variants_are_on_disk_inside_the_block_only():
    from mpi4py import MPI

    from cupyep import jit
    kernel_variants = _kernel_variants()
    variants = {"edited": [("// Cross-rank barrier: one block", "// edited")]}
    comm = MPI.COMM_WORLD
    with kernel_variants.on_disk(comm, "intranode.cu", variants) as paths:
        assert set(paths) == {"full", "edited"}
        here = [os.path.exists(os.path.join(jit.kernel_dir(), p)) for p in paths.values()]
        comm.Barrier()
    comm.Barrier()  # rank 0 has removed them
    gone = [not os.path.exists(os.path.join(jit.kernel_dir(), p)) for p in paths.values()]
    assert comm.allreduce(all(here) and all(gone), op=MPI.LAND)


def test_a_stale_anchor_raises_on_every_rank():
    from mpi4py import MPI

    kernel_variants = _kernel_variants()
    with pytest.raises(ValueError, match="stale"):
        with kernel_variants.on_disk(MPI.COMM_WORLD, "intranode.cu", {"stale": [("no such text", "")]}):
            pass
