"""The kernel instantiations the library launches.

One builder per kernel (``intranode_dispatch(...)`` ...) gives the
:class:`KernelSpec` of an instantiation from the values that shape its code.
``model_specs(...)`` lists every instantiation a model's calls launch, for
``cupyep.warmup``. ``representative_specs()`` lists one instantiation per
kernel and code path at the sizes used in tests and benchmarks; the CPU test
suite compiles each for sm_90 with NVRTC so a broken kernel fails CI without a
GPU.
"""
from __future__ import annotations

import functools

from cupyep.jit import KernelSpec


@functools.lru_cache(maxsize=None)  # one object per instantiation: launch caches look it up by identity
def _k(source, name, *targs, nvshmem=False):
    return KernelSpec(f"cupyep/{source}", f"cupyep::{name}", tuple(targs), nvshmem)


def layout_spec(idx_type: str, num_topk: int) -> KernelSpec:
    return _k("layout.cu", "get_dispatch_layout", ("IdxT", idx_type), ("kNumTopk", num_topk))


# The intranode builders' ``source``: the file under raw_kernels/cupyep (a
# kernel variant's copy in benchmarks/breakdown_normal.py).
def intranode_notify(num_ranks: int, source: str = "intranode.cu") -> KernelSpec:
    return _k(source, "notify_dispatch", ("kNumRanks", num_ranks))


def intranode_barrier(num_ranks: int, source: str = "intranode.cu") -> KernelSpec:
    return _k(source, "barrier", ("kNumRanks", num_ranks))


