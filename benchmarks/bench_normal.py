"""Normal dispatch/combine bandwidth, with the NCCL baseline and the NVLink ceiling.

    mpirun -n 4 python benchmarks/bench_normal.py [--sms 24] [--sweep 8 16 24 32 48]
    mpirun -n 4 python benchmarks/bench_normal.py --ranks-per-node 2   # inter-node path, 2 x 2

Protocol (docs/measuring.md): 4096 tokens per rank, hidden 7168, top-8 of 256 experts,
random routing. Bandwidth = bytes of the received rows counted as BF16 (times
(1 + 4/128) / 2 for FP8), self rows included, over the time of one call; CUDA
events; median of --iters calls after warm-up. With --ranks-per-node the
buffer runs the inter-node path and the headline row also reports its two
legs as DeepEP does: RDMA bytes = (token, node) pairs this rank sends (own
node included) times the BF16 row, NVL bytes = the received rows as above.
On one host the "RDMA" leg is NVSHMEM puts over NVLink.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import cupyep  # noqa: E402
from cupyep.formats import fp8  # noqa: E402
from cupyep.bench import add_protocol_args, experts_for_ranks, event_times, nccl_dispatch, queued_times, teardown  # noqa: E402
from cupyep.jit import KernelSpec, launch  # noqa: E402


def timed(fn, iters, warmup):
    """Median time (us) of one call between CUDA events, after warm-up."""
    for _ in range(warmup):
        fn()
    return event_times(fn, iters)


def nccl_baseline(group, x, topk_idx_host, num_experts, iters, warmup, per_expert=False):
    """(time per call, time queued, bytes received) of the NCCL dispatch baseline."""
    run, nbytes = nccl_dispatch(group, x, topk_idx_host, num_experts, per_expert)
    return timed(run, iters, warmup), queued_times(run, iters), nbytes


def peer_store_ceiling(buf, num_sms, iters, warmup):
    """GB/s out of this GPU storing into every peer at once with num_sms blocks."""
    import cupy
    impl = buf._impl
    r = impl.num_ranks
    if r == 1:
        return float("nan")
    nbytes = 64 << 20
    offset = cupyep.layouts.sizing.control_bytes(r)
    assert offset + r * nbytes <= impl.num_nvl_bytes
    src = cupy.ones(nbytes // 4, np.int32)
    spec = KernelSpec("cupyep/bench_kernels.cu", "cupyep::store_to_peers", (("kNumRanks", r),))
    grid = max(r - 1, num_sms // (r - 1) * (r - 1))

    def run():
        launch(spec, (grid,), (1024,), (impl.nvl.peers, np.int32(impl.rank), np.int64(offset), src,
                                       np.int64(nbytes // 16)))
    t = timed(run, iters, warmup)
    impl.rt.sync_barrier()
    return nbytes * (r - 1) / t / 1e3


def main():
    ap = argparse.ArgumentParser()
    add_protocol_args(ap, tokens=4096, experts=256)
    ap.add_argument("--sms", type=int, default=24)
    ap.add_argument("--sweep", type=int, nargs="*", default=[8, 16, 24, 32, 48])
    ap.add_argument("--kernels-sms", type=int, nargs="*", default=None,
                    help="SM counts timed kernels only (default: --sms)")
    ap.add_argument("--ceiling-blocks", type=int, nargs="*", default=None,
                    help="block counts of the peer-store ceiling (default: --sms and 132)")
    ap.add_argument("--chunk", type=int, default=None, help="Config.chunk_tokens (default: tuned)")
    ap.add_argument("--warps", type=int, default=None, help="Config.num_warps (default: tuned)")
    ap.add_argument("--combine-warps", type=int, default=None, help="Config.num_combine_warps (default: tuned)")
    ap.add_argument("--own-share", type=float, default=None,
                    help="Config.own_rows_receiver_share (default: by rank count)")
    ap.add_argument("--combine-senders", type=int, nargs="*", default=None,
                    help="Config.num_combine_senders; several: a kernels-only combine sweep of them "
                         "at each --kernels-sms (default: by rank count and SMs)")
    ap.add_argument("--combine-chunk", type=int, nargs="*", default=None,
                    help="Config.combine_chunk_rows; several: swept as --combine-senders")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-nccl", action="store_true")
    ap.add_argument("--ranks-per-node", type=int, default=None,
                    help="emulate nodes of this many ranks (inter-node path)")
    args = ap.parse_args()

    import cupy
    group = cupyep.Group(num_ranks_per_node=args.ranks_per_node)
    r = group.size
    args.experts = experts_for_ranks(args.experts, r)  # printed with the results
    nvl = max(cupyep.nvl_size_hint(args.hidden, args.tokens + 64, r, args.topk),
              cupyep.layouts.sizing.control_bytes(r) + r * (64 << 20))
    rdma = 0
    if group.num_nodes > 1:
        rdma = cupyep.rdma_size_hint(args.hidden, args.tokens + 64, r, group.num_ranks_per_node, args.topk)
    buf = cupyep.Buffer(group, num_nvl_bytes=nvl, num_rdma_bytes=rdma, backend="gpu")
    rng = np.random.default_rng(group.rank)
    x_np = rng.standard_normal((args.tokens, args.hidden)).astype(fp8.bfloat16)
    idx_np = np.argsort(rng.random((args.tokens, args.experts)), axis=1)[:, :args.topk].astype(np.int64)
    w_np = rng.random(idx_np.shape).astype(np.float32)
    x = cupy.asarray(x_np.view(np.uint16)).view(fp8.bfloat16)
    idx, w = cupy.asarray(idx_np), cupy.asarray(w_np)
    q_np, s_np = fp8.per_token_cast_to_fp8(x_np)
    xq = (cupy.asarray(q_np.view(np.uint8)), cupy.asarray(s_np))
    layout = buf.get_dispatch_layout(idx, args.experts)
    node_of = idx_np // (args.experts // group.num_nodes)
    rdma_bytes = sum(int((node_of == m).any(axis=1).sum()) for m in range(group.num_nodes)) * args.hidden * 2

    senders_swept = args.combine_senders or [None]
    chunks_swept = args.combine_chunk or [None]

    def config(sms, senders=senders_swept[0], chunk=chunks_swept[0]):
        base = cupyep.default_config(r, group.num_nodes)
        return cupyep.Config(num_sms=sms, num_warps=args.warps or base.num_warps,
                             chunk_tokens=args.chunk or base.chunk_tokens,
                             num_combine_warps=args.combine_warps or base.num_combine_warps,
                             own_rows_receiver_share=args.own_share,
                             # (the headline SM counts fall back to the default split)
                             num_combine_senders=senders if senders is None or senders < sms else None,
                             combine_chunk_rows=chunk or base.combine_chunk_rows)

    def measure(sms):
        cfg = config(sms)
        d = buf.dispatch(x, idx, w, layout=layout, config=cfg)
        n = d.recv_x.shape[0]
        bf16_bytes = n * args.hidden * 2
        t_bf16 = timed(lambda: buf.dispatch(x, idx, w, layout=layout, config=cfg), args.iters, args.warmup)
        t_fp8 = timed(lambda: buf.dispatch(xq, idx, w, layout=layout, config=cfg), args.iters, args.warmup)
        t_cached = timed(lambda: buf.dispatch(x, handle=d.handle), args.iters, args.warmup)
        y = d.recv_x
        t_comb = timed(lambda: buf.combine(y, d.handle, config=cfg), args.iters, args.warmup)
        return {"n": n, "bf16": (t_bf16, bf16_bytes / t_bf16 / 1e3),
                "fp8": (t_fp8, bf16_bytes * (1 + 4 / 128) / 2 / t_fp8 / 1e3),
                "combine": (t_comb, bf16_bytes / t_comb / 1e3),
                "cached": (t_cached, bf16_bytes / t_cached / 1e3)}

    def measure_kernels(sms):
        """The same calls queued behind a spin kernel: GPU time only, as a
        kernel profiler reports it (dispatch in worst-token mode, which has
        no host synchronisation)."""
        cfg = config(sms)
        d = buf.dispatch(x, idx, w, layout=layout, config=cfg)
        n = d.recv_x.shape[0]
        bf16_bytes = n * args.hidden * 2
        worst = args.tokens * r
        for _ in range(args.warmup):
            buf.dispatch(x, idx, w, layout=layout, config=cfg, num_worst_tokens=worst)
        cupy.cuda.Device().synchronize()
        group.barrier()
        out = {}
        for key, fn, nbytes in (
                ("bf16", lambda: buf.dispatch(x, idx, w, layout=layout, config=cfg, num_worst_tokens=worst),
                 bf16_bytes),
                ("fp8", lambda: buf.dispatch(xq, idx, w, layout=layout, config=cfg, num_worst_tokens=worst),
                 bf16_bytes * (1 + 4 / 128) / 2),
                ("combine", lambda: buf.combine(d.recv_x, d.handle, config=cfg), bf16_bytes),
                ("cached", lambda: buf.dispatch(x, handle=d.handle), bf16_bytes)):
            t = queued_times(fn, args.iters)
            out[key] = (t, nbytes / t / 1e3)
            cupy.cuda.Device().synchronize()
            group.barrier()
        return out

    def combine_sweep(sms):
        """{(senders, chunk rows): GB/s} of combine alone, kernels only."""
        d = buf.dispatch(x, idx, w, layout=layout, config=config(sms))
        nbytes = d.recv_x.shape[0] * args.hidden * 2
        out = {}
        for senders in senders_swept:
            if senders is not None and senders >= sms:
                continue  # no receivers left: not a split
            for chunk in chunks_swept:
                cfg = config(sms, senders, chunk)
                buf.combine(d.recv_x, d.handle, config=cfg)
                cupy.cuda.Device().synchronize()
                group.barrier()
                key = (cupyep.config.combine_senders(cfg, r), cfg.combine_chunk_rows)
                out[key] = nbytes / queued_times(lambda: buf.combine(d.recv_x, d.handle, config=cfg),
                                                 args.iters) / 1e3
                cupy.cuda.Device().synchronize()
                group.barrier()
        return out

    kernels_sms = sorted(set(args.kernels_sms or [args.sms]))
    kernels_only = {s: measure_kernels(s) for s in kernels_sms}
    swept = {}
    if len(senders_swept) > 1 or len(chunks_swept) > 1:
        swept = {s: combine_sweep(s) for s in kernels_sms}
    head = measure(args.sms)
    sweep = {s: measure(s) for s in args.sweep if s != args.sms}
    sweep[args.sms] = head
    ceiling_blocks = sorted(set(args.ceiling_blocks or [args.sms, 132]))
    ceilings = {s: peer_store_ceiling(buf, s, args.iters, args.warmup) for s in ceiling_blocks}
    nccl = None
    if not args.no_nccl:  # one row per (token, rank), then per (token, expert)
        nccl = []
        for per_expert in (False, True):
            t, tq, nbytes = nccl_baseline(group, x, idx_np, args.experts, args.iters, args.warmup, per_expert)
            nccl.append((t, nbytes / t / 1e3, tq, nbytes / tq / 1e3))

    rows = group.comm.gather((head, sweep, ceilings, nccl, kernels_only, rdma_bytes, swept), root=0)
    if group.rank == 0:
        from cupyep.comm.runtime import card_label
        if group.num_nodes > 1:
            print(f"\ninter-node path: {group.num_nodes} nodes x {group.num_ranks_per_node} ranks emulated on "
                  "one host (the inter-node leg is NVSHMEM puts over NVLink)")
        cfg = config(args.sms)
        own = cupyep.config.own_rows_receiver_share(cfg, r)
        print(f"\ncupyep normal kernels, {card_label(group)}, {args.tokens} tokens x {args.hidden}, "
              f"chunk_tokens={cfg.chunk_tokens}, warps {cfg.num_warps}/{cfg.num_combine_warps} (dispatch/combine), "
              f"own rows {own:.2f} by receivers, combine {cupyep.config.combine_senders(cfg, r)} sender "
              f"blocks, {cfg.combine_chunk_rows}-row items, "
              f"top-{args.topk} of {args.experts} experts (median of {args.iters}, rank 0 "
              f"received {head['n']} rows)")
        worst = lambda key, s: min(rw[1][s][key][1] for rw in rows)  # noqa: E731
        slowest_t = lambda key, s: max(rw[1][s][key][0] for rw in rows)  # noqa: E731
        print(f"{'SMs':>4} | {'FP8 dispatch':>22} | {'BF16 dispatch':>22} | {'BF16 combine':>22} | "
              f"{'BF16 cached dispatch':>22}   (slowest rank)")
        for s in sorted(sweep):
            cells = [f"{slowest_t(k, s):8.1f} us {worst(k, s):7.1f} GB/s" for k in ("fp8", "bf16", "combine", "cached")]
            print(f"{s:>4} | " + " | ".join(cells))
        for s in kernels_sms:
            cells = [f"{max(rw[4][s][k][0] for rw in rows):8.1f} us {min(rw[4][s][k][1] for rw in rows):7.1f} GB/s"
                     for k in ("fp8", "bf16", "combine", "cached")]
            print(f"{s:>4} | " + " | ".join(cells) + "   (kernels only: calls queued behind a spin kernel; "
                  "dispatch in worst-token mode)")
        if group.num_nodes > 1:
            # RDMA leg: the slowest rank's (token, node) bytes over its own time.
            legs = []
            for k, scale in (("fp8", (1 + 4 / 128) / 2), ("bf16", 1.0), ("combine", 1.0)):
                rdma_bw = min(rw[5] * scale / rw[4][args.sms][k][0] / 1e3 for rw in rows)
                legs.append(f"{k} RDMA {rdma_bw:.1f} GB/s, NVL {min(rw[4][args.sms][k][1] for rw in rows):.1f} GB/s")
            print(f"{args.sms:>4} | legs (kernels only): " + "; ".join(legs))
        for s in swept:
            cells = [f"{k[0]} + {s - k[0]} blocks, {k[1]}-row items: {min(rw[6][s][k] for rw in rows):.1f}"
                     for k in swept[s]]
            print(f"combine sweep, {s} SMs, kernels only, GB/s (senders + receivers): " + "; ".join(cells))
        for s in ceiling_blocks:
            print(f"peer-store ceiling, {s} blocks, every rank into all peers: "
                  f"{min(rw[2][s] for rw in rows):.1f} GB/s out per GPU")
        if nccl is not None:
            for i, rows_of in enumerate(("(token, rank)", "(token, expert), naive")):
                print(f"NCCL baseline (index_select + all_to_all_single, a row per {rows_of}; GB/s "
                      f"as above): {max(rw[3][i][0] for rw in rows):.1f} us, "
                      f"{min(rw[3][i][1] for rw in rows):.1f} GB/s; queued: "
                      f"{max(rw[3][i][2] for rw in rows):.1f} us, {min(rw[3][i][3] for rw in rows):.1f} GB/s")
    teardown(buf, group)


if __name__ == "__main__":
    main()
