"""Decode steps from torch: tensors in, tensors out, eager and in torch.cuda.graph.

    mpiexec -n 4 python examples/torch_decode.py [--backend auto|gpu|reference]

requires: torch

Each step routes T tokens to the top-k of E experts with a low-latency BF16
dispatch, runs every local expert in torch (a per-expert scale), and combines.
Calls run on torch's current stream. On the GPU the step is then captured by
``torch.cuda.graph`` and replayed with new tokens copied into the captured
tensors. Every step is checked against the same layer computed in one process
from every rank's inputs; the ranks agree on the verdict.
"""
import argparse

import torch
from mpi4py import MPI

import cupyep

T, M, H, K = 24, 32, 512, 4


def expert_scale(experts):
    return (experts % 5 + 1).to(torch.float32) * 0.5


def expected(x, idx, w, num_experts):
    """sum over k of w * bf16(x * scale(expert)), fp32, as combine sums."""
    acc = torch.zeros(x.shape, dtype=torch.float32)
    for k in range(idx.shape[1]):
        valid = idx[:, k] >= 0
        y = (x.float() * expert_scale(idx[:, k].clamp(min=0))[:, None]).to(torch.bfloat16).float()
        acc += torch.where(valid, w[:, k], 0.0)[:, None] * y
    return acc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args()
    group = cupyep.Group()
    r, rank = group.size, group.rank
    num_experts = 4 * r
    buf = cupyep.Buffer(group, num_rdma_bytes=cupyep.low_latency_size_hint(M, H, r, num_experts),
                        low_latency_mode=True, backend=args.backend)
    dev = torch.device("cpu")
    if buf.backend == "gpu":
        torch.cuda.set_device(buf.device_id)
        dev = torch.device("cuda", buf.device_id)
    local = num_experts // r
    scales = expert_scale(torch.arange(rank * local, (rank + 1) * local)).to(dev)
    gen = torch.Generator().manual_seed(1234 + rank)
    x = torch.empty(T, H, dtype=torch.bfloat16, device=dev)
    idx = torch.empty(T, K, dtype=torch.int64, device=dev)
    w = torch.empty(T, K, dtype=torch.float32, device=dev)

    def new_inputs():
        xs = torch.randn(T, H, generator=gen).to(torch.bfloat16)
        ids = torch.stack([torch.randperm(num_experts, generator=gen)[:K] for _ in range(T)])
        ws = torch.rand(T, K, generator=gen)
        x.copy_(xs)
        idx.copy_(ids)
        w.copy_(ws)
        return xs, ids, ws

    def step():
        d = buf.low_latency_dispatch(x, idx, M, num_experts, use_fp8=False)
        y = (d.recv_x.float() * scales[:, None, None]).to(torch.bfloat16)  # the experts
        return buf.low_latency_combine(y, idx, w, d.handle).combined_x

    def check(out, inputs, what):
        want = expected(*inputs, num_experts)
        err = (out.float().cpu() - want).abs().max().item()
        # bf16 output: one rounding of the fp32 sum (half an ulp, 2^-8 relative) at most
        ok = bool(torch.isfinite(out).all()) and err <= 2.0 ** -8 * want.abs().max().item() + 1e-6
        worst = group.comm.allreduce(err, op=MPI.MAX)
        if not group.comm.allreduce(ok, op=MPI.LAND):
            raise SystemExit(f"rank {rank}: {what} wrong (max error {err:.3g})")
        return worst

    worst = 0.0
    for i in range(3):
        inputs = new_inputs()
        worst = max(worst, check(step(), inputs, f"eager step {i}"))
    replays = 0
    if buf.backend == "gpu":
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step()  # warm up on the capturing stream
        s.synchronize()
        group.barrier()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=s):
            out = step()
        for i in range(5):
            inputs = new_inputs()
            graph.replay()
            torch.cuda.synchronize()
            worst = max(worst, check(out, inputs, f"graph replay {i}"))
            replays += 1
    if rank == 0:
        print(f"torch decode, {r} rank(s), {buf.backend} backend: 3 eager steps and {replays} graph replays "
              f"match the single-process layer (max |error| {worst:.3g}): OK")
    buf.destroy()
    group.destroy()


if __name__ == "__main__":
    main()
