"""Host cost of each call from Python, per framework, beside its kernel time.

    mpirun -n N python benchmarks/bench_host.py [--frameworks torch cupy jax] [--iters 200]

What a serving loop feels: for every call, (1) the host time of one call with
the GPU idle (``perf_counter`` around the call, the ranks lined up by a
barrier and the device synchronised before each; the call returns once its
kernels are queued, except a normal dispatch without ``num_worst_tokens``,
which waits for the counts of its notify kernel: a row after it gives its
host time less that wait), (2) the host time of one
call while the GPU is busy (calls queued behind a spin kernel that outlasts
them, each timed alone, median; not for the calls that wait for counts): the
host's own cost, with no idle device to wake, (3) the time per call of a
back-to-back loop of calls (queued without synchronising; the last one
waited for), and (4) the kernel time of the same call from the CUDA profiler.
When (3) is close to (4) the host cost hides behind the kernels.

``--stages`` (torch, one rank): where a low-latency call's host time goes
(and pieces of normal calls),
each piece timed alone in a tight loop of 2000 (so with warm caches, unlike
(1)): the outputs (one torch allocation carved into views, or a kept set),
the frontend and stream, the validation, the launch plan's lookup, the
argument slots, the result objects, one launch from a packed argument
block, and the whole calls timed the same way (a dispatch's tight loop is
bound by its kernel once the host is faster); what the pieces leave is
Python's calls between them.
``--profile N``: Python's cProfile around N calls of each call in a
tight loop, the functions that take most per call (their own and cumulative
us, profiled: cProfile inflates small functions ~2-3x; compare within a run),
printed for rank 0.

Shapes: low latency 128 tokens x 7168, top-8 of 288 experts, FP8 dispatch,
BF16 combine; normal --normal-tokens x 7168, top-8 of 256 experts.
Frameworks: torch tensors, CuPy arrays, JAX arrays (each where installed),
and the DeepEP facade (torch). Median over --iters. One rank per GPU for
figures (ranks that share a GPU are flagged).
"""
import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time

import numpy as np

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX beside torch and CuPy
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import cupyep  # noqa: E402
from cupyep.formats import fp8  # noqa: E402
from cupyep.bench import busy_for, experts_for_ranks, profiled_kernels  # noqa: E402


def host_us(call, iters, group, waited=None):
    """Median host time (us) of one call, the GPU idle and the ranks lined up.
    ``waited``: seconds of it spent waiting (read after each call), left out."""
    import cupy
    times = []
    for _ in range(iters):
        cupy.cuda.Device().synchronize()
        group.comm.Barrier()
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0 - (waited() if waited else 0.0)) * 1e6)
    cupy.cuda.Device().synchronize()
    return statistics.median(times)


def queued_us(call, iters, group):
    """Median host time (us) of one call while the GPU is busy: ``iters``
    calls queued behind a spin kernel (150 us a call, so it outlasts them)."""
    import cupy
    cupy.cuda.Device().synchronize()
    group.comm.Barrier()
    busy_for(150 * iters)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e6)
    cupy.cuda.Device().synchronize()
    return statistics.median(times)


def loop_us(call, iters, group):
    """Time per call (us) of ``iters`` calls back to back, the last one waited for."""
    import cupy
    cupy.cuda.Device().synchronize()
    group.comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        call()
    cupy.cuda.Device().synchronize()
    return (time.perf_counter() - t0) * 1e6 / iters


def kernel_us(call, iters):
    """Summed median profiler duration (us) of the kernels one call launches."""
    kernels = profiled_kernels([call], iters)
    if kernels is None:
        return float("nan")
    return sum(statistics.median(v) for v in kernels.values())


def convert(arrays, framework):
    """CuPy arrays to ``framework`` (torch, cupy or jax), zero-copy."""
    import cupy
    out = []
    for a in arrays:
        if framework == "cupy":
            out.append(a)
        elif framework == "torch":
            import torch
            if a.dtype == fp8.bfloat16:
                out.append(torch.from_dlpack(a.view(np.int16)).view(torch.bfloat16))
            else:
                out.append(torch.from_dlpack(a))
        else:
            import jax.dlpack
            out.append(jax.dlpack.from_dlpack(cupy.ascontiguousarray(a)))
    return out


