"""An MoE layer's communication: route, dispatch, run experts, combine, check.

    mpiexec -n 4 python examples/moe_dispatch_combine.py [--backend auto|gpu|reference]

Each rank routes its tokens to the top-k of E experts, dispatches them, applies
its local experts (a per-expert linear map), combines the outputs back weighted
by the router, and checks the result against a single-process computation of
the same layer on all ranks' tokens.
"""
import argparse

import numpy as np

import cupyep
from cupyep.formats.fp8 import bfloat16


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts-per-rank", type=int, default=4)
    ap.add_argument("--topk", type=int, default=4)
    args = ap.parse_args()

    group = cupyep.Group()
    rank, size = group.rank, group.size
    num_experts = args.experts_per_rank * size
    rng = np.random.default_rng(1234 + rank)
    x = rng.standard_normal((args.tokens, args.hidden)).astype(bfloat16)
    logits = rng.standard_normal((args.tokens, num_experts)).astype(np.float32)
    topk_idx = np.argsort(-logits, axis=1)[:, :args.topk].astype(np.int64)
    topk_w = np.take_along_axis(logits, topk_idx, 1)
    topk_w = (np.exp(topk_w) / np.exp(topk_w).sum(1, keepdims=True)).astype(np.float32)
    # expert e multiplies by a fixed scalar: easy to recompute anywhere
    expert_gain = (np.arange(num_experts) % 5 + 1).astype(np.float32) / 4

    buf = cupyep.Buffer(group, num_nvl_bytes=cupyep.nvl_size_hint(args.hidden, args.tokens, size, args.topk),
                        backend=args.backend)
    xp = np
    if buf.backend == "gpu":
        import cupy as xp
    to_dev = (lambda a: xp.asarray(a.view(np.uint16)).view(bfloat16) if a.dtype == bfloat16
              else xp.asarray(a))

    layout = buf.get_dispatch_layout(to_dev(topk_idx), num_experts)
    d = buf.dispatch(to_dev(x), to_dev(topk_idx), to_dev(topk_w), layout=layout)
    # experts: y = sum over this rank's chosen experts of weight * gain * x
    local_gain = xp.asarray(expert_gain[rank * args.experts_per_rank:(rank + 1) * args.experts_per_rank])
    ids, w = d.recv_topk_idx, d.recv_topk_weights
    scale = xp.where(ids >= 0, w * local_gain[xp.maximum(ids, 0)], 0).sum(axis=1)
    y = (d.recv_x.astype(xp.float32) * scale[:, None]).astype(bfloat16)
    out = buf.combine(y, d.handle).combined_x
    out = out.get() if hasattr(out, "get") else out

    want_scale = (topk_w * expert_gain[topk_idx]).sum(1)
    want = x.astype(np.float32) * want_scale[:, None]
    err = np.abs(out.astype(np.float32) - want).max() / np.abs(want).max()
    ok = group.agree(err < 2e-2)
    errors = group.comm.gather(float(err), root=0)  # printed by rank 0: lines from ranks would interleave
    if rank == 0:
        print(f"cupyep {buf.backend} backend, {size} ranks, {args.tokens} tokens x {args.hidden}, "
              f"top-{args.topk} of {num_experts} experts")
        print(f"received {d.handle.num_recv_tokens} rows on rank 0; "
              f"tokens per local expert {d.num_recv_tokens_per_expert}")
        for r, e in enumerate(errors):
            print(f"rank {r}: max relative error vs single-process layer {e:.2e}")
        print("OK" if ok else "MISMATCH")
    buf.destroy()
    group.destroy()
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
