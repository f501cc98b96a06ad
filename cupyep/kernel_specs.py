"""The kernel instantiations the library launches, for compile checks.

``representative_specs()`` lists one instantiation per kernel and code path
at the sizes used in tests and benchmarks; the CPU test suite compiles each
for sm_90 with NVRTC so a broken kernel fails CI without a GPU.
"""
from __future__ import annotations

from .jit import KernelSpec


def _k(source, name, *targs, nvshmem=False):
    return KernelSpec(f"cupyep/{source}", f"cupyep::{name}", tuple(targs), nvshmem)


def representative_specs():
    specs = []
    for idx_t in ("long long", "int"):
        specs.append(_k("layout.cu", "get_dispatch_layout", ("IdxT", idx_t), ("kNumTopk", 8)))
    for r in (2, 3, 4, 8):
        specs.append(_k("intranode.cu", "barrier", ("kNumRanks", r)))
        specs.append(_k("intranode.cu", "notify_dispatch", ("kNumRanks", r)))
        specs.append(_k("intranode.cu", "combine", ("kNumRanks", r), ("kHiddenInt4", 896), ("kNumTopk", 8)))
        # bf16 with top-k, FP8 with scales, cached (no top-k)
        specs.append(_k("intranode.cu", "dispatch", ("kNumRanks", r), ("kHiddenInt4", 896),
                        ("kNumScales", 0), ("kNumTopk", 8), ("IdxT", "long long")))
        specs.append(_k("intranode.cu", "dispatch", ("kNumRanks", r), ("kHiddenInt4", 448),
                        ("kNumScales", 56), ("kNumTopk", 8), ("IdxT", "int")))
        specs.append(_k("intranode.cu", "dispatch", ("kNumRanks", r), ("kHiddenInt4", 320),
                        ("kNumScales", 0), ("kNumTopk", 0), ("IdxT", "long long")))
    specs.append(_k("intranode.cu", "combine", ("kNumRanks", 2), ("kHiddenInt4", 320), ("kNumTopk", 0)))
    specs.append(_k("bench_kernels.cu", "store_to_peers", ("kNumRanks", 4)))
    specs.append(_k("bench_kernels.cu", "spin_ns"))
    for rows, prefetch in ((1, 0), (2, 1), (4, 2)):
        specs.append(_k("bench_kernels.cu", "row_sum_probe", ("kHiddenInt4", 896), ("kNumRows", rows),
                        ("kPrefetch", prefetch)))
    specs += low_latency_specs()
    return specs


def low_latency_specs(nvshmem=False):
    """FP8 (plain, power-of-two scales with UE8M0) and BF16 dispatch; combine, plain and LogFMT."""
    return [
        _k("low_latency.cu", "ll::dispatch", ("kHidden", 7168), ("kFp8", "true"),
           ("kRoundScale", "false"), ("kUe8m0", "false"), ("IdxT", "long long"), nvshmem=nvshmem),
        _k("low_latency.cu", "ll::dispatch", ("kHidden", 2048), ("kFp8", "true"),
           ("kRoundScale", "true"), ("kUe8m0", "true"), ("IdxT", "int"), nvshmem=nvshmem),
        _k("low_latency.cu", "ll::dispatch", ("kHidden", 5120), ("kFp8", "false"),
           ("kRoundScale", "false"), ("kUe8m0", "false"), ("IdxT", "long long"), nvshmem=nvshmem),
        _k("low_latency.cu", "ll::combine", ("kHidden", 7168), ("kLogFmt", "false"),
           ("IdxT", "long long"), nvshmem=nvshmem),
        _k("low_latency.cu", "ll::combine", ("kHidden", 2048), ("kLogFmt", "true"),
           ("IdxT", "int"), nvshmem=nvshmem),
    ]


def internode_specs():
    """Inter-node kernels (always NVSHMEM-linked): 2 x 1, 2 x 2 and 4 x 2 layouts."""
    specs = []
    for r, p in ((2, 1), (4, 2), (8, 2)):
        specs += [
            _k("internode.cu", "rdma_barrier", ("kNumRanks", r), nvshmem=True),
            _k("internode.cu", "notify_dispatch", ("kNumRanks", r), ("kRanksPerNode", p), nvshmem=True),
            _k("internode.cu", "dispatch", ("kNumRanks", r), ("kRanksPerNode", p), ("kHiddenInt4", 896),
               ("kNumScales", 0), ("kNumTopk", 8), ("IdxT", "long long"), nvshmem=True),
            _k("internode.cu", "combine", ("kNumRanks", r), ("kRanksPerNode", p), ("kHiddenInt4", 896),
               ("kNumTopk", 8), nvshmem=True),
        ]
    specs += [
        _k("internode.cu", "dispatch", ("kNumRanks", 4), ("kRanksPerNode", 2), ("kHiddenInt4", 448),
           ("kNumScales", 56), ("kNumTopk", 8), ("IdxT", "int"), nvshmem=True),
        _k("internode.cu", "dispatch", ("kNumRanks", 4), ("kRanksPerNode", 2), ("kHiddenInt4", 320),
           ("kNumScales", 0), ("kNumTopk", 0), ("IdxT", "long long"), nvshmem=True),
        _k("internode.cu", "combine", ("kNumRanks", 4), ("kRanksPerNode", 2), ("kHiddenInt4", 320),
           ("kNumTopk", 0), nvshmem=True),
    ]
    return specs


def nvshmem_specs():
    """Kernels linked with NVSHMEM's device library."""
    return ([_k("nvshmem_probe.cu", "put_signal_probe", nvshmem=True)] + low_latency_specs(nvshmem=True)
            + internode_specs())