def intranode_dispatch(num_ranks: int, hidden_bytes: int, num_scales: int, num_topk: int,
                       idx_type: str, source: str = "intranode.cu") -> KernelSpec:
    """hidden_bytes: bytes of one row (H for FP8, 2H for BF16); num_scales: H/128 with FP8, else 0."""
    return _k(source, "dispatch", ("kNumRanks", num_ranks), ("kHiddenInt4", hidden_bytes // 16),
              ("kNumScales", num_scales), ("kNumTopk", num_topk), ("IdxT", idx_type))


def intranode_combine(num_ranks: int, hidden: int, num_topk: int, source: str = "intranode.cu") -> KernelSpec:
    """num_topk: K when weights are summed back, else 0."""
    return _k(source, "combine", ("kNumRanks", num_ranks), ("kHiddenInt4", hidden * 2 // 16),
              ("kNumTopk", num_topk))


def internode_spec(name: str, num_ranks: int, *targs) -> KernelSpec:
    """Inter-node kernels (NVSHMEM-linked): rdma_barrier, notify_dispatch, dispatch, combine."""
    return KernelSpec("cupyep/internode.cu", f"cupyep::{name}", (("kNumRanks", num_ranks),) + tuple(targs), True)


def internode_dispatch(num_ranks: int, ranks_per_node: int, hidden_bytes: int, num_scales: int, num_topk: int,
                       idx_type: str) -> KernelSpec:
    return internode_spec("dispatch", num_ranks, ("kRanksPerNode", ranks_per_node),
                          ("kHiddenInt4", hidden_bytes // 16), ("kNumScales", num_scales), ("kNumTopk", num_topk),
                          ("IdxT", idx_type))


def internode_combine(num_ranks: int, ranks_per_node: int, hidden: int, num_topk: int) -> KernelSpec:
    return internode_spec("combine", num_ranks, ("kRanksPerNode", ranks_per_node), ("kHiddenInt4", hidden * 2 // 16),
                          ("kNumTopk", num_topk))


def _flag(v: bool) -> str:
    return "true" if v else "false"


def low_latency_dispatch(hidden: int, fp8: bool, round_scale: bool, ue8m0: bool, idx_type: str,
                         nvshmem: bool, source: str = "cupyep/low_latency.cu") -> KernelSpec:
    return KernelSpec(source, "cupyep::ll::dispatch",
                      (("kHidden", hidden), ("kFp8", _flag(fp8)), ("kRoundScale", _flag(round_scale or ue8m0)),
                       ("kUe8m0", _flag(ue8m0)), ("IdxT", idx_type)), nvshmem)


def low_latency_combine(hidden: int, logfmt: bool, idx_type: str, nvshmem: bool,
                        source: str = "cupyep/low_latency.cu") -> KernelSpec:
    return KernelSpec(source, "cupyep::ll::combine",
                      (("kHidden", hidden), ("kLogFmt", _flag(logfmt)), ("IdxT", idx_type)), nvshmem)


def low_latency_barrier(nvshmem: bool, source: str = "cupyep/low_latency.cu") -> KernelSpec:
    return KernelSpec(source, "cupyep::ll::barrier", (), nvshmem)


def normal_call_specs(num_ranks: int, ranks_per_node: int, row_bytes: int, num_scales: int, num_topk: int,
                      idx_type: str, hidden: int):
    """The kernels a normal dispatch of these rows and its combine launch
    (rows of ``row_bytes`` bytes, ``hidden`` bf16 values back)."""
    r, p = num_ranks, ranks_per_node
    if p >= r:
        return [intranode_notify(r), intranode_dispatch(r, row_bytes, num_scales, num_topk, idx_type),
                intranode_barrier(r), intranode_combine(r, hidden, num_topk)]
    return [internode_spec("notify_dispatch", r, ("kRanksPerNode", p)),
            internode_dispatch(r, p, row_bytes, num_scales, num_topk, idx_type),
            internode_spec("rdma_barrier", r), internode_combine(r, p, hidden, num_topk)]


def model_specs(hidden: int, num_topk: int, num_experts, num_ranks, ranks_per_node=None, fp8: bool = True,
                bf16: bool = True, low_latency: bool = True, normal: bool = True, logfmt: bool = False,
                idx_types=("long long",), nvshmem_low_latency: bool = False):
    """Every instantiation the calls of a model launch.

    Args:
        hidden, num_topk: H and K.
        num_experts: E, or several (e.g. 256 for normal calls, 288 for low
            latency); only the layout kernel's shared memory depends on it, so
            it does not shape any instantiation (kept for the caller's record).
        num_ranks: R, or several rank counts.
        ranks_per_node: P (None or R: one NVLink domain; smaller: the
            inter-node kernels).
        fp8, bf16: which dispatch inputs (both: both).
        low_latency, normal: which kinds of call.
        logfmt: also the LogFMT low-latency combine.
        idx_types: C++ types of topk_idx ("long long" for int64, "int").
        nvshmem_low_latency: also the NVSHMEM-linked low-latency kernels
            (peers without an NVLink mapping, or transport='nvshmem').

    Returns:
        list of KernelSpec, without duplicates, in a stable order.
    """
    ranks = [num_ranks] if isinstance(num_ranks, int) else list(num_ranks)
    dtypes = [d for d, on in (("fp8", fp8), ("bf16", bf16)) if on]
    specs = []
    for r in ranks:
        p = r if ranks_per_node is None else min(ranks_per_node, r)
        for idx_t in idx_types:
            if normal:
                specs.append(layout_spec(idx_t, num_topk))
                for d in dtypes:
                    row, scales = (hidden, hidden // 128) if d == "fp8" else (2 * hidden, 0)
                    for k, it in ((num_topk, idx_t), (0, "long long")):  # with top-k; cached / plain rows
                        if p == r:
                            specs.append(intranode_dispatch(r, row, scales, k, it))
                        else:
                            specs.append(internode_dispatch(r, p, row, scales, k, it))
            if low_latency:
                for nv in (False, True) if nvshmem_low_latency else (False,):
                    for d in dtypes:
                        specs.append(low_latency_dispatch(hidden, d == "fp8", False, False, idx_t, nv))
                    for lf in (False, True) if logfmt else (False,):
                        specs.append(low_latency_combine(hidden, lf, idx_t, nv))
                    specs.append(low_latency_barrier(nv))  # clean_low_latency_buffer
        if normal:
            for k in (num_topk, 0):  # combine with weights summed back, and without
                specs.append(intranode_combine(r, hidden, k) if p == r else internode_combine(r, p, hidden, k))
            if p == r:
                specs += [intranode_notify(r), intranode_barrier(r)]
            else:
                specs += [internode_spec("notify_dispatch", r, ("kRanksPerNode", p)), internode_spec("rdma_barrier", r)]
    return list(dict.fromkeys(specs))


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
    """FP8 (plain, power-of-two scales with UE8M0) and BF16 dispatch; combine, plain and LogFMT;
    the barrier of clean_low_latency_buffer."""
    return [
        _k("low_latency.cu", "ll::barrier", nvshmem=nvshmem),
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
