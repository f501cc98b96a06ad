"""``python -m cupyep.bench``: normal and low-latency benchmarks against tokens per rank.

    mpirun -n 2 python -m cupyep.bench [--plot cupyep-bench.png] [--iters 20]

Protocol of docs/measuring.md, hidden 7168. Normal kernels: top-8 of 256 experts,
random routing, 24 SMs; bandwidth = bytes of the received rows counted as BF16
(times (1 + 4/128) / 2 for FP8), self rows included, over the median time of a
call (CUDA events around each call; dispatch includes its host synchronisation).
Low-latency kernels: top-8 of 288 experts; latency per call, calls queued
behind a spin kernel so the events time the kernels, not Python. NCCL
baseline (torch ``all_to_all_single`` of the same rows after an
``index_select``) where torch is installed. Rank 0 prints the slowest rank's
numbers and, with matplotlib installed, writes a PNG of bandwidth and latency
against tokens per rank. Needs GPUs (the GPU backend).
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np

from cupyep import Buffer, Config, Group, low_latency_size_hint, nvl_size_hint
from cupyep.formats import fp8
from cupyep.jit import KernelSpec, launch

_SPIN = KernelSpec("cupyep/bench_kernels.cu", "cupyep::spin_ns")


def busy_for(us: float) -> None:
    """Keep CuPy's current stream busy for ``us`` microseconds (one spinning
    thread): work queued behind it waits there, so the host runs ahead."""
    launch(_SPIN, (1,), (1,), (np.int64(us * 1000),))


def queued_step_times(steps, iters: int, spin_us_per_iter: int = 400) -> list:
    """Median GPU time (us) of each of ``steps`` (callables, a round), over
    ``iters`` rounds queued back to back behind a spin kernel: the GPU then
    runs the steps one after another, so the events around each time its
    kernels (waits on peers included), not the host's launch rate."""
    import cupy
    busy_for(spin_us_per_iter * iters)
    marks = []
    for _ in range(iters):
        row = [cupy.cuda.Event()]
        row[0].record()
        for step in steps:
            step()
            row.append(cupy.cuda.Event())
            row[-1].record()
        marks.append(row)
    marks[-1][-1].synchronize()
    return [statistics.median(cupy.cuda.get_elapsed_time(r[j], r[j + 1]) * 1e3 for r in marks)
            for j in range(len(steps))]


def queued_times(step, iters: int) -> float:
    """Median GPU time (us) of ``step`` over ``iters`` calls queued back to back
    behind a spin kernel (queued_step_times of one step)."""
    return queued_step_times([step], iters)[0]


def profiled_kernels(steps, iters: int, spin_us_per_iter: int = 400):
    """{kernel name: [duration us per launch]} of ``iters`` rounds of ``steps``
    queued behind a spin kernel, from torch's CUDA profiler (kineto, what
    DeepEP's tests time); None without torch. A first short session starts
    the profiler, so that its start-up does not fall inside a kernel. Names
    are demangled, without ``void`` and the parameter list."""
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    import cupy

    def session(rounds):
        cupy.cuda.Device().synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            launch(_SPIN, (1,), (1,), (np.int64(spin_us_per_iter * 1000 * rounds),))
            for _ in range(rounds):
                for step in steps:
                    step()
            cupy.cuda.Device().synchronize()
        return prof.profiler.kineto_results.events()
    session(2)
    out = {}
    for ev in session(iters):
        name = ev.name()
        if ev.device_type() != DeviceType.CUDA or "spin_ns" in name:
            continue
        name = name.split("(")[0].removeprefix("void ").strip()
        out.setdefault(name, []).append(ev.duration_ns() / 1e3)
    return out


def event_times(step, iters: int) -> float:
    """Median time (us) of ``step`` between CUDA events, one call at a time."""
    import cupy
    times = []
    for _ in range(iters):
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record()
        step()
        b.record()
        b.synchronize()
        times.append(cupy.cuda.get_elapsed_time(a, b) * 1e3)
    return statistics.median(times)


def _slowest(group, us: float) -> float:
    from mpi4py import MPI
    return group.comm.allreduce(us, op=MPI.MAX)


def add_protocol_args(ap, tokens: int, experts: int) -> None:
    """--tokens (per rank), --hidden, --experts, --topk with the values of docs/measuring.md."""
    ap.add_argument("--tokens", type=int, default=tokens)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--experts", type=int, default=experts)
    ap.add_argument("--topk", type=int, default=8)


def experts_for_ranks(num_experts: int, num_ranks: int) -> int:
    """The most experts <= num_experts that split evenly over num_ranks, at
    least one per rank (the protocol's 256 do not split over 3 or 6 ranks:
    255 and 252 then)."""
    return max(num_ranks, num_experts - num_experts % num_ranks)


def random_inputs(rng, tokens, hidden, experts, topk):
    """(x, topk_idx, topk_weights) on the GPU, then x and topk_idx on the host."""
    import cupy
    x = rng.standard_normal((tokens, hidden)).astype(fp8.bfloat16)
    idx = np.argsort(rng.random((tokens, experts)), axis=1)[:, :topk].astype(np.int64)
    w = rng.random((tokens, topk)).astype(np.float32)
    return (cupy.asarray(x.view(np.uint16)).view(fp8.bfloat16), cupy.asarray(idx), cupy.asarray(w), x, idx)


