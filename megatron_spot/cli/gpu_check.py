"""GPU acceptance in one command: install the carried wheels, build the CUDA extension, run the GPU
tests, benchmark the fused ops, train a tiny Qwen3-MoE with grouped experts against the CPU and profile
the largest Qwen3 that fits, on one NVIDIA GPU.

  python3 tools/gpu_check.py --out gpu_results            # on the GPU machine (`make gpu-check`)
  python tools/gpu_check.py --dry-run --out /tmp/dry      # on a CPU machine, tiny sizes (`make gpu-check DRY_RUN=1`)
  python tools/gpu_check.py --download-wheels .gpu-wheels # with a package registry (`make gpu-wheels`)
  python tools/gpu_check.py --to-benchmarks gpu_results/gpu_results.json   # GPU results -> BENCHMARKS.md

`spot-gpu-check` is the same command where the package is installed (editable, from a checkout: the
check builds csrc/ and runs tests/ of that checkout). Steps (each a child process with its own time
limit, so a crash, hang or failure of one is recorded and the next still runs): wheels, build, pytest,
bench-ops, moe, profile. Results: OUT/gpu_results.json, OUT/summary.md (also printed) and
OUT/logs/<step>.log. The parent uses only the standard library (megatron_spot/gpu_check/): it must
start on a machine where nothing but the GPU image's packages is installed.
Exit code: 0 when no step failed, 1 otherwise, 2 bad usage.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_spot.cli import BAD_INPUT
from megatron_spot.cli.args import positive_float
from megatron_spot.gpu_check.orchestrate import orchestrate
from megatron_spot.gpu_check.plan import DEFAULT_BUDGET_S, INJECT_ENV, ROOT, STEPS, checkout_problem
from megatron_spot.gpu_check.report import write_benchmarks_section
from megatron_spot.gpu_check.wheels import download_wheels, missing_wheels
from megatron_spot.utils.output_paths import OutputPathError, check_output_dir


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="Steps: " + ", ".join(f"{s.name} ({s.what})" for s in STEPS))
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_results",
                    help="results folder (default: $OUT if set, else gpu_results)")
    ap.add_argument("--dry-run", action="store_true", help="CPU machine: tiny sizes, no CUDA step")
    ap.add_argument("--wheels", default=None, help="folder of carried wheels (default .gpu-wheels; the dry run "
                                                    "builds a probe wheel instead unless this is given)")
    ap.add_argument("--budget-s", type=positive_float, default=DEFAULT_BUDGET_S,
                    help="seconds for all steps together, > 0")
    ap.add_argument("--only", default=None, help="comma-separated steps to run (default: all)")
    ap.add_argument("--inject-failure", default=None, metavar="STEP[,STEP]",
                    help=f"make these steps fail (STEP) or hang (STEP:hang) on purpose to test the guards; "
                         f"also ${INJECT_ENV}")
    ap.add_argument("--download-wheels", default=None, metavar="DIR", help="fetch the wheels into DIR and exit")
    ap.add_argument("--to-benchmarks", default=None, metavar="RESULTS_JSON",
                    help="write a GPU run's gpu_results.json into BENCHMARKS.md (its gpu section) and exit")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--params", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:  # only a child imports the steps (and through them torch and megatron-core)
        from megatron_spot.gpu_check.steps import child_main

        return child_main(args.child, json.loads(args.params), args.result)
    if args.download_wheels:
        return download_wheels(args.download_wheels)
    if args.to_benchmarks:
        return write_benchmarks_section(args.to_benchmarks)
    try:  # the results folder before any step runs (stdlib only, like the rest of the parent)
        check_output_dir(args.out, "--out")
    except OutputPathError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return BAD_INPUT
    problem = checkout_problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return BAD_INPUT
    if not args.dry_run or args.wheels:  # the real wheels (the dry run's probe wheel is made on the spot)
        folder = os.path.abspath(args.wheels or os.path.join(ROOT, ".gpu-wheels"))
        missing = missing_wheels(folder)
        if missing:
            print(f"error: {folder}: no wheel for {', '.join(missing)}, which this machine lacks; run `make gpu-wheels` "
                  "where the package registry is reachable and carry .gpu-wheels/ (git-ignored) with the checkout",
                  file=sys.stderr)
            return BAD_INPUT
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
