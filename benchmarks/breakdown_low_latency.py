"""Where the time of low-latency dispatch and combine goes: kernel variants
that leave one stage out, timed against the full kernels in one run.

    mpirun -n 2 python benchmarks/breakdown_low_latency.py [--base DIR] [--rows full base ...]
        [--transport auto] [--logfmt] [--random]

Each variant is low_latency.cu with its headers inlined (from this checkout,
or from DIR, e.g. an older checkout's raw_kernels/cupyep, as the "base" row)
and one stage removed by a text edit; its results are wrong by construction,
only its time matters. Rows:

    full           the kernels as they are
    base           the kernels of --base (if given)
    empty          both kernels launch and return (the launch floor)
    no_payload     dispatch messages carry their header only (no row bytes)
    no_recv_rows   dispatch receivers wait and lay out, but copy no rows
    comb_no_rows   combine senders set their flags without the rows
    comb_no_sum    combine receivers wait for their tokens' flags, sum nothing
    lf_no_encode   (--logfmt) LogFMT combine senders write nothing, encode nothing
    lf_no_coding   (--logfmt) every value takes code 1: no per-value log2
    lf_no_stores   (--logfmt) encoded rows are not stored
    lf_no_loads    (--logfmt) rows are not loaded: each round encodes what its
                   shared memory holds
    lf_no_decode   (--logfmt) receivers load the encoded rows but decode nothing
    lf_no_count    (--logfmt) units are not counted: each warp sets its pairs'
                   flags once its own units are sent (early, so the receive
                   half's figure means nothing)
    lf_count_each  (--logfmt) a warp counts each unit once it is sent, not four
                   at a time: pairs' flags set earlier, for more adds
    lf_no_lg2      (--logfmt) the encode without its per-value MUFU log2 (the
                   magnitude itself stands in for it): what the log2s cost
    lf_no_ex2      (--logfmt) the decode without its per-value MUFU exp2 (the
                   exponent itself stands in for the value): what the exp2s cost
    no_count_wait  dispatch flags are set without waiting for the messages
                   and counts (last: it leaves counters off by the late adds,
                   so rows after it are timed on wrong data)

Times: dispatch and combine (one launch each), and the send and receive
halves of hook mode, queued behind a spin kernel (GPU time only), slowest
rank; the rows take --rounds turns of --iters / --rounds iterations each, in an
order reversed every other turn, and a row's figure is the median of its turns'
medians. Protocol of bench_low_latency.py.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import cupyep  # noqa: E402
from cupyep.formats import fp8  # noqa: E402
import kernel_variants  # noqa: E402  (benchmarks/, beside this file)
from cupyep.bench import add_protocol_args, low_latency_setup, queued_step_times, random_bf16, teardown  # noqa: E402

_PAYLOAD = ("                    st_na(reinterpret_cast<int4*>(payload) + u, out[j]);\n"
            "                    if (kFp8 && u % 8 == 0) reinterpret_cast<float*>(payload + kHidden)[u / 8] = scale[j];\n")
_RECV_ROWS = "for (int first = 0; first < kRowInt4; first += kBatch * kWarpSize) {"
_COUNT_WAIT = "[&](int n) { return n >= expected; }"
_COMB_SEND_ROW = "warp_copy_batch<kCopyBatch, true, true>(reinterpret_cast<int4*>(to), src, 0, words, lane);"
_COMB_SUM = "for (int c = threadIdx.x; c < kUnits && !kLogFmt; c += blockDim.x) {"
_PHASES = ["    if (phases & 1) call.send(raw, s_mask, s_entries);",
           "    if (phases & 2) call.receive(s_mask, s_entries);",
           "    if (phases & 1) call.send(s_mask);",
           "    if (phases & 2) call.receive(s_mask);"]
# LogFMT combine (with --logfmt): encode, its per-value coding, its stores, decode.
_LF_ROUNDS = "return min(kWarpSize, kHidden / 64 - r * kWarpSize);"
_LF_CODE = "const float q = __saturatef(fmaf(log2_approx(fabsf(x)), q_per_log, q0));"
_LF_LOAD = "if (i < words) cp_async_16(slots + 8 * g + (p ^ (g % 8)), src + i);"
_LF_STORE = "for (int i = lane; i < groups * kLogFmtGroupBytes / 16; i += kWarpSize) st_na(out + i, staged[i]);"
# the decode's first line; the variant returns before it, every loaded word used once
_LF_DECODE = "    const unsigned long long lo = in.lo.x | static_cast<unsigned long long>(in.lo.y) << 32;\n"
_LF_NO_DECODE = ("    for (int j = 0; j < 8; ++j) acc[j] = fmaf(w, in.head.x + __uint_as_float(in.lo.x ^ in.lo.y ^ in.hi), "
                 "acc[j]);\n    return;\n" + _LF_DECODE)
_LF_COUNT = "if (atom_add_acq_rel_gpu(pair_done + p, 1) == units - 1) {"
_LF_PENDING = "static constexpr int kMax = 4;"
_LF_EX2 = "const float v = exp2_approx(fmaf(__uint_as_float(f), scale, base));"
VARIANTS = {
    "empty": [(p, p.replace("phases & 1", "phases & 0").replace("phases & 2", "phases & 0")) for p in _PHASES],
    "no_payload": [(_PAYLOAD, "                    (void)payload;\n")],
    "no_recv_rows": [(_RECV_ROWS, _RECV_ROWS.replace("first < kRowInt4", "first < 0"))],
    "comb_no_rows": [(_COMB_SEND_ROW, ";")],
    "comb_no_sum": [(_COMB_SUM, _COMB_SUM.replace("c < kUnits", "c < 0"))],
    "no_count_wait": [(_COUNT_WAIT, "[](int) { return true; }")],
    "lf_no_encode": [(_LF_ROUNDS, "return 0 * r;")],
    "lf_no_coding": [(_LF_CODE, "const float q = 1.f / (kLogFmtSteps + 1.f);")],
    "lf_no_stores": [(_LF_STORE, ";")],
    "lf_no_loads": [(_LF_LOAD, _LF_LOAD.replace("i < words", "i < 0 * words"))],
    "lf_no_decode": [(_LF_DECODE, _LF_NO_DECODE)],
    "lf_no_count": [(_LF_COUNT, "if (units > 0) {")],
    "lf_count_each": [(_LF_PENDING, _LF_PENDING.replace("kMax = 4", "kMax = 1"))],
    "lf_no_lg2": [(_LF_CODE, _LF_CODE.replace("log2_approx(fabsf(x))", "fabsf(x)"))],
    "lf_no_ex2": [(_LF_EX2, _LF_EX2.replace("exp2_approx(", "("))],
}


def variant_sources(base_dir=None):
    """{row: source text} of every variant (see kernel_variants.py)."""
    return kernel_variants.variant_sources("low_latency.cu", VARIANTS, base_dir)


def main():
    ap = argparse.ArgumentParser()
    add_protocol_args(ap, tokens=128, experts=288)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=4, help="turns each row takes (its iterations split)")
    ap.add_argument("--transport", default="auto", choices=["auto", "nvshmem"])
    ap.add_argument("--logfmt", action="store_true", help="combine with use_logfmt=True")
    ap.add_argument("--random", action="store_true", help="random expert outputs (default: all ones)")
    kernel_variants.add_args(ap)
    args = ap.parse_args()

    from mpi4py import MPI
    import cupy
    with kernel_variants.on_disk(MPI.COMM_WORLD, "low_latency.cu", VARIANTS, args.base, args.rows) as paths:
        group = cupyep.Group()
        r = group.size
        buf, x, idx, w = low_latency_setup(group, args)
        buf.set_low_latency_transport(args.transport)
        shape = (args.experts // r, r * args.tokens, args.hidden)
        y = random_bf16(shape) if args.random else cupy.ones(shape, fp8.bfloat16)
        m, e = args.tokens, args.experts
        dispatch = lambda **kw: buf.low_latency_dispatch(x, idx, m, e, use_fp8=True, **kw)  # noqa: E731
        combine = lambda h, **kw: buf.low_latency_combine(y, idx, w, h, use_logfmt=args.logfmt, **kw)  # noqa: E731
        state = {}

        def d_step(**kw):
            state["d"] = dispatch(**kw)

        def c_step(**kw):
            state["c"] = combine(state["d"].handle, **kw)

        steps = [d_step, c_step, lambda: d_step(return_recv_hook=True), lambda: state["d"].hook(),
                 lambda: c_step(return_recv_hook=True), lambda: state["c"].hook()]
        ll = buf._impl.ll

        def warm(row):  # compiles, then warms up
            ll.source = paths[row]
            for _ in range(args.warmup):
                combine(dispatch().handle)

        def measure(row, iters):
            ll.source = paths[row]
            combine(dispatch().handle)
            cupy.cuda.Device().synchronize()
            group.barrier()
            times = queued_step_times(steps, iters)
            cupy.cuda.Device().synchronize()
            group.barrier()
            return np.max(group.comm.allgather(times), axis=0)  # slowest rank, per column

        # The rows take turns, a share of the iterations each, in an order
        # reversed every other turn: measured one after another, the row that
        # came first read ~0.5 us apart from the same kernels in a later row on
        # a half kernel (send faster, receive slower). no_count_wait leaves the
        # counters wrong for whatever runs after it: last, alone.
        rows = [row for row in paths if row != "no_count_wait"]
        for row in rows:
            warm(row)
        samples = {row: [] for row in paths}
        for r in range(args.rounds):
            for row in (rows if r % 2 == 0 else rows[::-1]):
                samples[row].append(measure(row, max(1, args.iters // args.rounds)))
        if "no_count_wait" in paths:
            warm("no_count_wait")
            samples["no_count_wait"].append(measure("no_count_wait", args.iters))
        results = {row: np.median(samples[row], axis=0) for row in paths}
        ll.source = "cupyep/low_latency.cu"
        if group.rank == 0:
            from cupyep.comm.runtime import card_label
            print(f"\nlow-latency breakdown, {card_label(group)}, {args.transport}, "
                  f"{'LogFMT' if args.logfmt else 'BF16'} combine of {'random' if args.random else 'all-ones'} rows, "
                  f"{args.tokens} tokens x "
                  f"{args.hidden}, top-{args.topk} of {args.experts}, FP8 dispatch; us, slowest rank, "
                  f"median of {args.rounds} rounds' medians of {args.iters // args.rounds}")
            heads = ["dispatch", "combine", "d send", "d recv", "c send", "c recv"]
            print(f"{'variant':>14} | " + " | ".join(f"{h:>8}" for h in heads))
            for row in paths:
                print(f"{row:>14} | " + " | ".join(f"{v:8.1f}" for v in results[row]))
        teardown(buf, group)


if __name__ == "__main__":
    main()
