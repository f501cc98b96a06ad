"""Start-up costs: cold compile per kernel module, cached lookup, Group and Buffer creation.

    python benchmarks/bench_jit.py                 # compile times (no GPU needed)
    mpirun -n 2 python benchmarks/bench_jit.py     # also Group / Buffer creation on GPUs

Compiles every kernel instantiation of cupyep.kernel_specs into an empty cache
(cold), then looks each up again (warm), for sm_90. With a GPU and mpirun it
also times cupyep.Group() (NVSHMEM start) and Buffer creation (collective
symmetric allocation).
"""
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import cupyep  # noqa: E402
from cupyep import jit  # noqa: E402
from cupyep.kernel_specs import nvshmem_specs, representative_specs  # noqa: E402


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


def main():
    from mpi4py import MPI
    rank = MPI.COMM_WORLD.Get_rank()
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


if __name__ == "__main__":
    main()
