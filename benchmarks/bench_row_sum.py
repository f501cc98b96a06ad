"""Per-SM rate of the combine receiver's row sums on one GPU, with and
without an L2 prefetch of the rows (no MPI, no peers).

    python benchmarks/bench_row_sum.py [--tokens 16384] [--rows 1 2 4] [--blocks 8 12 24 0]

A warp per token sums R bf16 rows of hidden 7168 (common.cuh's
warp_sum_rows, 1024 threads per block), the rows picked at random from a
1.1 GB pool so that they come from DRAM. GB/s counts the rows read and the
row written; per SM = over the blocks (0 blocks: one per SM). Prefetch:
none; "token": lane r asks for the token's row r in L2 before the sum;
"next": for the warp's next token's rows.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from cupyep.bench import queued_times  # noqa: E402
from cupyep.jit import KernelSpec, launch  # noqa: E402

HIDDEN_INT4 = 896  # 7168 bf16
POOL_ROWS = 80000
PREFETCH = {"none": 0, "token": 1, "next": 2}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--blocks", type=int, nargs="+", default=[8, 12, 24, 0])
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args(argv)

    import cupy
    dev = cupy.cuda.Device()
    num_sms = dev.attributes["MultiProcessorCount"]
    rng = np.random.default_rng(0)
    # Finite bf16 values in every half-word.
    pool = cupy.asarray(rng.integers(0, 2**31, size=(POOL_ROWS, HIDDEN_INT4 * 4), dtype=np.int32)
                        & np.int32(0x3f7f3f7f))
    out = cupy.empty((args.tokens, HIDDEN_INT4 * 4), np.int32)
    name = cupy.cuda.runtime.getDeviceProperties(dev.id)["name"].decode()
    print(f"row sums on one {name} ({num_sms} SMs), {args.tokens} tokens x 7168 bf16, 1024 threads per block; "
          "GB/s (per SM)")
    for r in args.rows:
        idx = cupy.asarray(rng.integers(0, POOL_ROWS, size=args.tokens * r).astype(np.int32))
        for label, mode in PREFETCH.items():
            spec = KernelSpec("cupyep/bench_kernels.cu", "cupyep::row_sum_probe",
                              (("kHiddenInt4", HIDDEN_INT4), ("kNumRows", r), ("kPrefetch", mode)))
            cells = []
            for blocks in args.blocks:
                blocks = blocks or num_sms
                call = (pool, idx, np.int32(args.tokens), out)

                def step(blocks=blocks, spec=spec, call=call):
                    launch(spec, (blocks,), (1024,), call)

                step()  # compile, warm up
                us = queued_times(step, args.iters)
                gbs = args.tokens * (r + 1) * HIDDEN_INT4 * 16 / us / 1e3
                cells.append(f"{blocks:3d} blocks {gbs:7.1f} ({gbs / blocks:5.1f})")
            print(f"R={r} prefetch {label:>5} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
