"""What each rank sees when ranks disagree, and how every rank recovers.

    mpiexec -n 2 python examples/when_ranks_disagree.py [--backend auto|gpu|reference] [--timeout 2]

Five cases: one rank passes a bad argument (then makes the next call, one
call ahead of the others), ranks pass different hidden sizes (low-latency and
normal calls), and a rank that does not come. Each case prints, per rank, the
error it got and how long it took to see it; then ``reset()`` on every rank
brings them back in step, and a correct call is checked. On the GPU a kernel
reports what it saw at the rank's next call, or at ``check_errors()``.
"""
import argparse
import os
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--timeout", type=float, default=2.0, help="CUPYEP_TIMEOUT_S for this run")
    args = ap.parse_args()
    os.environ["CUPYEP_TIMEOUT_S"] = str(args.timeout)
    import cupyep
    from cupyep.formats.fp8 import bfloat16
    from mpi4py import MPI

    group = cupyep.Group()
    rank, size = group.rank, group.size
    if size < 2:
        print("ranks disagree only when there are two or more: run under mpiexec -n 2 or more")
        return
    last, e, m = size - 1, 4 * size, 32
    buf = cupyep.Buffer(group, num_nvl_bytes=cupyep.nvl_size_hint(512, m, size, 2),
                        num_rdma_bytes=cupyep.low_latency_size_hint(m, 512, size, e), backend=args.backend)
    if buf.backend == "gpu":
        import cupy
        dev = cupy.asarray
    else:
        dev = np.asarray
    rng = np.random.default_rng(rank)
    rows = {h: dev(rng.standard_normal((16, h)).astype(bfloat16)) for h in (256, 512)}
    x = rows[256]
    idx_host = np.argsort(rng.random((16, e)), 1)[:, :2].astype(np.int64)
    idx, bad_idx = dev(idx_host), dev(idx_host.astype(np.float32))

    local = e // size
    to_each = np.array([((idx_host // local) == r).any(1).sum() for r in range(size)])
    want = int(group.comm.allreduce(to_each)[rank])  # tokens this rank receives from all
    notes = []

    def run(title, call):
        notes.clear()
        t0 = time.monotonic()
        try:
            call()
            buf.check_errors()
            seen = "no error"
        except cupyep.CupyepError as ex:
            seen = f"{type(ex).__name__}: {ex}"
        lines = group.comm.gather(f"  rank {rank} ({time.monotonic() - t0:.2f} s): {''.join(notes)}{seen}",
                                  root=0)
        buf.reset()
        d = buf.dispatch(x, idx, num_experts=e)  # the next correct call, on every rank
        fine = group.comm.allreduce(int(d.recv_x.shape[0]) == want, op=MPI.LAND)
        if rank == 0:
            print(title)
            print("\n".join(lines))
            print(f"  after reset(): the next dispatch is {'right on every rank' if fine else 'WRONG'}", flush=True)
        if not fine:
            raise SystemExit(1)

    def bad_then_good(bad, good):
        """The last rank's bad call raises at once; it then makes the next call."""
        def call():
            if rank == last:
                try:
                    bad()
                except cupyep.InvalidInputError as ex:
                    notes.append(f"at once InvalidInputError: {ex}; then ")
            good()
        return call

    def late():
        if rank == last:
            time.sleep(args.timeout + 1.0)  # it does not come to this call in time
        else:
            buf.dispatch(x, idx, num_experts=e)

    run(f"1. rank {last} passes float32 topk_idx, then calls again with the right one (one call ahead):",
        bad_then_good(lambda: buf.dispatch(x, bad_idx, num_experts=e), lambda: buf.dispatch(x, idx, num_experts=e)))
    run("2. rank 0 dispatches hidden 512, the others 256 (normal dispatch):",
        lambda: buf.dispatch(rows[512] if rank == 0 else x, idx, num_experts=e))
    run("3. rank 0 dispatches hidden 512, the others 256 (low-latency dispatch):",
        lambda: buf.low_latency_dispatch(rows[512] if rank == 0 else x, idx, m, e, use_fp8=False))
    run(f"4. rank {last} passes float32 topk_idx to a low-latency dispatch, then calls again:",
        bad_then_good(lambda: buf.low_latency_dispatch(x, bad_idx, m, e, use_fp8=False),
                      lambda: buf.low_latency_dispatch(x, idx, m, e, use_fp8=False)))
    run(f"5. rank {last} does not come to a dispatch for {args.timeout + 1:.0f} s "
        f"(CUPYEP_TIMEOUT_S={args.timeout:g}):", late)
    buf.destroy()
    group.destroy()


if __name__ == "__main__":
    main()
