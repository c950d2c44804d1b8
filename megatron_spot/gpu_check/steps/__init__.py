"""The step children of the GPU check, one module per step (install_wheels, build, run_pytest,
bench_ops, moe, profile; common holds what several share), each step run in its own process by
`python -m megatron_spot.cli.gpu_check --child STEP` (orchestrate.run_child). torch, megatron-core
and the rest of the package are imported inside the step functions: the wheels step runs before
megatron-core is installed, and the parent imports none of this package."""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

from megatron_spot.gpu_check.plan import INJECT_ENV
from megatron_spot.gpu_check.steps.bench_ops import child_bench_ops
from megatron_spot.gpu_check.steps.build import child_build
from megatron_spot.gpu_check.steps.install_wheels import child_wheels
from megatron_spot.gpu_check.steps.moe import child_moe
from megatron_spot.gpu_check.steps.profile import child_profile, child_profile_run
from megatron_spot.gpu_check.steps.run_pytest import child_pytest


def _loaded_distributions() -> list[str]:
    import importlib.metadata as md

    dists = md.packages_distributions()
    return sorted({d for m in list(sys.modules) for d in dists.get(m.split(".")[0], [])})


CHILDREN = {"wheels": child_wheels, "build": child_build, "pytest": child_pytest, "bench-ops": child_bench_ops,
            "moe": child_moe, "profile": child_profile, "profile-run": child_profile_run}


def child_main(step: str, params, result_path: str) -> int:
    """Runs inside the child process; always writes a result file unless killed."""
    rec = {"step": step}
    code = 0
    try:
        injected = os.environ.get(INJECT_ENV, "").split(",")
        if f"{step}:hang" in injected:  # stands in for a deadlocked collective: the parent's limit must end it
            print(f"injected hang in step {step!r} ({INJECT_ENV})", flush=True)
            time.sleep(3600)
        if step in injected:
            raise RuntimeError(f"injected failure in step {step!r} ({INJECT_ENV})")
        out = CHILDREN[step](params)
        status = out.pop("status", "ok")
        rec.update(status=status, result=out)
        for k in ("reason", "error"):
            if k in out:
                rec[k] = out.pop(k)
        if status == "failed":
            code = 1
    except BaseException as exc:  # the parent records every failure and carries on with the next step
        traceback.print_exc()
        rec.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        code = 1
    rec["imports"] = _loaded_distributions()
    with open(result_path, "w") as f:
        json.dump(rec, f, indent=1, default=str)
    return code
