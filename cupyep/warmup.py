"""Compile, ahead of time, every kernel a model's calls will launch.

    python -m cupyep.warmup --hidden 7168 --topk 8 --experts 256 288 --ranks 2 4 8 [--ranks-per-node 4]

A serving process otherwise waits for the compiler at its first call (and again
at the first call of every new shape). Run this once per machine (or in the
image build): the kernels land in the disk cache (``CUPYEP_CACHE_DIR``, default
``~/.cache/cupyep``) and first calls load them in milliseconds. Compiles run in
parallel over the CPU cores; no GPU is needed (``--arch`` picks the target,
default the GPU present, else sm_90). A ``Buffer`` can warm its own kernels at
creation: ``Buffer(..., warmup=dict(hidden=7168, num_topk=8))``.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import sys
import time

from cupyep import jit
from cupyep.jit.specs import model_specs


def _compile_one(spec, arch):
    """(seconds, whether it compiled rather than found the entry), in a worker."""
    before, t0 = jit.compiles, time.perf_counter()
    jit.compile_cubin(spec, arch)
    return time.perf_counter() - t0, jit.compiles > before


def default_arch() -> str:
    """sm_XY of the current GPU, or sm_90 without one."""
    try:
        import cupy
        return jit.device_arch(cupy.cuda.Device().id)
    except Exception:
        return "sm_90"


def warmup(hidden: int, num_topk: int, num_experts=256, num_ranks=(2, 4, 8), ranks_per_node=None,
           fp8: bool = True, bf16: bool = True, low_latency: bool = True, normal: bool = True,
           logfmt: bool = False, int32_topk: bool = False, nvshmem_low_latency: bool = False,
           arch: str | None = None, jobs: int | None = None, progress=print) -> dict:
    """Compile every kernel of :func:`cupyep.jit.specs.model_specs` into the disk cache.

    Args:
        hidden, num_topk, num_experts, num_ranks, ranks_per_node, fp8, bf16,
            low_latency, normal, logfmt: as :func:`cupyep.jit.specs.model_specs`.
        int32_topk: also int32 ``topk_idx`` (int64 always).
        nvshmem_low_latency: also the NVSHMEM-linked low-latency kernels.
        arch: target, e.g. "sm_90" (default: the GPU present, else sm_90).
        jobs: parallel compiles (default: the CPU cores).
        progress: called with one line per kernel (None: silent).

    Returns:
        {"specs": number of kernels, "compiled": how many were not cached,
        "seconds": wall time, "cache_dir": path, "cache_bytes": its size}.
    """
    arch = arch or default_arch()
    specs = model_specs(hidden, num_topk, num_experts, num_ranks, ranks_per_node, fp8=fp8, bf16=bf16,
                        low_latency=low_latency, normal=normal, logfmt=logfmt,
                        idx_types=("long long", "int") if int32_topk else ("long long",),
                        nvshmem_low_latency=nvshmem_low_latency)
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(specs)))
    t0 = time.perf_counter()
    compiled = 0
    # Each worker process compiles some entries; cache locks keep two from
    # compiling the same one (other ranks warming at once included).
    # Spawned workers: forking a process that holds a CUDA context is unsafe.
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=spawn) as pool:
        futures = {pool.submit(_compile_one, spec, arch): spec for spec in specs}
        for i, fut in enumerate(concurrent.futures.as_completed(futures), 1):
            seconds, was_compiled = fut.result()
            spec = futures[fut]
            cached = not was_compiled
            compiled += was_compiled
            if progress:
                bar = "#" * (20 * i // len(specs))
                progress(f"[{bar:<20}] {i}/{len(specs)} {spec.instantiation}"
                         f"{' (NVSHMEM)' if spec.nvshmem else ''}: {'cached' if cached else f'{seconds:.2f} s'}")
    d = jit.cache_dir()
    size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".cubin"))
    out = {"specs": len(specs), "compiled": compiled, "seconds": time.perf_counter() - t0, "cache_dir": d,
           "cache_bytes": size}
    if progress:
        progress(f"{len(specs)} kernels for {arch} ({compiled} compiled, {len(specs) - compiled} cached) in "
                 f"{out['seconds']:.1f} s with {jobs} processes; cache {d}: {size / 2**20:.1f} MiB")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cupyep.warmup", description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, required=True)
    ap.add_argument("--topk", type=int, required=True)
    ap.add_argument("--experts", type=int, nargs="+", default=[256])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--ranks-per-node", type=int, default=None,
                    help="ranks in one NVLink domain, when calls span nodes (inter-node kernels)")
    ap.add_argument("--no-fp8", action="store_true")
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--no-low-latency", action="store_true")
    ap.add_argument("--no-normal", action="store_true")
    ap.add_argument("--logfmt", action="store_true")
    ap.add_argument("--int32-topk", action="store_true")
    ap.add_argument("--nvshmem-low-latency", action="store_true")
    ap.add_argument("--arch", default=None)
    ap.add_argument("--jobs", type=int, default=None)
    args = ap.parse_args(argv)
    try:
        warmup(args.hidden, args.topk, args.experts, args.ranks, args.ranks_per_node, fp8=not args.no_fp8,
               bf16=not args.no_bf16, low_latency=not args.no_low_latency, normal=not args.no_normal,
               logfmt=args.logfmt, int32_topk=args.int32_topk, nvshmem_low_latency=args.nvshmem_low_latency,
               arch=args.arch, jobs=args.jobs)
    except ImportError as e:
        print(f"cupyep.warmup needs NVRTC through cuda-core (pip install 'cupyep[gpu]'): {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
