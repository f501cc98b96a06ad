"""What Python hands the kernels must match their source (no GPU needed):
every kernel's parameter names (cupyep.jit.args), the NVLink and RDMA
buffers' layout structs and constants."""
import os
import re

import pytest

from cupyep import jit
from cupyep.backends.gpu import low_latency as gpu_low_latency
from cupyep.jit import args as kernel_args
from cupyep.layouts import sizing


def _kernel_params(file: str) -> dict:
    """{kernel: parameter names} of every __global__ function of raw_kernels/cupyep/<file>.cu."""
    with open(os.path.join(jit.kernel_dir(), "cupyep", f"{file}.cu")) as f:
        src = f.read()
    out = {}
    for m in re.finditer(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(", src):
        depth, j = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(src[j], 0)
            j += 1
        out[m.group(1)] = [re.findall(r"\w+", p)[-1] for p in src[m.end():j - 1].split(",") if p.strip()]
    return out


@pytest.mark.parametrize("kernel", sorted(kernel_args.PARAMS))
def test_declared_parameters_match_the_kernels(kernel):
    """Arguments are built by parameter name: the names and their order must
    be the kernel's own."""
    file, name = kernel.split(".")
    assert _kernel_params(file)[name] == list(kernel_args.PARAMS[kernel])


def test_every_launched_kernel_has_its_parameters_declared():
    for file in ("layout", "intranode", "internode", "low_latency"):
        for name in _kernel_params(file):
            assert f"{file}.{name}" in kernel_args.PARAMS, f"{file}.cu's {name} has no parameter list"


def test_arguments_are_given_by_name():
    args = kernel_args.kernel_args("low_latency.barrier", slots=1, peers=2, force_put=0, rank=0, num_ranks=2,
                                   seq=3, mask=4, shrink=0, err=5, timeout_ns=6)
    assert list(args) == [1, 2, 0, 0, 2, 3, 4, 0, 5, 6]
    with pytest.raises(Exception, match="missing.*'timeout_ns'"):
        kernel_args.kernel_args("low_latency.barrier", slots=1, peers=2, force_put=0, rank=0, num_ranks=2,
                                seq=3, mask=4, shrink=0, err=5)
    with pytest.raises(Exception, match="unknown.*'extra'"):
        kernel_args.kernel_args("intranode.barrier", peers=1, layout=2, rank=0, counters=3, err=4, timeout_ns=5,
                                call_tag=6, extra=7)
    block = gpu_low_latency.arg_block("low_latency.barrier", slots=1, peers=2, force_put=True, rank=0,
                                      num_ranks=2, seq=3, mask=4, shrink=False, err=5, timeout_ns=-1)
    assert list(block.values) == [1, 2, 1, 0, 2, 3, 4, 0, 5, -1]


def _nvl_layout_header() -> str:
    with open(os.path.join(jit.kernel_dir(), "cupyep", "nvl_layout.cuh")) as f:
        return f.read()


def test_arg_plan_keeps_fixed_arguments_and_sets_the_per_call_ones(monkeypatch):
    """An ArgPlan's block holds every parameter in the kernel's order: the
    fixed ones as built, the per-call ones as each launch gives them."""
    launches = []

    class FakeKernel:  # PackedKernel without a GPU: records each launch's block
        def __init__(self, spec, num_args):
            self.num_args = num_args

        def launch_block(self, grid, block, args, stream_ptr, shared_mem=0):
            launches.append((grid, block, list(args.values), stream_ptr, shared_mem))

    monkeypatch.setattr(jit, "PackedKernel", FakeKernel)
    names = kernel_args.PARAMS["intranode.barrier"]
    fixed = dict(peers=11, layout=12, rank=3, counters=14, err=15)
    plan = jit.ArgPlan("intranode.barrier", None, 1, 32, ("timeout_ns", "call_tag"), **fixed)
    plan.launch(99, 5_000_000_000, 7)
    plan.launch(99, 6, 8)
    first, second = (dict(zip(names, v[2])) for v in launches)
    assert first == dict(fixed, timeout_ns=5_000_000_000, call_tag=7)
    assert second == dict(fixed, timeout_ns=6, call_tag=8)
    assert launches[0][:2] == (1, 32) and launches[0][3] == 99
    with pytest.raises(jit.CupyepError, match="missing.*call_tag"):
        jit.ArgPlan("intranode.barrier", None, 1, 32, ("timeout_ns",), **fixed)


def test_layout_struct_fields_match_the_kernels():
    struct = re.search(r"struct NvlLayout \{(.*?)\};", _nvl_layout_header(), re.S).group(1)
    fields = re.findall(r"long long (\w+);", struct)
    assert tuple(fields) == sizing.NVL_LAYOUT_FIELDS
    lay = sizing.nvl_layout(4, 7168, 8, 4096)
    words = sizing.nvl_layout_words(lay, 341)
    assert len(words) == len(fields) and words[fields.index("combine_flags")] == lay.combine_flags
    assert words[-1] == 341


def test_rdma_layout_struct_fields_match_the_kernels():
    with open(os.path.join(jit.kernel_dir(), "cupyep", "internode.cu")) as f:
        struct = re.search(r"struct RdmaLayout \{(.*?)\};", f.read(), re.S).group(1)
    fields = re.findall(r"long long (\w+);", struct)
    assert tuple(fields) == sizing.RDMA_LAYOUT_FIELDS
    lay = sizing.rdma_layout(4, 2, 7168, 8, 1024)
    words = sizing.rdma_layout_words(lay, 85)
    assert len(words) == len(fields) and words[fields.index("call_tags")] == lay.call_tags
    assert words[fields.index("slots_per_channel")] == 85 and lay.call_tags + 16 * 4 <= lay.recv


def test_call_tags_sit_in_the_control_regions():
    for r in (1, 2, 3, 8, 64):
        lay = sizing.nvl_layout(r, 7168, 8, 128)
        assert lay.call_tags % 8 == 0 and lay.call_tags + 16 * r <= lay.rows == sizing.control_bytes(r)


@pytest.mark.parametrize("name, value", [("kMaxChannels", sizing.MAX_CHANNELS),
                                         ("kMaxLocalExperts", sizing.MAX_LOCAL_EXPERTS),
                                         ("kCombineFlags", sizing.COMBINE_FLAGS)])
def test_layout_constants_match_the_kernels(name, value):
    m = re.search(r"constexpr int " + name + r" = (\d+);", _nvl_layout_header())
    assert m and int(m.group(1)) == value


def test_rank_limits_match_the_kernels():
    """Python refuses the rank counts the kernels cannot take, on both backends."""
    with open(os.path.join(jit.kernel_dir(), "cupyep", "intranode.cu")) as f:
        intranode = f.read()
    with open(os.path.join(jit.kernel_dir(), "cupyep", "common.cuh")) as f:
        warp = int(re.search(r"constexpr int kWarpSize = (\d+);", f.read()).group(1))
    assert "static_assert(kNumRanks <= kWarpSize" in intranode and sizing.MAX_NVL_RANKS == warp
    from cupyep.buffer import check_rank_limits
    from cupyep.errors import InvalidInputError
    check_rank_limits(sizing.MAX_RANKS, sizing.MAX_NVL_RANKS)
    with pytest.raises(InvalidInputError, match="NVLink domain"):
        check_rank_limits(33, 33)
    with pytest.raises(InvalidInputError, match="at most 64 ranks"):
        check_rank_limits(65, 8)