def low_latency_calls(buf, arrays, args, framework):
    """{name: call} for the low-latency dispatch, combine and the pair."""
    x, idx, w, y = arrays
    m, e = args.ll_tokens, args.ll_experts
    state = {}

    def dispatch():
        state["d"] = buf.low_latency_dispatch(x, idx, m, e, use_fp8=True)

    dispatch()
    handle = state["d"].handle

    def combine():
        buf.low_latency_combine(y, idx, w, handle)

    def pair():
        d = buf.low_latency_dispatch(x, idx, m, e, use_fp8=True)
        buf.low_latency_combine(y, idx, w, d.handle)

    buf.low_latency_combine(y, idx, w, handle)  # even number of calls: halves alternate
    return {"LL dispatch": dispatch, "LL combine": combine, "LL pair": pair}


def facade_calls(buf, arrays, args):
    x, idx, w, y = arrays
    m, e = args.ll_tokens, args.ll_experts

    def pair():
        _, _, handle, _, _ = buf.low_latency_dispatch(x, idx, m, e, use_fp8=True)
        buf.low_latency_combine(y, idx, w, handle)
    return {"LL pair (deep_ep facade)": pair}


def normal_calls(buf, arrays, args, framework):
    x, idx, w = arrays
    e = args.normal_experts
    lay = buf.get_dispatch_layout(idx, e)
    d = buf.dispatch(x, idx, w, layout=lay)
    worst = args.normal_tokens * buf.num_ranks

    def combine():
        buf.combine(d.recv_x, d.handle, d.recv_topk_weights)
    return {
        "layout": lambda: buf.get_dispatch_layout(idx, e),
        "dispatch (layout given, waits for counts)": lambda: buf.dispatch(x, idx, w, layout=lay),
        "dispatch (worst-token, no wait)": lambda: buf.dispatch(x, idx, w, layout=lay, num_worst_tokens=worst),
        "cached dispatch": lambda: buf.dispatch(x, handle=d.handle),
        "combine": combine,
    }


def tight_us(call, n=2000):
    """Mean time (us) of ``call`` in a tight loop of ``n`` (after 50 warm-up calls)."""
    import cupy
    for _ in range(50):
        call()
    cupy.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        call()
    dt = (time.perf_counter() - t0) * 1e6 / n
    cupy.cuda.Device().synchronize()
    return dt