def low_latency_setup(group, args):
    """(buf, x, topk_idx, topk_weights): a GPU low-latency Buffer sized for the
    protocol's arguments (add_protocol_args) and this rank's random inputs
    (x [T][H] bf16, topk_idx [T][K] int64, topk_weights [T][K] float32)."""
    rdma = low_latency_size_hint(args.tokens, args.hidden, group.size, args.experts)
    buf = Buffer(group, num_rdma_bytes=rdma, low_latency_mode=True, backend="gpu")
    rng = np.random.default_rng(group.rank)
    x, idx, w, _, _ = random_inputs(rng, args.tokens, args.hidden, args.experts, args.topk)
    return buf, x, idx, w


def random_bf16(shape):
    """Standard normal values as a CuPy bf16 array (fp32 draws, truncated)."""
    import cupy
    bits = cupy.random.standard_normal(shape, np.float32).view(np.uint32)
    return (bits >> 16).astype(np.uint16).view(fp8.bfloat16)


def nccl_dispatch(group, x, topk_idx_host, num_experts, per_expert=False):
    """The NCCL baseline step: torch ``all_to_all_single`` of one row per
    (token, destination rank) after an ``index_select``; with ``per_expert``,
    one row per (token, expert), what a plain MoE layer sends.

    Returns (step, bytes of the (token, rank) rows received here, DeepEP's
    accounting in both cases), or (None, 0) without torch.
    """
    try:
        import torch
        import torch.distributed as dist
    except ImportError:
        return None, 0
    from cupyep.comm.torch_comm import init_torch_distributed
    init_torch_distributed(group.comm, "nccl")
    local = num_experts // group.size
    valid = topk_idx_host >= 0
    dest = np.where(valid, topk_idx_host // local, -1)
    in_rank = np.zeros((topk_idx_host.shape[0], group.size), bool)
    for k in range(topk_idx_host.shape[1]):
        in_rank[np.flatnonzero(valid[:, k]), dest[valid[:, k], k]] = True
    if per_expert:  # entries in token order, each naming its token
        order = [np.flatnonzero(dest.ravel() == j) // topk_idx_host.shape[1] for j in range(group.size)]
    else:
        order = [np.flatnonzero(in_rank[:, j]) for j in range(group.size)]
    x_t = torch.from_dlpack(x)
    index = torch.as_tensor(np.concatenate(order), device=x_t.device)
    send = [len(o) for o in order]
    recv = group.comm.alltoall(send)
    pairs = sum(group.comm.alltoall([int(in_rank[:, j].sum()) for j in range(group.size)]))
    out = torch.empty(sum(recv), x_t.shape[1], dtype=x_t.dtype, device=x_t.device)
    return (lambda: dist.all_to_all_single(out, x_t.index_select(0, index), recv, send)), pairs * x_t.shape[1] * 2


def _nccl(group, x, idx_host, num_experts, iters):
    """NCCL baseline time (us), nan without torch."""
    step, _ = nccl_dispatch(group, x, idx_host, num_experts)
    return float("nan") if step is None else event_times(step, iters)


def teardown(buf, group):
    """Free the buffer, torch.distributed if a baseline started it, and the group."""
    buf.destroy()
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except ImportError:
        pass
    group.destroy()


def run(group, args):
    """Rows of results, one dict per (kind, tokens per rank), slowest rank's times."""
    import cupy
    rng = np.random.default_rng(group.rank)
    hidden, rows = args.hidden, []
    max_t = max(args.normal_tokens)
    buf = Buffer(group, num_nvl_bytes=nvl_size_hint(hidden, max_t, group.size, 8),
                 num_rdma_bytes=low_latency_size_hint(max(args.ll_tokens), hidden, group.size, 288),
                 low_latency_mode=True, backend="gpu")
    cfg = Config(num_sms=args.sms)
    for t in args.normal_tokens:
        x, idx, w, x_host, idx_host = random_inputs(rng, t, hidden, 256, 8)
        q, scales = fp8.per_token_cast_to_fp8(x_host)
        xq = (cupy.asarray(q.view(np.uint8)), cupy.asarray(scales))
        d = buf.dispatch(x, idx, w, num_experts=256, config=cfg)
        n = int(d.recv_x.shape[0])
        for _ in range(args.warmup):
            buf.combine(d.recv_x, d.handle, d.recv_topk_weights, config=cfg)
        group.barrier()
        t_bf16 = event_times(lambda: buf.dispatch(x, idx, w, num_experts=256, config=cfg), args.iters)
        t_fp8 = event_times(lambda: buf.dispatch(xq, idx, w, num_experts=256, config=cfg), args.iters)
        t_comb = event_times(lambda: buf.combine(d.recv_x, d.handle, d.recv_topk_weights, config=cfg),
                             args.iters)
        t_nccl = _nccl(group, x, idx_host, 256, args.iters)
        gb = lambda nbytes, us: _slowest_bw(group, nbytes, us)  # noqa: E731
        bf16_bytes = n * hidden * 2
        rows.append(dict(kind="normal", tokens=t, fp8_dispatch=gb(bf16_bytes * (1 + 4 / 128) / 2, t_fp8),
                         bf16_dispatch=gb(bf16_bytes, t_bf16), combine=gb(bf16_bytes, t_comb),
                         nccl=gb(bf16_bytes, t_nccl)))
    for t in args.ll_tokens:
        x, idx, w, _, idx_host = random_inputs(rng, t, hidden, 288, 8)
        m = max(args.ll_tokens)
        y = cupy.ones((288 // group.size, group.size * m, hidden), fp8.bfloat16)
        state = {}
        for _ in range(args.warmup):
            buf.low_latency_combine(y, idx, w, buf.low_latency_dispatch(x, idx, m, 288).handle)
        cupy.cuda.Device().synchronize()
        group.barrier()

        def dispatch():
            state["d"] = buf.low_latency_dispatch(x, idx, m, 288, use_fp8=True)

        t_d = queued_times(dispatch, args.iters)
        t_c = queued_times(lambda: buf.low_latency_combine(y, idx, w, state["d"].handle), args.iters)
        rows.append(dict(kind="low_latency", tokens=t, dispatch_us=_slowest(group, t_d),
                         combine_us=_slowest(group, t_c),
                         nccl_us=_slowest(group, _nccl(group, x, idx_host, 288, args.iters))))
    cupy.cuda.Device().synchronize()
    return buf, rows


def _slowest_bw(group, nbytes, us):
    """GB/s of the slowest rank (its time, its bytes)."""
    from mpi4py import MPI
    return group.comm.allreduce(nbytes / us / 1e3 if us == us else float("nan"), op=MPI.MIN)


def table(rows) -> str:
    out = ["normal kernels (GB/s, slowest rank)",
           f"{'tokens':>7} | {'FP8 dispatch':>12} | {'BF16 dispatch':>13} | {'combine':>8} | {'NCCL':>6}"]
    out += [f"{r['tokens']:>7} | {r['fp8_dispatch']:>12.1f} | {r['bf16_dispatch']:>13.1f} | "
            f"{r['combine']:>8.1f} | {r['nccl']:>6.1f}" for r in rows if r["kind"] == "normal"]
    out += ["low-latency kernels (us, slowest rank)",
            f"{'tokens':>7} | {'dispatch':>9} | {'combine':>8} | {'NCCL':>6}"]
    out += [f"{r['tokens']:>7} | {r['dispatch_us']:>9.1f} | {r['combine_us']:>8.1f} | {r['nccl_us']:>6.1f}"
            for r in rows if r["kind"] == "low_latency"]
    return "\n".join(out)


def plot(rows, path: str, title: str) -> bool:
    """Two panels: bandwidth and latency against tokens per rank. False
    without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    normal = [r for r in rows if r["kind"] == "normal"]
    for key, label in (("fp8_dispatch", "FP8 dispatch"), ("bf16_dispatch", "BF16 dispatch"),
                       ("combine", "BF16 combine"), ("nccl", "NCCL baseline")):
        a.plot([r["tokens"] for r in normal], [r[key] for r in normal], "o-", label=label)
    a.set(xlabel="tokens per rank", ylabel="GB/s", title="normal kernels", xscale="log")
    ll = [r for r in rows if r["kind"] == "low_latency"]
    for key, label in (("dispatch_us", "dispatch"), ("combine_us", "combine"), ("nccl_us", "NCCL baseline")):
        b.plot([r["tokens"] for r in ll], [r[key] for r in ll], "o-", label=label)
    b.set(xlabel="tokens per rank", ylabel="us", title="low-latency kernels", xscale="log")
    for ax in (a, b):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m cupyep.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--normal-tokens", type=int, nargs="*", default=[512, 1024, 2048, 4096])
    ap.add_argument("--ll-tokens", type=int, nargs="*", default=[16, 32, 64, 128])
    ap.add_argument("--sms", type=int, default=24)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--plot", default="cupyep-bench.png", help="PNG path ('' for none)")
    args = ap.parse_args(argv)
    from cupyep.comm.group import gpu_available
    if not gpu_available():
        raise SystemExit("python -m cupyep.bench measures the GPU kernels: it needs a CUDA GPU, CuPy and "
                         "nvshmem4py (pip install 'cupyep[gpu]'), and none is usable here. Without a GPU, "
                         "the reference backend runs the examples and tests (README).")
    group = Group()
    buf, rows = run(group, args)
    if group.rank == 0:
        from cupyep.comm.runtime import card_label
        title = f"cupyep, {card_label(group)}, hidden {args.hidden}, {args.sms} SMs (normal)"
        print(title)
        print(table(rows))
        if args.plot:
            print(f"plot: {args.plot}" if plot(rows, args.plot, title) else "plot: skipped (no matplotlib)")
    teardown(buf, group)


if __name__ == "__main__":
    main()
