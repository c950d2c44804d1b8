"""The pytest step: `pytest -m gpu` over tests/gpu/ and every gpu-marked test elsewhere, interrupted
before the step's hard limit so the finished tests' results survive a hang."""
from __future__ import annotations

import os
import re
import signal
import subprocess

from megatron_spot.gpu_check.orchestrate import kill_group
from megatron_spot.gpu_check.plan import ROOT
from megatron_spot.gpu_check.steps.common import python_argv

# The GPU image carries pytest plugins (xdist, timeout, cov, benchmark, mock, hypothesis) that this
# project never installs; loading none of them keeps the GPU run's pytest the one the dry run tested.
PLUGIN_AUTOLOAD_ENV = "PYTEST_DISABLE_PLUGIN_AUTOLOAD"
# pytest is interrupted this long before the step's hard limit, and then has this long to write its results
PYTEST_INTERRUPT_AT_S = 20
PYTEST_INTERRUPT_GRACE_S = 15


def gpu_test_files() -> list[str]:
    """tests/gpu/ and every other test file that marks a test `gpu` (collecting all of tests/ would
    import test modules whose packages the GPU machine does not carry)."""
    files = [os.path.join("tests", "gpu")]
    for folder, _, names in os.walk(os.path.join(ROOT, "tests")):
        if os.path.basename(folder) == "gpu":
            continue
        for n in sorted(names):
            if n.startswith("test_") and n.endswith(".py"):
                path = os.path.join(folder, n)
                with open(path, errors="replace") as f:
                    if re.search(r"mark\.gpu\b", f.read()):
                        files.append(os.path.relpath(path, ROOT))
    return sorted(files)


def _junit_outcomes(junit: str) -> tuple[list[dict], dict]:
    """(one record per test case, counts per outcome) from pytest's junit XML."""
    import xml.etree.ElementTree as ET

    tests, counts = [], {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    if not os.path.exists(junit):
        return tests, counts
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('file') or case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (el.get("message") or (el.text or "")).strip().splitlines()[0] if (
                    el.get("message") or el.text) else ""
                break
        counts[outcome] += 1
        tests.append({"name": name, "outcome": outcome, "seconds": float(case.get("time") or 0), "message": message})
    return tests, counts


def _run_pytest(argv: list[str], deadline_s: float) -> tuple[int, bool]:
    """pytest in its own process group; at `deadline_s` it gets SIGINT, which ends it like Ctrl-C: the
    running test is interrupted and the junit XML of every test that finished is still written (the
    parent's hard kill at the step's limit would lose them all). Whatever the tests started (training
    children on the GPU) is killed with the group afterwards, so it cannot hold the GPU in later steps.
    Returns (exit code, interrupted)."""
    env = dict(os.environ, **{PLUGIN_AUTOLOAD_ENV: "1"})
    proc = subprocess.Popen([*python_argv(), "-m", "pytest", *argv], cwd=ROOT, env=env, start_new_session=True)
    interrupted = False
    try:
        code = proc.wait(timeout=max(1.0, deadline_s))
    except subprocess.TimeoutExpired:
        interrupted = True
        os.kill(proc.pid, signal.SIGINT)
        try:
            code = proc.wait(timeout=PYTEST_INTERRUPT_GRACE_S)
        except subprocess.TimeoutExpired:  # stuck inside a CUDA call that SIGINT cannot interrupt
            kill_group(proc)
            code = proc.wait()
    kill_group(proc)  # stragglers of a finished pytest too
    return code, interrupted


def child_pytest(p: dict) -> dict:
    files = gpu_test_files()
    junit = os.path.join(p["out"], "logs", "pytest_gpu.xml")
    if os.path.exists(junit):  # a previous run's results must not be read as this one's
        os.remove(junit)
    argv = ["-m", "gpu", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors", "--junitxml", junit,
            "-o", "junit_family=xunit1", *files]
    deadline = p["limit_s"] - PYTEST_INTERRUPT_AT_S
    print(f"+ {PLUGIN_AUTOLOAD_ENV}=1 pytest " + " ".join(argv) + f"  (interrupted after {deadline:.0f} s)", flush=True)
    code, interrupted = _run_pytest(argv, deadline)
    tests, counts = _junit_outcomes(junit)
    # 0 all passed, 5 nothing selected: both fine when nothing failed; anything else is a failure
    status = "ok" if code in (0, 5) and counts["failed"] == counts["error"] == 0 and not interrupted else "failed"
    res = {"status": status, "exit_code": code, "files": files, "counts": counts, "tests": tests}
    if interrupted:
        res["error"] = (f"pytest interrupted at its {deadline:.0f} s deadline (a test hung or ran long; the log's "
                        f"KeyboardInterrupt line names it): {counts['passed']} passed, {counts['failed']} failed "
                        f"before that")
    elif status == "failed":
        res["error"] = f"pytest exit code {code}: {counts['failed']} failed, {counts['error']} errors (see the table)"
    return res
