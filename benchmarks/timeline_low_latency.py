"""When each warp of the low-latency combine reaches each step: a copy of the
kernels with timestamps (a development tool beside breakdown_low_latency.py).

    mpirun -n 1 python benchmarks/timeline_low_latency.py [--rows bf16 bf16_no_rows logfmt logfmt_no_encode]

Every warp's lane 0 writes %globaltimer (ns) and clock64 (SM cycles) at
these points of one combine (send and receive in one launch), into a
__device__ array of the variant, read after the kernel:

    start      kernel entry
    prefix     LogFMT: the chunk's units numbered (number_units: per-slice sums)
    staged     LogFMT: the warp's first unit found and its copy issued
    units      LogFMT: the warp's last unit sent (before its last count)
    counted    LogFMT: that count done (its flags set)
    sent       send half returned
    flags      receive: the block's first token's flags seen
    end        receive half returned

Rows: ``bf16`` and ``logfmt`` combine the protocol's rows (random values);
``bf16_no_rows`` and ``logfmt_no_encode`` are breakdown_low_latency.py's
``comb_no_rows`` (flags without rows) and ``lf_no_encode`` (units dealt and
counted, nothing loaded, coded or stored): each send's protocol alone. Printed per row: each
point's time after the grid's first start (median over warps, and the last
warp), and each step's length per warp (median, max; from clock64).
Iterations take turns between rows; medians over iterations.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import cupyep  # noqa: E402
import kernel_variants  # noqa: E402  (benchmarks/, beside this file)
import breakdown_low_latency as breakdown  # noqa: E402
from cupyep.bench import add_protocol_args, low_latency_setup, random_bf16, teardown  # noqa: E402

POINTS = ["start", "prefix", "staged", "units", "counted", "sent", "flags", "end"]
_MAX_BLOCKS, _WARPS = 264, 16
_STAMP = (f"extern \"C\" {{ __device__ unsigned long long g_timeline[{_MAX_BLOCKS} * {_WARPS} * {len(POINTS)} * 2]; }}\n"
          "__device__ __forceinline__ void timeline_stamp(int i) {\n"
          "    if (threadIdx.x % 32 == 0 && blockIdx.x < " + str(_MAX_BLOCKS) + ") {\n"
          "        const int o = ((blockIdx.x * " + str(_WARPS) + " + threadIdx.x / 32) * "
          + str(len(POINTS)) + " + i) * 2;\n"
          "        g_timeline[o] = clock64();\n"
          "        g_timeline[o + 1] = global_timer_ns();\n"
          "    }\n"
          "}\n")
_CALL = "template <int kHidden, bool kLogFmt, typename IdxT>\nstruct CombineCall {"
_PHASES = ("    load_mask(mask, rank, num_ranks, s_mask);\n"
           "    if (phases & 1) call.send(s_mask);\n"
           "    if (phases & 2) call.receive(s_mask);\n")
_PREFIX = "            const int total = chunk.total;\n"
_STAGED = "            cp_async_commit();\n            while (u < total) {\n"
_COUNT = "            dealt = (dealt + total) % num_warps;\n        }\n        count_done(done, s_mask, lane);\n"
_FLAGS = "            if (t + gridDim.x >= num_tokens) ticket.take(blocks_done);\n"
EDITS = [
    (_CALL, _STAMP + _CALL),
    (_PHASES, "    timeline_stamp(0);\n" + _PHASES.replace("call.send(s_mask);\n", "call.send(s_mask);\n    timeline_stamp(5);\n")
     + "    timeline_stamp(7);\n"),
    (_PREFIX, _PREFIX + "            timeline_stamp(1);\n"),
    (_STAGED, _STAGED.replace("            while", "            timeline_stamp(2);\n            while")),
    (_COUNT, _COUNT.replace("        count_done", "        timeline_stamp(3);\n        count_done") +
     "        timeline_stamp(4);\n"),
    (_FLAGS, _FLAGS + "            timeline_stamp(6);\n"),
]
VARIANTS = {"timeline": EDITS, "timeline_no_encode": breakdown.VARIANTS["lf_no_encode"] + EDITS,
            "timeline_no_rows": breakdown.VARIANTS["comb_no_rows"] + EDITS}
ROWS = {"bf16": ("timeline", False), "bf16_no_rows": ("timeline_no_rows", False),
        "logfmt": ("timeline", True), "logfmt_no_encode": ("timeline_no_encode", True)}


def main():
    ap = argparse.ArgumentParser()
    add_protocol_args(ap, tokens=128, experts=288)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    args = ap.parse_args()

    from mpi4py import MPI
    import cupy
    from cupyep import jit
    with kernel_variants.on_disk(MPI.COMM_WORLD, "low_latency.cu", VARIANTS,
                                 rows=sorted({ROWS[r][0] for r in args.rows})) as paths:
        group = cupyep.Group()
        r = group.size
        buf, x, idx, w = low_latency_setup(group, args)
        y = random_bf16((args.experts // r, r * args.tokens, args.hidden))
        ll = buf._impl.ll
        n = _MAX_BLOCKS * _WARPS * len(POINTS) * 2

        arrays = {}

        def timeline(variant, logfmt):
            """The variant's g_timeline, flat (a view of the loaded module's global)."""
            key = (variant, logfmt)
            if key not in arrays:
                mods = [m for (spec, _), (_, m) in jit._loaded.items()
                        if spec.source == paths[variant] and spec.name == "cupyep::ll::combine"
                        and dict(spec.template_args)["kLogFmt"] == ("true" if logfmt else "false")]
                arrays[key] = cupy.ndarray((n,), np.uint64, memptr=mods[0].get_global("g_timeline"))
            return arrays[key]

        def once(row):
            """[blocks, warps, points, (clock, ns)] of one combine of the row."""
            variant, logfmt = ROWS[row]
            ll.source = paths[variant]
            h = buf.low_latency_dispatch(x, idx, args.tokens, args.experts, use_fp8=True).handle
            arr = timeline(variant, logfmt)
            arr.fill(0)
            buf.low_latency_combine(y, idx, w, h, use_logfmt=logfmt)
            cupy.cuda.Device().synchronize()
            return arr.get().reshape(_MAX_BLOCKS, _WARPS, len(POINTS), 2).astype(np.int64)

        for row in args.rows:
            variant, logfmt = ROWS[row]
            ll.source = paths[variant]
            for _ in range(args.warmup):
                buf.low_latency_combine(y, idx, w, buf.low_latency_dispatch(
                    x, idx, args.tokens, args.experts, use_fp8=True).handle, use_logfmt=logfmt)
        samples = {row: [] for row in args.rows}
        for i in range(args.iters):
            for row in (args.rows if i % 2 == 0 else args.rows[::-1]):
                samples[row].append(once(row))
        ll.source = "cupyep/low_latency.cu"
        if group.rank == 0:
            report(samples, args)
        teardown(buf, group)


def report(samples, args):
    print(f"\nlow-latency combine timeline, 1 launch (send + receive), {args.tokens} tokens x {args.hidden}, "
          f"top-{args.topk} of {args.experts}; us; medians over {args.iters} iterations")
    for row, runs in samples.items():
        present = [p for p in range(len(POINTS)) if (runs[0][:, :, p, 1] > 0).any()]
        at, steps, ghz = [], [], []
        for tl in runs:
            warps = tl[:, :, 0, 1] > 0  # warps that ran (stamped their start)
            ns = tl[..., 1][warps][:, present].astype(np.float64)  # [warps, present points]
            clk = tl[..., 0][warps][:, present].astype(np.float64)
            # A point some warps never reach (a block with no token has no flags to see): not a time.
            clk[ns == 0] = np.nan
            ns[ns == 0] = np.nan
            rel = ns - ns[:, 0].min()
            at.append([(np.nanmedian(rel[:, i]), np.nanmax(rel[:, i])) for i in range(len(present))])
            # the SM clock from the warps' own spans (ns and cycles, first point to last)
            span_ns, span_clk = ns[:, -1] - ns[:, 0], clk[:, -1] - clk[:, 0]
            ghz.append(np.median(span_clk[span_ns > 0] / span_ns[span_ns > 0]))
            d = np.diff(clk, axis=1) / ghz[-1] / 1e3
            steps.append([(np.nanmedian(d[:, i]), np.nanmax(d[:, i])) for i in range(len(present) - 1)])
        at, steps = np.median(np.array(at), axis=0), np.median(np.array(steps), axis=0)
        print(f"\n{row} (SM clock {np.median(ghz):.2f} GHz)")
        print(f"{'point':>9} | {'median':>7} | {'last':>7} || {'step':>18} | {'median':>7} | {'max':>7}")
        for i, p in enumerate(present):
            step = f"{POINTS[present[i - 1]]} -> {POINTS[p]}" if i else ""
            s = steps[i - 1] if i else ("", "")
            s = f"{s[0]:7.2f} | {s[1]:7.2f}" if i else f"{'':7} | {'':7}"
            print(f"{POINTS[p]:>9} | {at[i][0] / 1e3:7.2f} | {at[i][1] / 1e3:7.2f} || {step:>18} | {s}")


if __name__ == "__main__":
    main()
