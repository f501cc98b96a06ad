"""What Python hands the kernels must match their source (no GPU needed): the
low-latency calls' packed parameter blocks (cupyep.jit.PackedKernel), and the
NVLink buffer's layout struct and constants."""
import os
import re

import pytest

from cupyep import gpu_low_latency, jit, sizing


def _param_names(source: str, kernel: str) -> list:
    m = re.search(r"\n" + kernel + r"\(([^)]*)\)\s*\{", source)
    assert m, f"{kernel} not found"
    return [re.findall(r"\w+", p)[-1] for p in m.group(1).split(",") if p.strip()]


@pytest.mark.parametrize("kernel, declared", [("dispatch", gpu_low_latency.DISPATCH_PARAMS),
                                              ("combine", gpu_low_latency.COMBINE_PARAMS),
                                              ("barrier", gpu_low_latency.BARRIER_PARAMS)])
def test_declared_parameters_match_the_kernels(kernel, declared):
    """Argument blocks are built by parameter name: the names and their order
    must be the kernel's."""
    with open(os.path.join(jit.kernel_dir(), "cupyep", "low_latency.cu")) as f:
        source = f.read()
    assert _param_names(source, kernel) == list(declared)


def test_arg_block_needs_every_parameter_by_name():
    block = gpu_low_latency.arg_block(("a", "b"), b=2, a=-1)
    assert list(block.values) == [-1, 2]
    with pytest.raises(Exception, match="missing.*'b'"):
        gpu_low_latency.arg_block(("a", "b"), a=1)
    with pytest.raises(Exception, match="unknown.*'c'"):
        gpu_low_latency.arg_block(("a",), a=1, c=3)


def _nvl_layout_header() -> str:
    with open(os.path.join(jit.kernel_dir(), "cupyep", "nvl_layout.cuh")) as f:
        return f.read()


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
