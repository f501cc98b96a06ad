#!/usr/bin/env bash
# One pass on a GPU machine: environment report, GPU tests at each rank count,
# then the benchmarks. Logs go to $LOG_DIR (default ./gpu-logs).
#   WHEELS=dir  install extra wheels (e.g. nvshmem4py) into /tmp/site first
#   RANKS="2 4" rank counts for the tests; BENCH_RANKS / LL_BENCH_RANKS: for
#   bench_normal / bench_low_latency (BENCH_ARGS / LL_BENCH_ARGS);
#   EXAMPLE_RANKS: every example with --backend gpu; STRESS_RANKS (STRESS_ARGS):
#   benchmarks/stress.py on the GPU backend; JIT_RANKS: benchmarks/bench_jit.py;
#   INTER_BENCH_RANKS: bench_normal on two emulated nodes (BENCH_ARGS too);
#   HOST_BENCH_RANKS (HOST_BENCH_ARGS): benchmarks/bench_host.py
#   SHARE_GPUS=1  several ranks per GPU (CUPYEP_SHARE_GPUS=1), for correctness on a
#   machine with fewer GPUs than ranks; RANKS then defaults to "2 3 4". Every test
#   runs shared (the inter-node cases as 2 nodes x N/2 at even N); benchmark
#   figures from shared GPUs are marked NOT comparable.
#   DEEPEP_TESTS=dir  DeepEP V1's own test programs (test_low_latency.py, test_intranode.py,
#   utils.py), run from there, unmodified, with `import deep_ep` resolving to cupyep.deep_ep,
#   at --num-processes $DEEPEP_PROCS (default 1; each process takes cuda:{local_rank});
#   DEEPEP_ARGS adds flags to test_low_latency.py (e.g. --use-logfmt)
# $LOG_DIR/summary.txt gets one line per test run: ranks, exit code, wall time, counts.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${LOG_DIR:-gpu-logs}; mkdir -p "$LOG_DIR"
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 NVSHMEM_DISABLE_NVLS=1
export CUPYEP_CACHE_DIR=${CUPYEP_CACHE_DIR:-/tmp/cupyep-jit}
# Unbound ranks: bound to one core, the Python thread time-slices with
# NVSHMEM's proxy thread and host waits take milliseconds.
MPIRUN=${MPIRUN:-mpirun --allow-run-as-root --bind-to none}
if [ "${SHARE_GPUS:-0}" = 1 ]; then
  export CUPYEP_SHARE_GPUS=1
  RANKS=${RANKS-2 3 4}
fi
{ nvidia-smi -L; nvidia-smi topo -m; python3 -c 'import cupy, torch; print("cupy", cupy.__version__, "torch", torch.__version__)'; } > "$LOG_DIR/env.txt" 2>&1
for n in ${RANKS-2}; do
  echo "== tests at $n ranks"
  start=$(date +%s)
  CUPYEP_TEST_SUMMARY="$LOG_DIR/tests-n$n.json" timeout ${TEST_TIMEOUT:-300} $MPIRUN -n $n python3 -m mpi4py \
    -m pytest tests -q ${PYTEST_ARGS--x} > "$LOG_DIR/tests-n$n.log" 2>&1
  rc=$?
  tail -25 "$LOG_DIR/tests-n$n.log"
  echo "tests at $n ranks${CUPYEP_SHARE_GPUS:+ (sharing GPUs)}: rc=$rc, $(( $(date +%s) - start )) s," \
    "$(cat "$LOG_DIR/tests-n$n.json" 2>/dev/null || echo 'no counts')" | tee -a "$LOG_DIR/summary.txt"
done
for n in ${EXAMPLE_RANKS:-}; do
  for ex in examples/*.py; do
    echo "== $ex at $n ranks"
    timeout ${EXAMPLE_TIMEOUT:-120} $MPIRUN -n $n python3 "$ex" --backend gpu 2>&1 | tee "$LOG_DIR/$(basename "$ex" .py)-n$n.log" | tail -5
  done
done
for n in ${JIT_RANKS:-}; do
  echo "== bench_jit at $n ranks"
  timeout ${BENCH_TIMEOUT:-240} $MPIRUN -n $n python3 benchmarks/bench_jit.py 2>&1 | tee "$LOG_DIR/bench-jit-n$n.log" | tail -30
done
for n in ${STRESS_RANKS:-}; do
  echo "== stress at $n ranks"
  timeout ${STRESS_TIMEOUT:-300} $MPIRUN -n $n python3 benchmarks/stress.py --backend gpu ${STRESS_ARGS:-} 2>&1 | tee "$LOG_DIR/stress-n$n.log" | tail -10
done
for n in ${BENCH_RANKS:-}; do
  echo "== bench_normal at $n ranks"
  timeout ${BENCH_TIMEOUT:-240} $MPIRUN -n $n python3 benchmarks/bench_normal.py ${BENCH_ARGS:-} 2>&1 | tee "$LOG_DIR/bench-normal-n$n.log" | tail -30
done
for n in ${INTER_BENCH_RANKS:-}; do
  echo "== bench_normal inter-node (2 x $((n / 2))) at $n ranks"
  timeout ${BENCH_TIMEOUT:-240} $MPIRUN -n $n python3 benchmarks/bench_normal.py --ranks-per-node $((n / 2)) ${BENCH_ARGS:-} 2>&1 | tee "$LOG_DIR/bench-internode-n$n.log" | tail -30
done
for n in ${LL_BENCH_RANKS:-}; do
  echo "== bench_low_latency at $n ranks"
  timeout ${BENCH_TIMEOUT:-240} $MPIRUN -n $n python3 benchmarks/bench_low_latency.py ${LL_BENCH_ARGS:-} 2>&1 | tee "$LOG_DIR/bench-low-latency-n$n.log" | tail -20
done
for n in ${HOST_BENCH_RANKS:-}; do
  echo "== bench_host at $n ranks"
  timeout ${BENCH_TIMEOUT:-240} $MPIRUN -n $n python3 benchmarks/bench_host.py ${HOST_BENCH_ARGS:-} 2>&1 | tee "$LOG_DIR/bench-host-n$n.log" | tail -40
done
if [ -n "${DEEPEP_TESTS:-}" ]; then
  shim=$(mktemp -d)
  mkdir -p "$shim/deep_ep"
  echo "from cupyep.deep_ep import *  # noqa: F401,F403  (import deep_ep -> cupyep's facade)" > "$shim/deep_ep/__init__.py"
  for t in test_low_latency test_intranode; do
    echo "== DeepEP's $t.py through cupyep.deep_ep, ${DEEPEP_PROCS:-1} process(es)"
    args=""; [ "$t" = test_low_latency ] && args="${DEEPEP_ARGS:-}"
    start=$(date +%s)
    (cd "$DEEPEP_TESTS" && PYTHONPATH="$shim:$PYTHONPATH" timeout ${DEEPEP_TIMEOUT:-300} python3 "$t.py" \
      --num-processes ${DEEPEP_PROCS:-1} $args) > "$LOG_DIR/deepep-$t.log" 2>&1
    rc=$?
    tail -8 "$LOG_DIR/deepep-$t.log"
    echo "DeepEP $t.py: rc=$rc, $(( $(date +%s) - start )) s" | tee -a "$LOG_DIR/summary.txt"
  done
fi