def stage_rows(buf, arrays, args):
    """(piece, us) of a low-latency call from torch, each piece alone."""
    import torch
    from cupyep import jit, validation
    from cupyep.backends.gpu import low_latency as gpu_ll
    from cupyep.backends.gpu.call_tags import with_call
    from cupyep.backends.interface import LowLatencyDispatchOut
    from cupyep.types import LowLatencyDispatchResult, LowLatencyHandle
    x, idx, w, y = arrays
    m, e = args.ll_tokens, args.ll_experts
    d = buf.low_latency_dispatch(x, idx, m, e, use_fp8=True)
    buf.low_latency_combine(y, idx, w, d.handle)
    be, ll, fe = buf._impl, buf._impl.ll, buf._frontends["torch"]
    plan = next(p for key, p in ll._plans.items() if key[0] == "d")  # the dispatch's launch plan
    sets, v = plan.sets[fe], plan.args[0].values
    flat = torch.empty(1024, dtype=torch.int32, device=x.device)
    spin = jit.PackedKernel(jit.KernelSpec("cupyep/bench_kernels.cu", "cupyep::spin_ns"), 1)
    block = jit.ArgBlock([0])
    stream_ptr = fe.stream_ptr()
    t, h, k = x.shape[0], x.shape[1], idx.shape[1]

    def packs():  # a dispatch's per-call slots, as GpuLowLatency.dispatch writes them
        gpu_ll._PACK4(v, 8 * gpu_ll._D_X, 1, 2, t, k)
        gpu_ll._PACK8(v, 8 * gpu_ll._D_ARRAYS, 1, 2, 3, 4, 5, 6, 0, 0)
        v[gpu_ll._D_SHRINK] = 0
        gpu_ll._PACK2(v, 8 * gpu_ll._D_TIMEOUT, be.timeout_ns, with_call(plan.tag_base, be.seq, k))

    def objects():  # what a dispatch returns, through the backend's result and the handle
        state = gpu_ll.GpuLowLatencyState(None, plan.layout, 1, 2, 3)
        out = LowLatencyDispatchOut(None, None, None, None, None, state, 1)
        handle = LowLatencyHandle(1, 1, m, h, e, t, k, out.src_info, out.layout_range, state, "torch")
        return LowLatencyDispatchResult(None, None, None, handle)

    def pair():
        dd = buf.low_latency_dispatch(x, idx, m, e, use_fp8=True)
        buf.low_latency_combine(y, idx, w, dd.handle)
    return [
        ("torch.empty (one block)", tight_us(lambda: torch.empty(1024, dtype=torch.int32, device=x.device))),
        ("a view (torch.as_strided)", tight_us(lambda: torch.as_strided(flat, (32, 32), (32, 1), 0))),
        ("LL dispatch's 6 outputs (one block, views)", tight_us(lambda: fe.empty_many(plan.specs, True))),
        ("the same, a kept set handed out again", tight_us(lambda: fe.take_outputs(sets, be.caller_stream))),
        ("the frontend and the caller's stream", tight_us(lambda: buf._frontend(x))),
        ("validation of x and topk_idx", tight_us(lambda: validation.check_low_latency_dispatch(
            x, idx, m, e, buf.num_ranks, True, False, 16))),
        ("the launch plan's lookup", tight_us(lambda: ll._plans.get(
            ("d", m, h, e, True, False, False, idx.dtype, ll.transport, ll.source)))),
        ("the per-call argument slots (4 packs)", tight_us(packs)),
        ("the result objects (state, backend's, handle, result)", tight_us(objects)),
        ("one launch from an argument block", tight_us(lambda: spin.launch_block(1, 32, block, stream_ptr))),
        *launch_binding_rows(spin, block, stream_ptr),
        ("a torch op, for scale (tensor.zero_())", tight_us(flat.zero_)),
        ("LL dispatch, whole call", tight_us(lambda: buf.low_latency_dispatch(x, idx, m, e, use_fp8=True))),
        ("LL combine, whole call", tight_us(lambda: buf.low_latency_combine(y, idx, w, d.handle))),
        ("LL pair, whole calls", tight_us(pair)),
    ]


def launch_binding_rows(kernel, block, stream_ptr):
    """(piece, us) of the same launch (``kernel``, an argument block) by the
    driver's other Python bindings: where the launch's floor is."""
    import ctypes
    from cuda.bindings import driver
    fn, params = kernel._fn, block.params_addr
    f, s = driver.CUfunction(fn), driver.CUstream(stream_ptr)
    lib = ctypes.CDLL("libcuda.so.1")
    launch = lib.cuLaunchKernel
    launch.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
    return [
        ("  the same by cuda.bindings' cuLaunchKernel",
         tight_us(lambda: driver.cuLaunchKernel(f, 1, 1, 1, 32, 1, 1, 0, s, params, 0))),
        ("  the same by ctypes", tight_us(lambda: launch(fn, 1, 1, 1, 32, 1, 1, 0, stream_ptr, params, None))),
    ]


