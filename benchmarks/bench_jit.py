"""Start-up costs: cold compile per kernel module, cached lookup, Group and Buffer
creation, first calls from an empty cache, and the ahead-of-time warm-up.

    python benchmarks/bench_jit.py                 # compile times (no GPU needed)
    mpirun -n 2 python benchmarks/bench_jit.py     # also Group / Buffer creation on GPUs
    mpirun -n 2 python benchmarks/bench_jit.py --first-calls [--ranks-per-node 1]

Compiles every kernel instantiation of cupyep.jit.specs into an empty cache
(cold), then looks each up again (warm), for sm_90. With a GPU and mpirun it
also times cupyep.Group() (NVSHMEM start) and Buffer creation (collective
symmetric allocation). ``--first-calls`` (GPU) times, each from an empty
cache shared by the ranks: the first low-latency dispatch + combine pair and
the first normal dispatch + combine (128 tokens x 7168, top-8 of 288 experts,
FP8 dispatch); then ``cupyep.warmup`` for the benchmark's shapes (wall time)
and the same first calls in a fresh buffer with that warm cache.
``--ranks-per-node 1`` takes the inter-node path (nodes emulated on one host).
"""
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import cupyep  # noqa: E402
from cupyep import jit  # noqa: E402
from cupyep.jit.specs import nvshmem_specs, representative_specs  # noqa: E402


def compile_times(specs):
    rows = []
    for spec in specs:
        t0 = time.perf_counter()
        jit.compile_cubin(spec, "sm_90")
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        jit.compile_cubin(spec, "sm_90")
        warm = time.perf_counter() - t0
        rows.append((spec, cold, warm))
    return rows


