"""Where the time of intranode dispatch and combine goes: kernel variants that
leave one stage out, timed against the full kernel in one run.

    mpirun -n 4 python benchmarks/breakdown_normal.py [--base DIR] [--sms 24] [--chunk 1]
        [--own-share 0..1] [--rows full base ...]

Each variant is intranode.cu with its headers inlined (from this checkout, or
from DIR, e.g. an older checkout's raw_kernels/cupyep, as the "base" row) and
one stage removed by a text edit; the results of a variant are wrong by
construction, only its time matters. Rows:

    full            the kernels as they are
    base            the kernels of --base (if given)
    recv_no_rows    dispatch receivers copy metadata, not the peers' rows
    send_no_rows    dispatch senders store metadata and progress, not rows
    own_no_rows     dispatch copies no rows a rank sends itself (whichever
                    side copies them, Config.own_rows_receiver_share)
    no_rows         all three (synchronisation and metadata only)
    recv_wait_only  dispatch receivers only wait for the progress counters
    comb_recv_wait  combine receivers wait for every row, sum nothing
    comb_send_no_rows  combine senders flag their work items without the rows

Times: cached dispatch (barrier + dispatch kernel, BF16 and FP8) and combine
(one kernel, its barrier inside), queued behind a spin kernel (GPU time only),
median of --iters, slowest rank. Protocol of bench_normal.py.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import cupyep  # noqa: E402
from cupyep.formats import fp8  # noqa: E402
import kernel_variants  # noqa: E402  (benchmarks/, beside this file)
from cupyep.bench import add_protocol_args, experts_for_ranks, queued_times, random_inputs, teardown  # noqa: E402

# (old, new) text edits of the inlined source; each `old` must occur once.
_SEND_ROW = ("warp_copy_nc<kHiddenInt4>(at<int4>(base, lay.rows + row * kRowBytes),\n"
             "                                              x + (long long)t * kHiddenInt4, lane);")
_OWN_ROW = "warp_copy_nc<kHiddenInt4>(recv_x + out * kHiddenInt4, x + (long long)t * kHiddenInt4, lane);"
_RECV_ROW = ("warp_copy_coherent<kHiddenInt4>(recv_x + out * kHiddenInt4,\n"
             "                                            at<int4>(local, lay.rows + row * kRowBytes), lane);")
_RECV_OUT = "            const long long out = first + n;\n"
_COMB_SUM = "            warp_sum_rows<kHiddenInt4, kNumRanks>(out + row_off, rows,"
_COMB_SEND_ROW = ("warp_copy_nc<kHiddenInt4>(at<int4>(base, lay.rows + (slot0 + n) * kRowBytes),\n"
                  "                                      x + (long long)(first + n) * kHiddenInt4, lane);")
VARIANTS = {
    "recv_no_rows": [(_RECV_ROW, ";")],
    "send_no_rows": [(_SEND_ROW, ";")],
    "own_no_rows": [(_OWN_ROW, ";")],
    "no_rows": [(_RECV_ROW, ";"), (_SEND_ROW, ";"), (_OWN_ROW, ";")],
    "recv_wait_only": [(_RECV_OUT, "            continue;\n" + _RECV_OUT)],
    "comb_recv_wait": [(_COMB_SUM, "            if (false) warp_sum_rows<kHiddenInt4, kNumRanks>(out + row_off, rows,")],
    "comb_send_no_rows": [(_COMB_SEND_ROW, ";")],
}


def variant_sources(base_dir=None):
    """{row: source text} of every variant (see kernel_variants.py)."""
    return kernel_variants.variant_sources("intranode.cu", VARIANTS, base_dir)


def main():
    ap = argparse.ArgumentParser()
    add_protocol_args(ap, tokens=4096, experts=256)
    ap.add_argument("--sms", type=int, default=24)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--chunk", type=int, default=None, help="Config.chunk_tokens (default: tuned)")
    ap.add_argument("--own-share", type=float, default=None,
                    help="Config.own_rows_receiver_share (default: by rank count)")
    ap.add_argument("--combine-senders", type=int, default=None,
                    help="Config.num_combine_senders (default: by rank count and SMs)")
    ap.add_argument("--combine-chunk", type=int, default=None, help="Config.combine_chunk_rows")
    kernel_variants.add_args(ap)
    args = ap.parse_args()

    from mpi4py import MPI
    import cupy
    with kernel_variants.on_disk(MPI.COMM_WORLD, "intranode.cu", VARIANTS, args.base, args.rows) as names:
        group = cupyep.Group()
        r = group.size
        args.experts = experts_for_ranks(args.experts, r)  # printed with the results
        nvl = cupyep.nvl_size_hint(args.hidden, args.tokens + 64, r, args.topk)
        buf = cupyep.Buffer(group, num_nvl_bytes=nvl, backend="gpu")
        rng = np.random.default_rng(group.rank + 100)
        x, idx, w, x_np, _ = random_inputs(rng, args.tokens, args.hidden, args.experts, args.topk)
        q_np, s_np = fp8.per_token_cast_to_fp8(x_np)
        xq = (cupy.asarray(q_np.view(np.uint8)), cupy.asarray(s_np))
        base_cfg = cupyep.default_config(r)
        cfg = cupyep.Config(num_sms=args.sms, num_warps=base_cfg.num_warps,
                            chunk_tokens=args.chunk or base_cfg.chunk_tokens,
                            num_combine_warps=base_cfg.num_combine_warps,
                            own_rows_receiver_share=args.own_share,
                            num_combine_senders=args.combine_senders,
                            combine_chunk_rows=args.combine_chunk or base_cfg.combine_chunk_rows)
        impl = buf._impl
        results = {}
        for row, source in names.items():
            impl.intranode_source = source.split("/", 1)[1]
            # A handle per row: its launch plans keep the kernels they were made with.
            d = buf.dispatch(x, idx, w, num_experts=args.experts, config=cfg)
            n = int(d.recv_x.shape[0])
            nbytes = n * args.hidden * 2
            steps = {"bf16": lambda: buf.dispatch(x, handle=d.handle, config=cfg),
                     "fp8": lambda: buf.dispatch(xq, handle=d.handle, config=cfg),
                     "combine": lambda: buf.combine(d.recv_x, d.handle, config=cfg)}
            for key, step in steps.items():
                step()  # compile, warm up
                cupy.cuda.Device().synchronize()
                group.barrier()
                t = queued_times(step, args.iters)
                cupy.cuda.Device().synchronize()
                group.barrier()
                results[(row, key)] = group.comm.allreduce(t, op=MPI.MAX)
        impl.intranode_source = "intranode.cu"
        if group.rank == 0:
            from cupyep.comm.runtime import card_label
            own = cupyep.config.own_rows_receiver_share(cfg, r)
            print(f"\nbreakdown, {card_label(group)}, {args.sms} SMs, chunk_tokens={cfg.chunk_tokens}, own rows {own:.2f} by receivers, "
                  f"combine senders {cupyep.config.combine_senders(cfg, r)}, chunk rows {cfg.combine_chunk_rows}, "
                  f"{args.tokens} tokens x {args.hidden}, "
                  f"top-{args.topk} of {args.experts}, rank 0 received {n} rows; us (GB/s as bench_normal), "
                  "slowest rank, kernels only")
            print(f"{'variant':>18} | {'BF16 cached':>20} | {'FP8 cached':>20} | {'combine':>20}")
            scale = {"bf16": 1.0, "fp8": (1 + 4 / 128) / 2, "combine": 1.0}
            for row in names:
                cells = [f"{results[(row, k)]:8.1f} us {nbytes * scale[k] / results[(row, k)] / 1e3:6.1f}"
                         for k in ("bf16", "fp8", "combine")]
                print(f"{row:>18} | " + " | ".join(cells))
        teardown(buf, group)


if __name__ == "__main__":
    main()