def normal_stage_rows(buf, arrays, args):
    """(piece, us) of a normal cached dispatch and combine from torch, each
    piece alone (the whole calls: the main table's queued/call column)."""
    import torch
    from cupyep import jit, validation
    from cupyep.backends.gpu.call_tags import normal_call_tag
    from cupyep.buffer import _check_layout
    from cupyep.types import DispatchHandle, DispatchResult
    x, idx, w = arrays
    lay = buf.get_dispatch_layout(idx, args.normal_experts)
    d = buf.dispatch(x, idx, w, layout=lay)
    h = d.handle
    t = x.shape[0]
    be, fe = buf._impl, buf._frontends["torch"]
    rows = h.num_recv_tokens
    combine_outputs = (((h.num_tokens, h.hidden), fp8.bfloat16), ((h.num_tokens, h.num_topk), np.float32))

    def stream_order():
        be._end(be._begin(None, False), False, ())

    def dispatch_checks():  # what Buffer.dispatch checks of its inputs, given a layout
        validation.check_bf16_rows(x)
        validation.check_topk(idx, w, t)
        _check_layout(lay, idx, None)
        validation.check_is_token_in_rank(lay.is_token_in_rank, t, buf.num_ranks)

    def dispatch_objects():  # what a dispatch returns beyond its arrays
        handle = DispatchHandle(1, t, h.hidden, rows, 0, h.num_topk, lay.is_token_in_rank, d.recv_x, h.state)
        return DispatchResult(d.recv_x, None, d.recv_topk_idx, d.recv_topk_weights, [], handle)
    return [
        ("normal: dispatch's input checks (x, top-k, layout, is_token_in_rank)", tight_us(dispatch_checks)),
        ("normal: a dispatch's handle and result objects", tight_us(dispatch_objects)),
        ("normal: a tensor's address (jit.address)", tight_us(lambda: jit.address(x))),
        ("normal: torch.empty((rows, hidden), ...), sizes in a tuple", tight_us(
            lambda: torch.empty((rows, h.hidden), dtype=torch.bfloat16, device=x.device))),
        ("normal: torch.empty(rows, hidden, ...), sizes as arguments", tight_us(
            lambda: torch.empty(rows, h.hidden, dtype=torch.bfloat16, device=x.device))),
        ("normal: validation of combine's x and topk_weights", tight_us(lambda: validation.check_normal_combine(
            d.recv_x, d.recv_topk_weights, rows, h.hidden, h.num_topk))),
        ("normal: validation of cached dispatch's x", tight_us(lambda: validation.check_bf16_rows(x))),
        ("normal: combine's two outputs (two allocations)", tight_us(lambda: [fe.empty(*sp) for sp in combine_outputs])),
        ("normal: the same, views of one block", tight_us(lambda: fe.empty_many(combine_outputs))),
        ("normal: cached dispatch's output (torch.empty)", tight_us(lambda: fe.empty((rows, h.hidden),
                                                                                     fp8.bfloat16))),
        ("normal: stream order and error word (_begin, _end)", tight_us(stream_order)),
        ("normal: the call tag", tight_us(lambda: normal_call_tag(be.seq, "combine", False, True, h.hidden,
                                                                  h.num_topk))),
        ("normal: the frontend and the caller's stream", tight_us(lambda: buf._frontend(x))),
        *waiting_dispatch_rows(buf, x, idx, w, lay, d),
    ]


