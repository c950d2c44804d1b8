"""The parent process of the GPU check: runs each step in its own child process with its own time
limit, so a crash, hang or failure of one is recorded and the next still runs; writes
gpu_results.json and summary.md. Standard library only: it starts on a GPU machine that has nothing
but its image's packages (the dry run's machine-site builder also reads `packaging`, which a Python
with pip always has, and runs on the CPU machine only)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time

from megatron_spot.gpu_check.plan import (CHILD_MODULE, GPU_MACHINE_PACKAGES, INJECT_ENV, ROOT, SIMULATE_ENV, STEP_NAMES,
                                          STEPS, WHEELS)
from megatron_spot.gpu_check.report import first_line, render_summary
from megatron_spot.gpu_check.wheels import make_probe_wheel


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _git_commit() -> str | None:
    """The checkout's commit; a copy without .git (a GPU machine sent only the work tree) reports
    $GPU_CHECK_COMMIT, which the launching command can set to the hash it sent."""
    try:
        out = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("GPU_CHECK_COMMIT") or None


def kill_group(proc: subprocess.Popen) -> None:
    """The child runs in its own session; kill it and whatever it started (torch spawn, nvcc)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def child_command(env, step: str, params, result_path: str) -> list[str]:
    """`python -m megatron_spot.cli.gpu_check --child STEP ...`; in the dry run without site-packages
    (see build_machine_site). The package is found through PYTHONPATH (the checkout goes first)."""
    python = [sys.executable, "-S"] if env.get(SIMULATE_ENV) else [sys.executable]
    return [*python, "-m", CHILD_MODULE, "--child", step, "--params", json.dumps(params), "--result", result_path]


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def run_child(step: str, params: dict, env: dict, timeout_s: float, out_dir: str) -> dict:
    """Run one step in its child process with a hard time limit; the step's record for the report."""
    log_path = os.path.join(out_dir, "logs", f"{step}.log")
    result_path = os.path.join(out_dir, "logs", f"{step}.result.json")
    if os.path.exists(result_path):
        os.remove(result_path)
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(child_command(env, step, params, result_path), stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout_s))
            timed_out = False
        except subprocess.TimeoutExpired:
            kill_group(proc)
            proc.wait()
            rc, timed_out = None, True
    seconds = time.monotonic() - t0
    rec = {"name": step, "seconds": round(seconds, 1), "log": os.path.relpath(log_path, out_dir)}
    child = None
    if os.path.exists(result_path):
        with open(result_path) as f:
            child = json.load(f)
    if timed_out:
        rec.update(status="timeout", error=f"killed after its {timeout_s:.0f} s limit")
        if child:
            rec["result"] = child.get("result")
        return rec
    if child is None:
        rec.update(status="failed", error=f"exit code {rc}, no result written; last log lines:\n" + _tail(log_path))
        return rec
    rec["status"] = child["status"] if rc == 0 or child["status"] == "failed" else "failed"
    for k in ("result", "reason", "error", "imports"):
        if child.get(k) is not None:
            rec[k] = child[k]
    if rc != 0 and "error" not in rec:
        rec["error"] = f"exit code {rc}; last log lines:\n" + _tail(log_path)
    return rec


def _requirement_closure(names) -> set[str]:
    """Normalised names of `names` and everything they require (markers evaluated, no extras)."""
    import importlib.metadata as md

    from packaging.requirements import Requirement  # dry run only (the CPU machine's venv has it)

    def norm(n):
        return re.sub(r"[-_.]+", "-", n).lower()

    seen, todo = set(), [norm(n) for n in names]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        try:
            reqs = md.requires(n) or []
        except md.PackageNotFoundError:
            continue
        for spec in reqs:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(norm(req.name))
    return seen


def build_machine_site(dest: str) -> list[str]:
    """Dry run: a folder holding only what the GPU machine has (its packages, what they require and the
    carried wheels), as links into this interpreter's site-packages. The children then run with
    `python -S` and this folder on PYTHONPATH, so a code path that needs anything else fails here
    instead of on the rare GPU machine."""
    import importlib.metadata as md

    # pip too: Python images ship it (without it the wheels step extracts the wheels itself)
    allowed = _requirement_closure(GPU_MACHINE_PACKAGES + tuple(d for d, _, _ in WHEELS)) | {"pip"}
    os.makedirs(dest, exist_ok=True)
    linked = []
    for dist in md.distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "").lower()
        if name not in allowed:
            continue
        base = str(dist.locate_file(""))
        tops = {str(f).split("/")[0] for f in (dist.files or []) if not str(f).startswith("..")}
        for top in tops:
            src, dst = os.path.join(base, top), os.path.join(dest, top)
            if os.path.exists(src) and not os.path.lexists(dst):
                os.symlink(src, dst)
        linked.append(name)
    return sorted(linked)


