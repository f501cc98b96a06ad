"""A torch MoE layer over cupyep, forward and backward, against one process.

    mpiexec -n 4 python examples/torch_moe_layer.py [--backend auto|gpu|reference]

requires: torch

Each rank holds T tokens and E / R experts (a linear map each). The layer
routes with a gate, dispatches tokens to the experts' ranks, applies the
experts and the router weights there, and combines. Dispatch and combine are
torch.autograd Functions: the gradient of a dispatch is a combine of the
gradients (and of the weights' gradients), the gradient of a combine is a
cached dispatch. Every rank then checks its output, its tokens' gradient and
its experts' weight gradients against the same layer computed in a single
process from every rank's tokens.
"""
import argparse


import cupyep

try:
    import torch
except ImportError:  # pragma: no cover - the script needs torch
    raise SystemExit("this example needs torch")


class Dispatch(torch.autograd.Function):
    """(x [T, H] bf16, weights [T, K] fp32) -> rows, weights and local expert ids
    on the experts' ranks, and the handle (not differentiable)."""

    @staticmethod
    def forward(ctx, x, topk_weights, topk_idx, buf, num_experts):
        d = buf.dispatch(x, topk_idx, topk_weights, num_experts=num_experts)
        ctx.buf, ctx.handle = buf, d.handle
        ctx.mark_non_differentiable(d.recv_topk_idx)
        return d.recv_x, d.recv_topk_weights, d.recv_topk_idx, d.handle

    @staticmethod
    def backward(ctx, grad_x, grad_w, *_):
        c = ctx.buf.combine(grad_x.contiguous(), ctx.handle, grad_w.contiguous())
        return c.combined_x, c.combined_topk_weights, None, None, None


class Combine(torch.autograd.Function):
    """Rows [N, H] bf16 on the experts' ranks -> sums [T, H] on the tokens' ranks."""

    @staticmethod
    def forward(ctx, y, handle, buf):
        ctx.buf, ctx.handle = buf, handle
        return buf.combine(y, handle).combined_x

    @staticmethod
    def backward(ctx, grad_out):
        return ctx.buf.dispatch(grad_out.contiguous(), handle=ctx.handle).recv_x, None, None


def local_experts(recv_x, recv_w, recv_idx, weights):
    """Sum over this rank's experts chosen by each row of weight * (row @ W_e), bf16 out."""
    xf = recv_x.float()
    out = torch.zeros_like(xf)
    for e in range(weights.shape[0]):
        gate = torch.where(recv_idx == e, recv_w, torch.zeros_like(recv_w)).sum(1, keepdim=True)
        out = out + gate * (xf @ weights[e])
    return out.to(torch.bfloat16)


def reference_layer(x, gate_w, all_weights, k):
    """The same layer in one process: x [T, H] bf16 of every rank, concatenated."""
    logits = x.float() @ gate_w
    vals, idx = logits.topk(k, dim=1)
    w = torch.softmax(vals, dim=1)
    out = torch.zeros(x.shape, dtype=torch.float32)
    xf = x.float()
    for e in range(all_weights.shape[0]):
        gate = torch.where(idx == e, w, torch.zeros_like(w)).sum(1, keepdim=True)
        out = out + gate * (xf @ all_weights[e])
    return out.to(torch.bfloat16)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--experts-per-rank", type=int, default=2)
    ap.add_argument("--topk", type=int, default=2)
    args = ap.parse_args()

    group = cupyep.Group()
    rank, size = group.rank, group.size
    t, h, k = args.tokens, args.hidden, args.topk
    num_experts = args.experts_per_rank * size
    buf = cupyep.Buffer(group, num_nvl_bytes=cupyep.nvl_size_hint(h, t, size, k), backend=args.backend)
    dev = torch.device("cuda", torch.cuda.current_device()) if buf.backend == "gpu" else torch.device("cpu")

    shared = torch.Generator().manual_seed(5)  # gate and experts identical on every rank
    gate_w = torch.randn(h, num_experts, generator=shared) / h ** 0.5
    all_weights = torch.randn(num_experts, h, h, generator=shared) / h ** 0.5
    xs = [torch.randn(t, h, generator=torch.Generator().manual_seed(100 + r)).to(torch.bfloat16)
          for r in range(size)]
    grad_outs = [torch.randn(t, h, generator=torch.Generator().manual_seed(200 + r)).to(torch.bfloat16)
                 for r in range(size)]
    lo = rank * args.experts_per_rank

    # ---- the distributed layer on this rank -------------------------------- #
    x = xs[rank].clone().to(dev).requires_grad_(True)
    my_weights = all_weights[lo:lo + args.experts_per_rank].clone().to(dev).requires_grad_(True)
    logits = x.float() @ gate_w.to(dev)
    vals, topk_idx = logits.topk(k, dim=1)
    topk_w = torch.softmax(vals, dim=1)
    recv_x, recv_w, recv_idx, handle = Dispatch.apply(x, topk_w, topk_idx, buf, num_experts)
    y = local_experts(recv_x, recv_w, recv_idx, my_weights)
    out = Combine.apply(y, handle, buf)
    out.backward(grad_outs[rank].to(dev))

    # ---- one process, every rank's tokens ----------------------------------- #
    x_all = torch.cat(xs).requires_grad_(True)
    weights_ref = all_weights.clone().requires_grad_(True)
    out_ref = reference_layer(x_all, gate_w, weights_ref, k)
    out_ref.backward(torch.cat(grad_outs))

    def rel(a, b):
        a, b = a.detach().float().cpu(), b.detach().float().cpu()
        return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))

    rows = slice(rank * t, (rank + 1) * t)
    errs = {"output": rel(out, out_ref[rows]), "grad x": rel(x.grad, x_all.grad[rows]),
            "grad experts": rel(my_weights.grad, weights_ref.grad[lo:lo + args.experts_per_rank])}
    ok = group.agree(max(errs.values()) < 3e-2)
    worst = group.comm.allreduce(max(errs.values()), op=_max_op())
    if rank == 0:
        print(f"torch MoE layer on {size} ranks ({buf.backend} backend): {t} tokens x {h}, top-{k} of "
              f"{num_experts} experts; output, input gradient and expert-weight gradients vs one "
              f"process: worst relative error {worst:.2e} -> {'OK' if ok else 'MISMATCH'}")
    buf.destroy()
    group.destroy()
    raise SystemExit(0 if ok else 1)


def _max_op():
    from mpi4py import MPI
    return MPI.MAX


if __name__ == "__main__":
    main()
