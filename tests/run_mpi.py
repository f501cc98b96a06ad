"""Run the test suite under MPI at several rank counts, then the examples.

Usage: python tests/run_mpi.py [--ranks 1 2 3 4] [--timeout 900] [--no-examples] [--no-tests] [pytest args...]

Each count runs ``mpiexec -n N python -m mpi4py -m pytest tests`` under a
timeout (``-m mpi4py`` aborts every rank when one dies). Each script in
examples/ then runs at the largest count and must exit 0 (they check their own
results; one whose docstring says "requires: torch" is skipped where torch does
not import). The last line totals all runs.
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def mpiexec_cmd():
    exe = os.environ.get("MPIEXEC") or shutil.which("mpiexec") or shutil.which("mpirun")
    if exe is None:
        sys.exit("no mpiexec found: pip install mpich (or set MPIEXEC)")
    extra = ["--allow-run-as-root"] if "open" in subprocess.run(
        [exe, "--version"], capture_output=True, text=True).stdout.lower() and os.geteuid() == 0 else []
    return [exe, *extra]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--no-examples", action="store_true")
    ap.add_argument("--no-tests", action="store_true")
    args, pytest_args = ap.parse_known_args()
    totals = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    rc = 0
    for n in [] if args.no_tests else args.ranks:
        cmd = [*mpiexec_cmd(), "-n", str(n), sys.executable, "-m", "mpi4py", "-m", "pytest",
               HERE, "-q", *pytest_args]
        print(f"== {n} rank(s): {' '.join(cmd)}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            summary_path = os.path.join(tmp, "summary.json")
            env = dict(os.environ, CUPYEP_TEST_SUMMARY=summary_path)
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
                out, code = p.stdout + p.stderr, p.returncode
            except subprocess.TimeoutExpired as e:
                out, code = (e.stdout or b"").decode(errors="replace"), 124
                out += f"\nTIMEOUT after {args.timeout} s at {n} ranks\n"
            print(out, flush=True)
            # Rank 0's counts (the ranks' printed summaries interleave).
            summary = None
            if os.path.exists(summary_path):
                with open(summary_path) as f:
                    summary = json.load(f)
                for what in totals:
                    totals[what] += summary.get(what, 0)
        if code not in (0, 5):
            rc = 1
            totals["failed"] += 0 if summary else 1
    examples = [] if args.no_examples else sorted(glob.glob(os.path.join(HERE, "..", "examples", "*.py")))
    has_torch = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True).returncode == 0
    for path in examples:
        with open(path) as f:
            needs_torch = "requires: torch" in f.read(2000)
        if needs_torch and not has_torch:
            print(f"== example {os.path.basename(path)}: skipped (needs torch)", flush=True)
            totals["skipped"] += 1
            continue
        n = max(args.ranks)
        cmd = [*mpiexec_cmd(), "-n", str(n), sys.executable, "-m", "mpi4py", path]
        print(f"== example at {n} rank(s): {' '.join(cmd)}", flush=True)
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            out, code = p.stdout + p.stderr, p.returncode
        except subprocess.TimeoutExpired:
            out, code = f"TIMEOUT after {args.timeout} s", 124
        print(out, flush=True)
        if code == 0:
            totals["passed"] += 1
        else:
            totals["failed"] += 1
            rc = 1
    print(f"{totals['passed']} passed, {totals['failed'] + totals['error']} failed, "
          f"{totals['skipped']} skipped")
    return rc


if __name__ == "__main__":
    sys.exit(main())
