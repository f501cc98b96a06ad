"""A decode loop: low-latency dispatch with a receive hook, experts, combine.

    mpiexec -n 4 python examples/low_latency_decode.py [--backend auto|gpu|reference]

Every step each rank routes M new tokens to the top-k of E experts, launches the
send half of an FP8 dispatch, does other work while the tokens travel, calls the
hook to receive, runs its local experts (dequantise, a per-expert matrix) into
the buffer that combine sends from, and combines. Each step is checked against a
single-process computation of the same layer. On the GPU the last steps replay
one CUDA graph of dispatch, experts and combine with new inputs.
"""
import argparse
import functools

import numpy as np

import cupyep
from cupyep.formats import fp8

E4M3_TO_F32 = np.arange(256, dtype=np.uint8).view(fp8.float8_e4m3).astype(np.float32)


def to_bf16(xp, f32):
    """fp32 -> bf16 with round-to-nearest-even, by integer arithmetic (NumPy or CuPy)."""
    u = f32.view(xp.uint32)
    u = u + xp.uint32(0x7FFF) + ((u >> 16) & xp.uint32(1))
    return (u >> 16).astype(xp.uint16).view(fp8.bfloat16)


def bf16_to_f32(xp, b):
    return (b.view(xp.uint16).astype(xp.uint32) << 16).view(xp.float32)