def waiting_dispatch_rows(buf, x, idx, w, lay, d):
    """(piece, us) of a dispatch that waits for its counts, beyond its input
    checks and stream order (rows above): each piece of GpuBackend.dispatch
    alone, with the call's own shapes, so that their sum can be set against
    the whole call (the main table's "beyond the wait" row). Launches are the
    argument writes of the call's two launch plans here (a launch itself: the
    LL rows' "one launch from an argument block"): the real kernels are not
    launched alone."""
    import numpy as np
    from cupyep.backends.gpu.backend import GpuRouting, _table_words
    from cupyep.backends.gpu.call_tags import normal_call_tag
    from cupyep.backends.interface import NormalDispatchOut
    from cupyep.jit import address
    be, fe = buf._impl, buf._frontends["torch"]
    h = d.handle
    t, hidden, k = x.shape[0], x.shape[1], idx.shape[1]
    n, r = h.num_recv_tokens, buf.num_ranks
    local = lay.num_experts // r
    cfg = be._config(None)
    c = cfg.num_channels
    notify = next(p for key, p in be._launch_plans.items() if key[0] == "notify")
    dispatch = next(p for key, p in be._launch_plans.items() if key[0] == "dispatch")
    # x is bf16 here: recv_x, recv_topk_idx, recv_topk_weights, recv_src_idx
    outputs = (((n, hidden), fp8.bfloat16), ((n, k), np.int64), ((n, k), np.float32), (n, np.int32))
    tables = _table_words(t * r) + _table_words(r * c + 1) + local

    def setup():  # what the backend works out before the notify kernel
        cf = be._config(None)
        be._layout(hidden, k, cf.num_channels, t)
        normal_call_tag(be.seq, "dispatch", False, True, hidden, k, lay.num_experts)

    def slots(plan):  # ArgPlan.launch's writes, with the values the slots hold
        v = plan._block.values
        values = [v[i] for i in plan._slots]

        def write():
            for i, a in zip(plan._slots, values):
                v[i] = a
        return write

    def counts():  # the host-mapped counts read after the wait
        info = be.info_host
        int(info[1 + local]), int(info[2 + local])
        int(info[0])
        return info[1:1 + local].tolist()

    def addresses():  # the inputs' and outputs' addresses the two launches take
        for a in (x, idx, w, lay.is_token_in_rank, lay.num_tokens_per_expert, d.recv_x, d.recv_topk_idx,
                  d.recv_topk_weights, h.recv_src_idx, x):
            address(a)

    def objects():
        g = GpuRouting(1, 2, (), c, cfg.num_warps, None, None)
        return NormalDispatchOut(d.recv_x, None, d.recv_topk_idx, d.recv_topk_weights, [], h.recv_src_idx, n, g)
    return [
        ("waiting dispatch: config, NVLink layout, call tag", tight_us(setup)),
        ("waiting dispatch: routing tables (one allocation)", tight_us(lambda: be.call_array(
            "tables", tables, np.int32))),
        ("waiting dispatch: notify's per-call argument slots", tight_us(slots(notify))),
        ("waiting dispatch: the counts read after the wait", tight_us(counts)),
        (f"waiting dispatch: its {len(outputs)} outputs ({n} rows; allocated, then freed)", tight_us(
            lambda: [fe.empty(*sp) for sp in outputs])),
        ("waiting dispatch: dispatch's per-call argument slots", tight_us(slots(dispatch))),
        ("waiting dispatch: ten addresses", tight_us(addresses)),
        ("waiting dispatch: routing and backend result objects", tight_us(objects)),
    ]


