"""Stress: many iterations of random routing through one buffer, checked against the reference.

    mpirun -n 4 python benchmarks/stress.py --iters 10000 [--backend gpu] [--check-every 100]
    mpirun -n 4 python benchmarks/stress.py --ranks-per-node 2 ...   # inter-node path, normal calls only

Iterations alternate normal (dispatch + combine) and low-latency (dispatch +
combine) use of one buffer. Each draws tokens per rank from 0 to the maximum,
a top-k shared by all ranks, -1 slots, and experts skewed towards a few ranks.
Every --check-every iterations the same inputs also go through the reference
backend and the results must agree (exactly for moved data, within bf16
rounding for sums). Process and GPU memory are sampled at every check and must
stay flat. The verdict is collective; the last line gives counts and duration.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import cupyep  # noqa: E402
from cupyep.formats import fp8  # noqa: E402


def host(a):
    if a is None:
        return None
    if type(a).__module__.startswith("cupy"):
        if a.dtype == fp8.bfloat16:
            return a.view(np.uint16).get().view(fp8.bfloat16)
        return a.get()
    return np.asarray(a)


def bits(a):
    a = np.ascontiguousarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def close_bf16(a, b, roundings=1):
    a, b = a.astype(np.float32), b.astype(np.float32)
    return bool(np.all(np.abs(a - b) <= np.abs(b) * roundings * 2.0 ** -7 + 1e-6))


def draw(rng, shared, args, num_experts, size):
    """One iteration's inputs; `shared` draws what every rank must agree on."""
    k = int(shared.integers(1, args.max_topk + 1))
    t = int(rng.integers(0, args.max_tokens + 1))
    hot = shared.choice(size, size=max(1, size // 2), replace=False)  # ranks that get most tokens
    p = np.full(num_experts, 1.0)
    for r in hot:
        p[r * (num_experts // size):(r + 1) * (num_experts // size)] = 8.0
    p /= p.sum()
    idx = np.stack([rng.choice(num_experts, size=k, replace=False, p=p) for _ in range(t)]) if t else \
        np.zeros((0, k), np.int64)
    idx = idx.astype(np.int64)
    idx[rng.random(idx.shape) < 0.1] = -1
    x = (rng.standard_normal((t, args.hidden)) * 2).astype(np.float32).astype(fp8.bfloat16)
    w = rng.random(idx.shape).astype(np.float32)
    return x, idx, w


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=10000)
    ap.add_argument("--check-every", type=int, default=100)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts-per-rank", type=int, default=4)
    ap.add_argument("--max-topk", type=int, default=8)
    ap.add_argument("--memory-slack-mb", type=float, default=64.0)
    ap.add_argument("--ranks-per-node", type=int, default=None,
                    help="emulate nodes of this many ranks: inter-node path, normal calls only "
                         "(they share the low-latency memory)")
    args = ap.parse_args()

    group = cupyep.Group(num_ranks_per_node=args.ranks_per_node)
    internode = group.num_nodes > 1
    roundings = 2 if internode and group.num_ranks_per_node > 1 else 1
    rank, size = group.rank, group.size
    num_experts = args.experts_per_rank * size
    m, h = args.max_tokens, args.hidden
    buf_sizes = (cupyep.nvl_size_hint(h, m, size, args.max_topk),
                 max(cupyep.low_latency_size_hint(m, h, size, num_experts),
                     cupyep.rdma_size_hint(h, m, size, group.num_ranks_per_node, args.max_topk) if internode else 0))
    buf = cupyep.Buffer(group, num_nvl_bytes=buf_sizes[0], num_rdma_bytes=buf_sizes[1], low_latency_mode=True,
                        backend=args.backend)
    ref = cupyep.Buffer(group, num_nvl_bytes=buf_sizes[0], num_rdma_bytes=buf_sizes[1], backend="reference")
    gpu = buf.backend == "gpu"
    if gpu:
        import cupy
        dev = lambda a: (cupy.asarray(a.view(np.uint16)).view(fp8.bfloat16)  # noqa: E731
                         if a.dtype == fp8.bfloat16 else cupy.asarray(a))
        sync = cupy.cuda.Device().synchronize
        gpu_used = lambda: cupy.get_default_memory_pool().used_bytes()  # noqa: E731
    else:
        dev, sync, gpu_used = (lambda a: a), (lambda: None), (lambda: 0)
    rng = np.random.default_rng(1000 + rank)
    shared = np.random.default_rng(group.comm.bcast(int(np.random.SeedSequence().entropy % 2 ** 31)
                                                    if rank == 0 else None))
    failures, checks, memory = [], 0, []
    start = time.perf_counter()
    for i in range(args.iters):
        x, idx, w = draw(rng, shared, args, num_experts, size)
        check = (i + 1) % args.check_every == 0 or i == args.iters - 1
        low_latency = i % 2 == 1 and not internode
        try:
            if low_latency:
                use_fp8 = bool(shared.integers(0, 2))
                d = buf.low_latency_dispatch(dev(x), dev(idx), m, num_experts, use_fp8=use_fp8)
                c = buf.low_latency_combine(d.recv_x if not use_fp8 else dev(np.ones(d.recv_x.shape, fp8.bfloat16)),
                                            dev(idx), dev(w), d.handle)
                if check:
                    rd = ref.low_latency_dispatch(x, idx, m, num_experts, use_fp8=use_fp8)
                    y = rd.recv_x if not use_fp8 else np.ones(rd.recv_x.shape, fp8.bfloat16)
                    rc = ref.low_latency_combine(y, idx, w, rd.handle)
                    cnt = host(d.recv_count)
                    ok = (cnt == rd.recv_count).all() and (host(d.handle.layout_range) == rd.handle.layout_range).all()
                    gx = host(d.recv_x)
                    for e in range(len(cnt)):
                        ok = ok and (bits(gx[e, :cnt[e]]) == bits(rd.recv_x[e, :cnt[e]].view(gx.dtype))).all()
                    ok = ok and close_bf16(host(c.combined_x), rc.combined_x)
                    if not ok:
                        failures.append(f"iteration {i}: low-latency result differs from the reference")
            else:
                d = buf.dispatch(dev(x), dev(idx), dev(w), num_experts=num_experts)
                c = buf.combine(d.recv_x, d.handle, d.recv_topk_weights)
                if check:
                    rd = ref.dispatch(x, idx, w, num_experts=num_experts)
                    rc = ref.combine(rd.recv_x, rd.handle, rd.recv_topk_weights)
                    ok = ((bits(host(d.recv_x)) == bits(rd.recv_x)).all()
                          and (host(d.recv_topk_idx) == rd.recv_topk_idx).all()
                          and (host(d.recv_topk_weights) == rd.recv_topk_weights).all()
                          and list(d.num_recv_tokens_per_expert) == list(rd.num_recv_tokens_per_expert)
                          and close_bf16(host(c.combined_x), rc.combined_x, roundings))
                    if not ok:
                        failures.append(f"iteration {i}: normal result differs from the reference")
        except cupyep.CupyepError as e:
            failures.append(f"iteration {i}: {e}")
        if check:
            sync()
            checks += 1
            memory.append((resident_mib(), gpu_used() / 2 ** 20))
            if group.comm.allreduce(len(failures), op=_sum()):
                break
    sync()
    elapsed = time.perf_counter() - start
    # the first sample is taken after warm-up (first compiles and pool growth)
    growth = (memory[-1][0] - memory[0][0], memory[-1][1] - memory[0][1]) if len(memory) > 1 else (0.0, 0.0)
    flat = max(growth) <= args.memory_slack_mb
    ok = group.agree(not failures and flat)
    all_failures = group.comm.gather(failures, root=0)
    if rank == 0:
        for r, fs in enumerate(all_failures):
            for f in fs[:5]:
                print(f"rank {r}: {f}")
        n_ll = 0 if internode else (i + 1) // 2
        where = f", {group.num_nodes} nodes x {group.num_ranks_per_node}" if internode else ""
        print(f"stress on {size} ranks{where} ({buf.backend} backend): {i + 1} iterations "
              f"({i + 1 - n_ll} normal, {n_ll} low-latency), {checks} checked against the "
              f"reference, {sum(len(f) for f in all_failures)} failures, {elapsed:.1f} s; memory growth "
              f"rank 0 resident {growth[0]:+.1f} MiB, GPU pool {growth[1]:+.1f} MiB -> {'OK' if ok else 'FAILED'}")
    buf.destroy()
    ref.destroy()
    group.destroy()
    raise SystemExit(0 if ok else 1)


def resident_mib() -> float:
    """Resident set size now (not the peak), in MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _sum():
    from mpi4py import MPI
    return MPI.SUM


if __name__ == "__main__":
    main()