def experts_forward(xp, lut, weights, recv_x, recv_scales, out):
    """out[l] = bf16(dequant(recv_x[l]) @ weights[l]) for every local expert l.

    lut [256] fp32 value of each e4m3 byte; recv_x [L, R*M, H] e4m3 bytes;
    recv_scales [L, R*M, H/128] fp32; rows past an expert's count hold garbage
    and come out as garbage, never read back.
    """
    if xp is np:
        x = lut[recv_x.view(np.uint8)] * np.repeat(recv_scales, 128, axis=2)
        out[...] = to_bf16(np, np.matmul(x, weights))
        return
    # CuPy cannot record cuBLAS calls in a CUDA graph, so a plain kernel
    # stands in for the matrix product (torch's graphs can capture cuBLAS).
    num_local, rows, h = recv_x.shape
    acc = xp.empty((num_local, rows, h), xp.float32)
    n = acc.size
    _experts_kernel(xp)(((n + 255) // 256,), (256,),
                        (xp.ascontiguousarray(recv_x), xp.ascontiguousarray(recv_scales), lut,
                         xp.ascontiguousarray(weights), acc, np.int32(rows), np.int32(h), np.int64(n)))
    out[...] = to_bf16(xp, acc)


_EXPERTS_SRC = r"""
extern "C" __global__ void experts(const unsigned char* q, const float* scales, const float* lut,
                                   const float* w, float* out, int rows, int h, long long n) {
    // one thread per (expert l, row r, column o): out = sum_i dequant(q[l, r, i]) * w[l, i, o]
    long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (t >= n) return;
    const int o = t % h;
    const long long lr = t / h;
    const long long l = lr / rows;
    const unsigned char* qr = q + lr * h;
    const float* sr = scales + lr * (h / 128);
    const float* wl = w + l * h * h + o;
    float acc = 0.f;
    for (int i = 0; i < h; ++i) acc += lut[qr[i]] * sr[i / 128] * wl[(long long)i * h];
    out[t] = acc;
}
"""


@functools.lru_cache(maxsize=None)
def _experts_kernel(xp):
    return xp.RawKernel(_EXPERTS_SRC, "experts")


def expected(x, topk_idx, topk_w, all_weights):
    """Single-process layer for this rank's tokens: sum_k w * bf16(expert(fp8(x)))."""
    q, s = fp8.per_token_cast_to_fp8(x)
    xq = fp8.dequantize(q, s)
    acc = np.zeros(x.shape, np.float32)
    for k in range(topk_idx.shape[1]):
        e = topk_idx[:, k]
        y = np.einsum("th,thg->tg", xq, all_weights[np.maximum(e, 0)])
        y = bf16_to_f32(np, to_bf16(np, y.astype(np.float32)))
        acc += np.where(e >= 0, topk_w[:, k], 0)[:, None] * y
    return acc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--tokens", type=int, default=32, help="M, tokens per rank per step")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts-per-rank", type=int, default=4)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--graph-steps", type=int, default=4)
    args = ap.parse_args()

    group = cupyep.Group()
    rank, size = group.rank, group.size
    m, h = args.tokens, args.hidden
    num_experts = args.experts_per_rank * size
    shared = np.random.default_rng(7)  # the same expert weights on every rank
    all_weights = (shared.standard_normal((num_experts, h, h)) / np.sqrt(h)).astype(np.float32)
    rng = np.random.default_rng(100 + rank)
    buf = cupyep.Buffer(group, num_rdma_bytes=cupyep.low_latency_size_hint(m, h, size, num_experts),
                        low_latency_mode=True, backend=args.backend)
    xp = np
    if buf.backend == "gpu":
        import cupy as xp
    local_w = xp.asarray(all_weights[rank * args.experts_per_rank:(rank + 1) * args.experts_per_rank])
    lut = xp.asarray(E4M3_TO_F32)

    def device(a):
        return xp.asarray(a.view(np.uint16)).view(fp8.bfloat16) if a.dtype == fp8.bfloat16 else xp.asarray(a)

    def host(a):
        a = a.get() if hasattr(a, "get") else np.asarray(a)
        return a

    def new_inputs():
        x = rng.standard_normal((m, h)).astype(fp8.bfloat16)
        logits = rng.standard_normal((m, num_experts)).astype(np.float32)
        idx = np.argsort(-logits, axis=1)[:, :args.topk].astype(np.int64)
        w = np.take_along_axis(logits, idx, 1)
        w = (np.exp(w) / np.exp(w).sum(1, keepdims=True)).astype(np.float32)
        return x, idx, w

    def layer(x, idx, w):
        d = buf.low_latency_dispatch(x, idx, m, num_experts, use_fp8=True, return_recv_hook=True)
        busy = xp.tanh(xp.ones((256, 256), xp.float32)).sum()  # work while tokens travel
        d.hook()
        y = buf.get_next_low_latency_combine_buffer(d.handle)
        experts_forward(xp, lut, local_w, d.recv_x, d.recv_x_scales, y)
        return buf.low_latency_combine(y, idx, w, d.handle).combined_x, busy

    worst = 0.0
    for _ in range(args.steps):
        x, idx, w = new_inputs()
        out, _ = layer(device(x), device(idx), device(w))
        want = expected(x, idx, w, all_weights)
        got = bf16_to_f32(np, host(out))
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    checked = [f"{args.steps} hook steps"]

    if buf.backend == "gpu" and args.graph_steps:
        x_d, idx_d, w_d = (device(a) for a in new_inputs())
        stream = xp.cuda.Stream(non_blocking=True)
        # The graph's temporaries come from a pool of its own that nothing else
        # allocates from, so replays never write memory handed out since.
        graph_pool = xp.cuda.MemoryPool()
        with stream, xp.cuda.using_allocator(graph_pool.malloc):
            layer(x_d, idx_d, w_d)  # warm-up outside capture fills the pool
            stream.synchronize()
            group.comm.Barrier()
            stream.begin_capture()
            out_d, _ = layer(x_d, idx_d, w_d)
            graph = stream.end_capture()
        with stream:
            for _ in range(args.graph_steps):
                x, idx, w = new_inputs()
                x_d[...], idx_d[...], w_d[...] = device(x), device(idx), device(w)
                graph.launch(stream)
                stream.synchronize()
                got = bf16_to_f32(np, host(out_d))
                want = expected(x, idx, w, all_weights)
                worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
        checked.append(f"{args.graph_steps} CUDA graph replays")

    ok = group.agree(worst < 2e-2)
    if rank == 0:
        print(f"low-latency decode on {size} ranks ({buf.backend} backend): {', '.join(checked)}, "
              f"{m} tokens x {h}, top-{args.topk} of {num_experts} experts, FP8 dispatch; worst "
              f"relative error {worst:.2e} -> {'OK' if ok else 'MISMATCH'}")
    buf.destroy()
    group.destroy()
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