def profile_rows(calls, n, top=20):
    """Per call in ``calls`` ({name: call}): (name, tight-loop us, [(own us,
    cumulative us, calls, function)] of the ``top`` functions by own time),
    from cProfile around ``n`` calls after a tight loop of as many unprofiled."""
    import cupy
    out = []
    for name, call in calls.items():
        loop = tight_us(call, n)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(n):
            call()
        prof.disable()
        cupy.cuda.Device().synchronize()
        rows = sorted(((v[2] * 1e6 / n, v[3] * 1e6 / n, v[1] / n, f"{os.path.basename(k[0])}:{k[1]}({k[2]})")
                       for k, v in pstats.Stats(prof).stats.items()), reverse=True)
        out.append((name, loop, rows[:top]))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frameworks", nargs="+", default=["torch", "cupy", "jax"])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--ll-tokens", type=int, default=128)
    ap.add_argument("--ll-experts", type=int, default=288)
    ap.add_argument("--normal-tokens", type=int, default=4096)
    ap.add_argument("--normal-experts", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--no-normal", action="store_true")
    ap.add_argument("--stages", action="store_true", help="where a call's host time goes (torch)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="cProfile of N calls of each call (first framework; rank 0 prints)")
    args = ap.parse_args()
    import cupy
    group = cupyep.Group()
    r = group.size
    args.ll_experts = experts_for_ranks(args.ll_experts, r)
    args.normal_experts = experts_for_ranks(args.normal_experts, r)
    h, k = args.hidden, args.topk
    nvl = cupyep.nvl_size_hint(h, args.normal_tokens, r, k)
    rdma = cupyep.low_latency_size_hint(args.ll_tokens, h, r, args.ll_experts)
    # The facade's buffer comes second: the symmetric heap must hold both.
    os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", str(nvl + 2 * rdma + (256 << 20)))
    buf = cupyep.Buffer(group, num_nvl_bytes=nvl, num_rdma_bytes=rdma, low_latency_mode=True, backend="gpu")
    rng = np.random.default_rng(1 + group.rank)

    def device_inputs(t, e):
        x = cupy.asarray(rng.standard_normal((t, h)).astype(fp8.bfloat16).view(np.uint16)).view(fp8.bfloat16)
        idx = cupy.asarray(np.argsort(rng.random((t, e)), axis=1)[:, :k].astype(np.int64))
        w = cupy.asarray(rng.random((t, k)).astype(np.float32))
        return x, idx, w

    ll = device_inputs(args.ll_tokens, args.ll_experts)
    y = cupy.ones((args.ll_experts // r, r * args.ll_tokens, h), fp8.bfloat16)
    normal = device_inputs(args.normal_tokens, args.normal_experts)
    rows = []  # (framework, call, host us, loop us, kernel us)
    available = []
    from mpi4py import MPI
    for fw in args.frameworks:
        try:
            __import__(fw)
            convert(ll[:1], fw)  # JAX may import yet have no GPU
            ok = True
        except Exception as e:  # noqa: BLE001 - reported, then the framework is left out
            print(f"rank {group.rank}: {fw} left out: {e!r}", flush=True)
            ok = False
        if group.comm.allreduce(ok, op=MPI.LAND):
            available.append(fw)
    facade = None
    profiles = []
    for fw in available:
        if fw == "torch":
            import torch
            torch.cuda.set_device(buf._impl.rt.device_id)
        calls = low_latency_calls(buf, convert((*ll, y), fw), args, fw)
        if fw == "torch":
            from cupyep import deep_ep
            facade = deep_ep.Buffer(group.comm, num_rdma_bytes=rdma, low_latency_mode=True,
                                    explicitly_destroy=True)
            calls.update(facade_calls(facade, convert((*ll, y), fw), args))
        if not args.no_normal:
            calls.update(normal_calls(buf, convert(normal, fw), args, fw))
        for name, call in calls.items():
            call()
            call()  # compiled, pools filled
            host = host_us(call, args.iters, group)
            queued = float("nan") if "waits" in name else queued_us(call, args.iters, group)
            loop = loop_us(call, args.iters, group)
            kern = kernel_us(call, min(args.iters, 50)) if fw == "torch" else float("nan")
            rows.append((fw, name, host, queued, loop, kern))
            if "waits" in name:  # the same calls' host time less their wait for the counts
                beyond = host_us(call, args.iters, group, waited=lambda: buf._impl.counts_wait_s)
                rows.append((fw, "  the same, beyond the wait for counts", beyond, float("nan"), float("nan"),
                             float("nan")))
        if args.profile and fw == available[0]:  # every rank: the calls are collective
            profiles = profile_rows(calls, args.profile)
    stages = []
    if args.stages and "torch" in available:
        stages = stage_rows(buf, convert((*ll, y), "torch"), args)
        if not args.no_normal:
            stages += normal_stage_rows(buf, convert(normal, "torch"), args)
    worst = [(fw, n, *(group.comm.allreduce(v, op=MPI.MAX) for v in (a, q, b)), c) for fw, n, a, q, b, c in rows]
    if group.rank == 0:
        from cupyep.comm.runtime import card_label
        print(f"\ncupyep host cost per call, {card_label(group)}; LL {args.ll_tokens} x {h}, top-{k} of "
              f"{args.ll_experts}, FP8 dispatch; normal {args.normal_tokens} x {h}, top-{k} of "
              f"{args.normal_experts}; median of {args.iters}, slowest rank")
        print(f"{'framework':9s} {'call':42s} {'host/call us':>12s} {'queued/call us':>14s} {'loop/call us':>12s} "
              f"{'kernels us':>10s}")
        for fw, n, a, q, b, c in worst:
            print(f"{fw:9s} {n:42s} {a:12.1f} {q:14.1f} {b:12.1f} {c:10.1f}")
        if stages:
            print("\nwhere a call's host time goes (torch, rank 0, tight loop of 2000, us)")
            for name, us in stages:
                print(f"{name:45s} {us:8.2f}")
        for name, loop, top in profiles:
            print(f"\n{available[0]} {name}: {loop:.1f} us a call in a tight loop of {args.profile}; "
                  "cProfile per call: own us, cumulative us, calls, function")
            for own, cum, calls_, fn in top:
                print(f"  {own:7.2f} {cum:8.2f} {calls_:5.1f}  {fn}")
    if facade is not None:
        facade.destroy()
    buf.destroy()
    group.destroy()


if __name__ == "__main__":
    main()