def first_calls(group, cache, tokens=128, hidden=7168, topk=8, experts=288):
    """(seconds of the first LL pair, of the first normal dispatch + combine),
    each on a fresh buffer, compiles included, with ``cache`` as the cache."""
    import cupy
    import numpy as np
    from cupyep.formats.fp8 import bfloat16, per_token_cast_to_fp8
    os.environ["CUPYEP_CACHE_DIR"] = cache
    r = group.size
    experts = max(r, experts - experts % r)
    rng = np.random.default_rng(group.rank)
    x_host = rng.standard_normal((tokens, hidden)).astype(np.float32).astype(bfloat16)
    idx = cupy.asarray(np.argsort(rng.random((tokens, experts)), 1)[:, :topk].astype(np.int64))
    w = cupy.asarray(rng.random((tokens, topk)).astype(np.float32))
    x = cupy.asarray(x_host.view(np.uint16)).view(bfloat16)
    q, sc = per_token_cast_to_fp8(x_host)
    fp8_x = (cupy.asarray(q.view(np.uint8)), cupy.asarray(sc))
    rdma = cupyep.low_latency_size_hint(tokens, hidden, r, experts)
    if group.num_nodes > 1:
        rdma = max(rdma, cupyep.rdma_size_hint(hidden, tokens, r, group.num_ranks_per_node, topk))
    buf = cupyep.Buffer(group, num_nvl_bytes=cupyep.nvl_size_hint(hidden, tokens, r, topk), num_rdma_bytes=rdma,
                        low_latency_mode=True, backend="gpu")
    # expert outputs made before the clock starts (CuPy compiles its fill kernel on first use)
    y_ll = cupy.ones((experts // r, r * tokens, hidden), bfloat16)
    y_normal = cupy.ones((r * tokens, hidden), bfloat16)
    out = []
    try:
        for step in ("ll", "normal"):
            if step == "normal" and group.num_nodes > 1:
                buf.clean_low_latency_buffer()  # the RDMA memory switches to normal calls
            cupy.cuda.Device().synchronize()
            group.barrier()
            t0 = time.perf_counter()
            if step == "ll":
                d = buf.low_latency_dispatch(x, idx, tokens, experts, use_fp8=True)
                buf.low_latency_combine(y_ll, idx, w, d.handle)
            else:
                d = buf.dispatch(fp8_x, idx, w, num_experts=experts)
                buf.combine(y_normal[:d.recv_x.shape[0]], d.handle)
            cupy.cuda.Device().synchronize()
            out.append(time.perf_counter() - t0)
    finally:
        buf.destroy()
    return out


def main():
    import argparse
    from mpi4py import MPI
    ap = argparse.ArgumentParser()
    ap.add_argument("--first-calls", action="store_true")
    ap.add_argument("--ranks-per-node", type=int, default=None)
    args = ap.parse_args()
    rank = MPI.COMM_WORLD.Get_rank()
    if args.first_calls:
        return main_first_calls(args)
    if rank == 0:
        os.environ["CUPYEP_CACHE_DIR"] = tempfile.mkdtemp(prefix="cupyep-jit-bench-")
        specs = representative_specs()
        try:
            import nvshmem.core  # noqa: F401
            specs += nvshmem_specs()
        except ImportError:
            print("nvshmem4py missing: NVSHMEM-linked modules skipped")
        rows = compile_times(specs)
        print(f"{'module':70} {'cold s':>7} {'warm ms':>8}")
        for spec, cold, warm in rows:
            tag = " (NVSHMEM-linked)" if spec.nvshmem else ""
            print(f"{(spec.readable_key + tag)[:70]:70} {cold:7.2f} {warm * 1e3:8.2f}")
        plain = [c for s, c, _ in rows if not s.nvshmem]
        linked = [c for s, c, _ in rows if s.nvshmem]
        print(f"cold compile: {len(plain)} NVRTC modules, median {sorted(plain)[len(plain) // 2]:.2f} s, "
              f"total {sum(plain):.1f} s" + (f"; {len(linked)} NVSHMEM-linked, median "
                                              f"{sorted(linked)[len(linked) // 2]:.2f} s" if linked else ""))
        print(f"warm (cached) lookup: median {sorted(w for *_, w in rows)[len(rows) // 2] * 1e3:.2f} ms")
    MPI.COMM_WORLD.Barrier()
    if cupyep.gpu_available() and MPI.COMM_WORLD.Get_size() > 1:
        t0 = time.perf_counter()
        group = cupyep.Group()
        t1 = time.perf_counter()
        buf = cupyep.Buffer(group, num_nvl_bytes=256 << 20, num_rdma_bytes=256 << 20,
                            low_latency_mode=True, backend="gpu")
        t2 = time.perf_counter()
        if rank == 0:
            print(f"Group(): {t1 - t0:.2f} s; Buffer(256 MiB NVLink + 256 MiB low-latency): {t2 - t1:.2f} s")
        buf.destroy()
        group.destroy()


def main_first_calls(args):
    """First calls from an empty cache, the warm-up's wall time, first calls with its cache."""
    from mpi4py import MPI
    from cupyep.comm.runtime import card_label
    from cupyep.warmup import warmup
    group = cupyep.Group(num_ranks_per_node=args.ranks_per_node)
    comm = MPI.COMM_WORLD
    cold_dir = comm.bcast(tempfile.mkdtemp(prefix="cupyep-first-") if group.rank == 0 else None)
    cold = first_calls(group, cold_dir)
    warm_dir = comm.bcast(tempfile.mkdtemp(prefix="cupyep-warm-") if group.rank == 0 else None)
    os.environ["CUPYEP_CACHE_DIR"] = warm_dir
    t0 = time.perf_counter()
    if group.local_rank == 0:  # one warm-up per host; its processes use the host's cores
        warmup(7168, 8, 288, (group.size,), group.num_ranks_per_node if group.num_nodes > 1 else None,
               nvshmem_low_latency=group.num_nodes > 1, progress=None)
    comm.Barrier()
    warm_s = time.perf_counter() - t0
    warm = first_calls(group, warm_dir)
    worst = [comm.allreduce(v, op=MPI.MAX) for v in (*cold, warm_s, *warm)]
    if group.rank == 0:
        path = "inter-node" if group.num_nodes > 1 else "one NVLink domain"
        print(f"first calls, {card_label(group)}, {path}, 128 x 7168, top-8 of 288, FP8 (slowest rank):")
        print(f"  empty cache: LL pair {worst[0]:.2f} s, normal dispatch + combine {worst[1]:.2f} s")
        print(f"  cupyep.warmup for these shapes: {worst[2]:.1f} s wall")
        print(f"  after the warm-up: LL pair {worst[3] * 1e3:.0f} ms, normal dispatch + combine {worst[4] * 1e3:.0f} ms")
    group.destroy()


if __name__ == "__main__":
    main()