def _child_env(args, site: str) -> tuple[dict, str | None]:
    """The children's environment (and the dry run's machine-site folder, to remove afterwards)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, site] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    # the ninja binary of a carried wheel; then the interpreter's own scripts folder, where the GPU
    # image's preinstalled ninja lives (/opt/torch/.venv/bin) even when python3 is reached through a
    # link and that folder is not on PATH: torch's extension builder looks for `ninja` on PATH only
    env["PATH"] = os.pathsep.join([os.path.join(site, "bin"), sysconfig.get_path("scripts"), env.get("PATH", "")])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    machine_site = None
    if args.dry_run:
        machine_site = tempfile.mkdtemp(prefix="gpu_check_machine_")
        build_machine_site(machine_site)
        env[SIMULATE_ENV] = machine_site
        env["PYTHONPATH"] += os.pathsep + machine_site
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run never touches a GPU, even on a GPU machine
    if args.inject_failure:
        env[INJECT_ENV] = args.inject_failure
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # children start their own world of one
    return env, machine_site


def _step_limit(step, todo: list, i: int, remaining: float) -> float:
    """Keep the later steps' minimum, but an earlier step (a prerequisite) still gets its own."""
    reserve = sum(s.min_s for s in todo[i + 1:])
    return min(step.budget_s, max(remaining - reserve, step.min_s))


def orchestrate(args) -> int:
    out_dir = os.path.abspath(args.out)
    os.makedirs(os.path.join(out_dir, "logs"), exist_ok=True)
    machine_json = os.path.join(out_dir, "logs", "machine.json")
    if os.path.exists(machine_json):  # a previous run's machine must not be reported as this one's
        os.remove(machine_json)
    selected = STEP_NAMES if not args.only else tuple(args.only.split(","))
    unknown = [s for s in selected if s not in STEP_NAMES]
    if unknown:
        print(f"error: --only: unknown step(s) {', '.join(unknown)}; steps: {', '.join(STEP_NAMES)}", file=sys.stderr)
        return 2
    site = tempfile.mkdtemp(prefix="gpu_check_site_")
    probe = bool(args.dry_run and args.wheels is None)
    wheels_dir = os.path.abspath(args.wheels or os.path.join(ROOT, ".gpu-wheels"))
    if probe:  # the dry run's cp311 interpreter cannot install the cp312 wheels; a probe takes their path
        wheels_dir = tempfile.mkdtemp(prefix="gpu_check_probe_")
        make_probe_wheel(wheels_dir)
    env, machine_site = _child_env(args, site)

    report = {
        "tool": "tools/gpu_check.py", "dry_run": bool(args.dry_run), "started": _now(), "budget_s": args.budget_s,
        "git_commit": _git_commit(), "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "machine": {"hostname": platform.node(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "steps": [],
    }
    t_start = time.monotonic()
    base = {"dry_run": bool(args.dry_run), "out": out_dir, "site": site, "wheels": wheels_dir, "probe": probe}
    todo = [s for s in STEPS if s.name in selected]
    try:
        for i, step in enumerate(todo):
            remaining = args.budget_s - (time.monotonic() - t_start)
            limit = _step_limit(step, todo, i, remaining)
            print(f"== {step.name}: {step.what} (limit {max(0, min(limit, remaining)):.0f} s)", flush=True)
            if remaining < step.min_s:
                rec = {"name": step.name, "status": "skipped", "seconds": 0.0,
                       "reason": f"would not fit: {max(0, remaining):.0f} s of the {args.budget_s:.0f} s budget "
                                 f"left, this step needs >= {step.min_s:.0f} s"}
            else:
                limit = min(limit, remaining)
                rec = run_child(step.name, {**base, "limit_s": limit}, env, limit, out_dir)
            rec["what"] = step.what
            report["steps"].append(rec)
            if step.name == "wheels" and os.path.exists(machine_json):
                with open(machine_json) as f:
                    report["machine"].update(json.load(f))
            note = first_line(rec)
            print(f"   {rec['status']} in {rec['seconds']:.1f} s" + (f": {note}" if note else ""), flush=True)
    finally:
        shutil.rmtree(site, ignore_errors=True)
        if machine_site:
            shutil.rmtree(machine_site, ignore_errors=True)
        if probe:
            shutil.rmtree(wheels_dir, ignore_errors=True)
    report["finished"] = _now()
    report["wall_s"] = round(time.monotonic() - t_start, 1)
    report["ok"] = all(s["status"] in ("ok", "skipped") for s in report["steps"])
    with open(os.path.join(out_dir, "gpu_results.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    summary = render_summary(report)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(summary)
    print(summary)
    print(f"wrote {os.path.join(out_dir, 'gpu_results.json')} and summary.md")
    return 0 if report["ok"] else 1
