"""Where the time of one normal call goes: each kernel it launches, timed by
the CUDA profiler, beside the call's time between CUDA events.

    mpirun -n 2 python benchmarks/profile_normal.py [--sms 16 24] [--iters 20]

Protocol of bench_normal.py (4096 tokens per rank, hidden 7168, top-8 of 256).
Calls are queued behind a spin kernel, so no host time enters: dispatch in
worst-token mode (no host synchronisation) and cached, FP8 and BF16, and
combine. The events also count the gaps between a call's launches. Median of
--iters per kernel, slowest rank. Needs torch (its profiler).
"""
import argparse
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import cupyep  # noqa: E402
from cupyep.formats import fp8  # noqa: E402
from cupyep.bench import add_protocol_args, experts_for_ranks, profiled_kernels, queued_times, random_inputs, teardown  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    add_protocol_args(ap, tokens=4096, experts=256)
    ap.add_argument("--sms", type=int, nargs="*", default=[16, 24])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()

    import cupy
    group = cupyep.Group()
    r = group.size
    args.experts = experts_for_ranks(args.experts, r)  # printed with the results
    buf = cupyep.Buffer(group, num_nvl_bytes=cupyep.nvl_size_hint(args.hidden, args.tokens + 64, r, args.topk),
                        backend="gpu")
    rng = np.random.default_rng(group.rank)
    x, idx, w, x_host, _ = random_inputs(rng, args.tokens, args.hidden, args.experts, args.topk)
    q, scales = fp8.per_token_cast_to_fp8(x_host)
    xq = (cupy.asarray(q.view(np.uint8)), cupy.asarray(scales))
    layout = buf.get_dispatch_layout(idx, args.experts)
    worst = args.tokens * r

    rows = []  # (SMs, call, events us, {kernel: median us})
    for sms in args.sms:
        cfg = cupyep.Config(num_sms=sms)
        d = buf.dispatch(x, idx, w, layout=layout, config=cfg)
        calls = {
            "FP8 dispatch, worst-token": lambda: buf.dispatch(xq, idx, w, layout=layout, config=cfg,
                                                              num_worst_tokens=worst),
            "BF16 dispatch, worst-token": lambda: buf.dispatch(x, idx, w, layout=layout, config=cfg,
                                                               num_worst_tokens=worst),
            "FP8 dispatch, cached": lambda: buf.dispatch(xq, handle=d.handle),
            "BF16 dispatch, cached": lambda: buf.dispatch(x, handle=d.handle),
            "BF16 combine": lambda: buf.combine(d.recv_x, d.handle, config=cfg),
        }
        for label, call in calls.items():
            for _ in range(args.warmup):
                call()
            cupy.cuda.Device().synchronize()
            group.comm.Barrier()
            t = queued_times(call, args.iters)
            cupy.cuda.Device().synchronize()
            group.comm.Barrier()
            kernels = profiled_kernels([call], args.iters)
            if kernels is None:
                raise SystemExit("profile_normal.py needs torch (its CUDA profiler)")
            rows.append((sms, label, t, {k: statistics.median(v) for k, v in kernels.items()}))
            cupy.cuda.Device().synchronize()
            group.comm.Barrier()

    everyone = group.comm.gather(rows, root=0)
    if group.rank == 0:
        from cupyep.comm.runtime import card_label
        print(f"\nnormal calls, {card_label(group)}, {args.tokens} tokens x {args.hidden}, top-{args.topk} of "
              f"{args.experts}; queued, median of {args.iters}, slowest rank; kernels from the CUDA profiler")
        for i, (sms, label, _, kernels) in enumerate(rows):
            t = max(rk[i][2] for rk in everyone)
            parts = [f"{k} {max(rk[i][3].get(k, float('nan')) for rk in everyone):.1f}" for k in sorted(kernels)]
            total = sum(max(rk[i][3].get(k, 0.0) for rk in everyone) for k in kernels)
            print(f"{sms:>3} SMs  {label:<27} call {t:7.1f} us = kernels {total:7.1f} + gaps {t - total:5.1f} | "
                  + "; ".join(parts))
    teardown(buf, group)


if __name__ == "__main__":
    main()
