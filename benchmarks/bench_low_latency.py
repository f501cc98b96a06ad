"""Low-latency dispatch/combine latency, with the NCCL baseline.

    mpirun -n 2 python benchmarks/bench_low_latency.py [--transports auto nvshmem]

Protocol (docs/measuring.md): 128 tokens per rank, hidden 7168, top-8 of 288 experts,
random routing, FP8 dispatch and BF16 combine. Reported per transport: time of
one dispatch and one combine (CUDA events around calls queued behind a spin
kernel, so kernels run back to back; median of --iters, slowest rank), one
dispatch + combine pair replayed from a CUDA graph, the send and receive
halves of hook mode, and the host cost of each call from Python. With torch
installed, also the median kernel duration from the CUDA profiler (kineto), the
way DeepEP's tests time their low-latency kernels: the events above also
count the gaps between kernels.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import cupyep  # noqa: E402
from cupyep.formats import fp8  # noqa: E402

from cupyep.bench import (add_protocol_args, low_latency_setup, profiled_kernels, queued_step_times,  # noqa: E402
                          random_bf16, teardown)


def profiled_kernel_times(steps, iters, names):
    """Median profiler duration (us) of the kernels whose names contain each
    of ``names``; None without torch (cupyep.bench.profiled_kernels)."""
    kernels = profiled_kernels(steps, iters)
    if kernels is None:
        return None
    durations = {n: [d for k, v in kernels.items() if n in k for d in v] for n in names}
    return [statistics.median(d) if d else float("nan") for d in durations.values()]


def protocol_calls(buf, group, x, idx, w, args):
    """(dispatch(**kw), combine(handle, **kw), y) at the protocol's shapes;
    y: [L, R*M, H] bf16 expert outputs, all ones."""
    import cupy
    m, e = args.tokens, args.experts
    dispatch = lambda **kw: buf.low_latency_dispatch(x, idx, m, e, use_fp8=True, **kw)  # noqa: E731
    y = cupy.ones((e // group.size, group.size * m, args.hidden), fp8.bfloat16)
    combine = lambda h, **kw: buf.low_latency_combine(y, idx, w, h, **kw)  # noqa: E731
    return dispatch, combine, y


def pair_steps(dispatch, combine, state):
    """A dispatch step (its result in state["d"]) and a combine step of its handle."""
    def d_step():
        state["d"] = dispatch()

    def c_step():
        combine(state["d"].handle)
    return d_step, c_step


def kernel_durations(buf, group, x, idx, w, args):
    """{"kernel_dispatch", "kernel_combine"}: profiler durations (us), or {}
    without torch. Run last: the profiler slows launches after it."""
    import cupy
    dispatch, combine, _ = protocol_calls(buf, group, x, idx, w, args)
    cupy.cuda.Device().synchronize()
    group.comm.Barrier()
    times = profiled_kernel_times(list(pair_steps(dispatch, combine, {})), args.iters,
                                  ["ll::dispatch", "ll::combine"])
    cupy.cuda.Device().synchronize()
    group.comm.Barrier()
    return {} if times is None else dict(zip(("kernel_dispatch", "kernel_combine"), times))


def measure(buf, group, x, idx, w, args):
    """Latencies in microseconds for the current transport."""
    import cupy
    dispatch, combine, y = protocol_calls(buf, group, x, idx, w, args)
    for _ in range(args.warmup):
        combine(dispatch().handle)
    cupy.cuda.Device().synchronize()
    group.comm.Barrier()
    state = {}
    d_step, c_step = pair_steps(dispatch, combine, state)

    def d_send():
        state["d"] = dispatch(return_recv_hook=True)

    def c_send():
        state["c"] = combine(state["d"].handle, return_recv_hook=True)

    res = dict(zip(("dispatch", "combine"), queued_step_times([d_step, c_step], args.iters)))
    cupy.cuda.Device().synchronize()
    group.comm.Barrier()
    # Loaded before it is timed: a module load stalls the queue, and the rounds
    # behind it would time the host's launches instead of the kernels.
    buf.low_latency_combine(y, idx, w, dispatch().handle, use_logfmt=True)
    cupy.cuda.Device().synchronize()
    group.comm.Barrier()
    res["combine_logfmt"] = queued_step_times([d_step, lambda: buf.low_latency_combine(
        y, idx, w, state["d"].handle, use_logfmt=True)], args.iters)[1]
    # LogFMT's error against the BF16 combine, on random expert outputs
    y_rand = random_bf16(y.shape)
    as_f32 = lambda a: (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)  # noqa: E731
    exact = as_f32(buf.low_latency_combine(y_rand, idx, w, dispatch().handle).combined_x)
    coded = as_f32(buf.low_latency_combine(y_rand, idx, w, dispatch().handle, use_logfmt=True).combined_x)
    res["logfmt_error"] = float(cupy.abs(coded - exact).max() / cupy.abs(exact).max())
    # Where LogFMT's time goes: its halves (send = encode + write, receive =
    # wait + decode + sum) beside BF16's, on all-ones rows (a group of equal
    # magnitudes codes without division) and on random rows.
    for tag, rows in (("ones", y), ("random", y_rand)):
        for fmt in ("bf16", "logfmt"):
            def send(rows=rows, lf=fmt == "logfmt"):
                state["c"] = buf.low_latency_combine(rows, idx, w, state["d"].handle, use_logfmt=lf,
                                                     return_recv_hook=True)
            res.update(zip((f"send_combine_{fmt}_{tag}", f"recv_combine_{fmt}_{tag}"),
                           queued_step_times([d_step, send, lambda: state["c"].hook()], args.iters)[1:]))
    del y_rand
    cupy.cuda.Device().synchronize()
    group.comm.Barrier()
    res.update(zip(("send_dispatch", "recv_dispatch", "send_combine", "recv_combine"),
                   queued_step_times([d_send, lambda: state["d"].hook(), c_send, lambda: state["c"].hook()],
                             args.iters)))
    cupy.cuda.Device().synchronize()
    group.comm.Barrier()

    # Host cost of each call from Python (the GPU keeps up, so no queue builds).
    host_d, host_c = [], []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        d = dispatch()
        t1 = time.perf_counter()
        combine(d.handle)
        t2 = time.perf_counter()
        host_d.append(t1 - t0)
        host_c.append(t2 - t1)
    res.update(host_dispatch=statistics.median(host_d) * 1e6, host_combine=statistics.median(host_c) * 1e6)
    if args.profile and group.rank == 0:
        import cProfile
        import pstats
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(100):
            combine(dispatch().handle)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(14)
    elif args.profile:
        for _ in range(100):
            combine(dispatch().handle)
    cupy.cuda.Device().synchronize()
    group.comm.Barrier()

    # One dispatch + combine pair from a CUDA graph.
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        combine(dispatch().handle)
        stream.synchronize()
        group.comm.Barrier()
        stream.begin_capture()
        combine(dispatch().handle)
        graph = stream.end_capture()
        res["graph_pair"] = queued_step_times([lambda: graph.launch(stream)], args.iters)[0]
        stream.synchronize()
        host = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            graph.launch(stream)
            host.append(time.perf_counter() - t0)
            stream.synchronize()
        res["host_graph"] = statistics.median(host) * 1e6
    group.comm.Barrier()
    return res


def nccl_baseline(group, x, idx, args, iters, warmup):
    """torch all_to_all_single of one row per (token, expert) after an index_select."""
    import torch
    import torch.distributed as dist
    from cupyep.comm.torch_comm import init_torch_distributed
    init_torch_distributed(group.comm, "nccl")
    x_t, idx_t = torch.from_dlpack(x), torch.from_dlpack(idx)
    local = args.experts // group.size
    flat = idx_t.flatten()
    valid = torch.nonzero(flat >= 0).squeeze(1)
    dest = flat[valid] // local
    order = torch.argsort(dest, stable=True)
    rows = (valid[order] // idx_t.shape[1])
    send_splits = torch.bincount(dest, minlength=group.size).tolist()
    recv_splits = group.comm.alltoall(send_splits)
    out = torch.empty(sum(recv_splits), x_t.shape[1], dtype=x_t.dtype, device=x_t.device)

    def run():
        dist.all_to_all_single(out, x_t.index_select(0, rows), recv_splits, send_splits)
    for _ in range(warmup):
        run()
    return queued_step_times([run], iters)[0]  # queued like cupyep's calls


def main():
    ap = argparse.ArgumentParser()
    add_protocol_args(ap, tokens=128, experts=288)
    ap.add_argument("--transports", nargs="*", default=["auto", "nvshmem"])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--no-nccl", action="store_true")
    ap.add_argument("--profile", action="store_true", help="cProfile 100 calls on rank 0")
    args = ap.parse_args()

    group = cupyep.Group()
    buf, x, idx, w = low_latency_setup(group, args)

    results = {}
    for tr in args.transports:
        buf.set_low_latency_transport(tr)
        results[tr] = measure(buf, group, x, idx, w, args)
    nccl = None if args.no_nccl else nccl_baseline(group, x, idx, args, args.iters, args.warmup)
    for tr in args.transports:
        buf.set_low_latency_transport(tr)
        results[tr].update(kernel_durations(buf, group, x, idx, w, args))

    rows = group.comm.gather((results, nccl), root=0)
    if group.rank == 0:
        from cupyep.comm.runtime import card_label
        print(f"\ncupyep low-latency kernels, {card_label(group)}, {args.tokens} tokens x {args.hidden}, "
              f"top-{args.topk} of {args.experts} experts, FP8 dispatch, BF16 combine "
              f"(median of {args.iters}, slowest rank)")
        keys = [("dispatch", "dispatch"), ("combine", "combine"),
                ("kernel_dispatch", "dispatch kernel (profiler)"), ("kernel_combine", "combine kernel (profiler)"),
                ("combine_logfmt", "combine (LogFMT)"),
                *[(f"{half}_combine_{fmt}_{data}", f"hook: {fmt} {half}, {data}")
                  for data in ("ones", "random") for fmt in ("bf16", "logfmt") for half in ("send", "recv")],
                ("graph_pair", "graph: dispatch+combine"),
                ("send_dispatch", "hook: dispatch send"), ("recv_dispatch", "hook: dispatch recv"),
                ("send_combine", "hook: combine send"), ("recv_combine", "hook: combine recv"),
                ("host_dispatch", "host cost: dispatch call"), ("host_combine", "host cost: combine call"),
                ("host_graph", "host cost: graph replay")]
        print(f"{'':28}" + "".join(f"{tr:>14}" for tr in args.transports))
        for key, label in keys:
            if any(key not in rw[0][tr] for rw in rows for tr in args.transports):
                continue  # no profiler (torch) on some rank
            cells = "".join(f"{max(rw[0][tr][key] for rw in rows):11.1f} us" for tr in args.transports)
            print(f"{label:28}{cells}")
        print("LogFMT combine, max |error| / max |BF16 combine| on random normal expert outputs: " +
              ", ".join(f"{tr} {max(rw[0][tr]['logfmt_error'] for rw in rows):.2e}" for tr in args.transports))
        if nccl is not None:
            print(f"NCCL baseline (index_select + all_to_all_single, bf16 rows per (token, expert), queued): "
                  f"{max(rw[1] for rw in rows):.1f} us")
    teardown(buf, group)


if __name__ == "__main__":
    main()
