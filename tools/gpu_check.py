#!/usr/bin/env python
"""GPU acceptance in one command: install the carried wheels, build the CUDA extension, run the GPU
tests, benchmark the fused ops and profile the largest Qwen3 that fits, on one NVIDIA GPU.

  python tools/gpu_check.py --out gpu_results            # on the GPU machine (`make gpu-check`)
  python tools/gpu_check.py --dry-run --out /tmp/dry      # on a CPU machine, tiny sizes (`make gpu-check DRY_RUN=1`)
  python tools/gpu_check.py --download-wheels .gpu-wheels # with a package registry (`make gpu-wheels`)
  python tools/gpu_check.py --to-benchmarks gpu_results/gpu_results.json   # GPU results -> BENCHMARKS.md

Steps (each a child process of this script with its own time limit, so a crash, hang or failure of
one is recorded and the next still runs): wheels, build, pytest, bench-ops, profile. Results:
OUT/gpu_results.json, OUT/summary.md (also printed) and OUT/logs/<step>.log.
The parent process uses only the standard library: it must start on a machine where nothing but
the GPU image's packages is installed. Exit code: 0 when no step failed, 1 otherwise, 2 bad usage.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2**30

# What the GPU machine lacks and the checked code paths import (megatron-core's undeclared psutil
# import included), plus ninja so the extension compiles in parallel. (distribution, version, module).
WHEELS = (
    ("megatron-core", "0.19.2", "megatron.core"),
    ("psutil", "7.2.2", "psutil"),
    ("ninja", "1.13.2", "ninja"),
)
# Preinstalled on the GPU machine (with whatever they require), per the acceptance issue.
GPU_MACHINE_PACKAGES = ("torch", "triton", "transformers", "safetensors", "tokenizers", "numpy", "pytest",
                        "pyyaml", "matplotlib")
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
WHEEL_PYTHON = "3.12"
WHEELS_BUDGET_BYTES = 40 * 10**6
INJECT_ENV = "GPU_CHECK_INJECT_FAILURE"  # comma-separated step names whose child fails on purpose
SIMULATE_ENV = "GPU_CHECK_MACHINE_SITE"  # dry run: the folder that stands in for the GPU machine's packages

# Fused-op benchmark shapes (the acceptance issue) and the dry-run stand-ins.
BENCH_GPU = {"tokens": [4096, 16384], "vocab": 151_936, "hidden": 2048, "reps": 3}
BENCH_DRY = {"tokens": [128, 512], "vocab": 2048, "hidden": 64, "reps": 2}
# Profiling: largest preset first; the first one predicted to fit memory and time is run.
PROFILE_GPU = {"candidates": ["qwen3-8b", "qwen3-4b", "qwen3-1.7b", "qwen3-0.6b"], "seq_length": 4096,
               "micro_batch_size": 1, "num_micro_batches": 2, "steps": 3, "warmup_steps": 1,
               "precision": "bf16", "recompute": "selective", "assumed_mfu": 0.3}
PROFILE_DRY = {"candidates": ["qwen3-tiny"], "seq_length": 64, "micro_batch_size": 1, "num_micro_batches": 2,
               "steps": 2, "warmup_steps": 1, "precision": "fp32", "recompute": "selective", "assumed_mfu": 0.3}


class Step:
    """One guarded stage: `budget_s` caps its run, `min_s` is what it needs to be worth starting."""

    def __init__(self, name: str, budget_s: float, min_s: float, what: str):
        self.name, self.budget_s, self.min_s, self.what = name, budget_s, min_s, what


STEPS = (
    Step("wheels", 120, 5, "install the carried wheels into a private folder (never the machine's torch)"),
    Step("build", 200, 30, "build megatron_spot._C with CUDA (MEGATRON_SPOT_EXT=cuda, sm_90)"),
    Step("pytest", 220, 30, "pytest -m gpu: tests/gpu/ and every gpu-marked test elsewhere"),
    Step("bench-ops", 90, 15, "fused log-prob op vs naive and Megatron-Core on the GPU"),
    Step("profile", 150, 40, "tools/profile_throughput.py on the largest Qwen3 preset that fits"),
)
STEP_NAMES = tuple(s.name for s in STEPS)
DEFAULT_BUDGET_S = 450  # the issue: well inside 8 minutes on an H100-class GPU


# ---------------------------------------------------------------------------------------------
# parent: orchestration (standard library only)
# ---------------------------------------------------------------------------------------------

def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _wheel_files(folder: str) -> dict[str, str]:
    """Normalised distribution name -> wheel path for the pinned WHEELS found in `folder`."""
    found = {}
    if not os.path.isdir(folder):
        return found
    for dist, version, _ in WHEELS:
        stem = dist.replace("-", "_").lower()
        for f in sorted(os.listdir(folder)):
            parts = f.lower().split("-")
            if f.endswith(".whl") and len(parts) > 2 and parts[0] == stem and parts[1] == version:
                found[dist] = os.path.join(folder, f)
    return found


def download_wheels(dest: str) -> int:
    """`make gpu-wheels`: fetch the cp312 manylinux wheels of WHEELS (no dependencies) into `dest`."""
    os.makedirs(dest, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--python-version", WHEEL_PYTHON,
           "--implementation", "cp", "--no-deps", "-d", dest, "-q"]
    for p in WHEEL_PLATFORMS:
        cmd += ["--platform", p]
    cmd += [f"{d}=={v}" for d, v, _ in WHEELS]
    print("+ " + " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        print("error: pip download failed (see above)", file=sys.stderr)
        return 1
    files = _wheel_files(dest)
    missing = [d for d, _, _ in WHEELS if d not in files]
    if missing:
        print(f"error: {dest}: no wheel for {', '.join(missing)} after download", file=sys.stderr)
        return 1
    total = sum(os.path.getsize(p) for p in files.values())
    for d, p in files.items():
        print(f"  {os.path.basename(p)}  {os.path.getsize(p) / 1e6:.2f} MB")
    print(f"{dest}: {len(files)} wheels, {total / 1e6:.2f} MB in all (budget {WHEELS_BUDGET_BYTES / 1e6:.0f} MB)")
    if total > WHEELS_BUDGET_BYTES:
        print(f"error: {dest}: {total / 1e6:.1f} MB exceeds the {WHEELS_BUDGET_BYTES / 1e6:.0f} MB budget",
              file=sys.stderr)
        return 1
    return 0


def make_probe_wheel(folder: str) -> str:
    """A tiny pure-Python wheel: the dry run installs it through the same path as the real wheels."""
    os.makedirs(folder, exist_ok=True)
    name = "gpu_check_probe-1.0-py3-none-any.whl"
    path = os.path.join(folder, name)
    files = {
        "gpu_check_probe/__init__.py": "ANSWER = 42\n",
        "gpu_check_probe-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: gpu-check-probe\nVersion: 1.0\n",
        "gpu_check_probe-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: gpu_check\nRoot-Is-Purelib: true\n"
                                                "Tag: py3-none-any\n",
    }
    record = "".join(f"{k},,\n" for k in files) + "gpu_check_probe-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
        z.writestr("gpu_check_probe-1.0.dist-info/RECORD", record)
    return path


def _kill_group(proc: subprocess.Popen) -> None:
    """The child runs in its own session; kill it and whatever it started (torch spawn, nvcc)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _python(env) -> list[str]:
    """The interpreter for a child; in the dry run without site-packages (see build_machine_site)."""
    return [sys.executable, "-S"] if env.get(SIMULATE_ENV) else [sys.executable]


def run_child(step: str, params: dict, env: dict, timeout_s: float, out_dir: str) -> dict:
    """Run one step in `python tools/gpu_check.py --child STEP` with a hard time limit."""
    log_path = os.path.join(out_dir, "logs", f"{step}.log")
    result_path = os.path.join(out_dir, "logs", f"{step}.result.json")
    if os.path.exists(result_path):
        os.remove(result_path)
    cmd = [*_python(env), os.path.abspath(__file__), "--child", step, "--params", json.dumps(params),
           "--result", result_path]
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout_s))
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
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


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def orchestrate(args) -> int:
    out_dir = os.path.abspath(args.out)
    os.makedirs(os.path.join(out_dir, "logs"), exist_ok=True)
    for stale in ("machine.json",):  # a previous run's machine must not be reported as this one's
        if os.path.exists(os.path.join(out_dir, "logs", stale)):
            os.remove(os.path.join(out_dir, "logs", stale))
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
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, site] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PATH"] = os.path.join(site, "bin") + os.pathsep + env.get("PATH", "")  # the ninja binary
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
            # keep the later steps' minimum, but an earlier step (a prerequisite) still gets its own
            reserve = sum(s.min_s for s in todo[i + 1:])
            limit = min(step.budget_s, max(remaining - reserve, step.min_s))
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
            machine_json = os.path.join(out_dir, "logs", "machine.json")
            if step.name == "wheels" and os.path.exists(machine_json):
                with open(machine_json) as f:
                    report["machine"].update(json.load(f))
            print(f"   {rec['status']} in {rec['seconds']:.1f} s" + (f": {_first_line(rec)}" if _first_line(rec)
                                                                     else ""), flush=True)
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


def _first_line(rec: dict) -> str:
    text = rec.get("error") or rec.get("reason") or ""
    return text.strip().splitlines()[0][:200] if text.strip() else ""


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------

def _fmt(x, spec=".3g", missing="-"):
    return missing if x is None else format(x, spec)


def render_summary(report: dict) -> str:
    m = report["machine"]
    mode = "DRY RUN on CPU (tiny sizes; no CUDA step ran)" if report["dry_run"] else "GPU run"
    lines = [
        f"# GPU check: {'PASSED' if report['ok'] else 'FAILED'} ({mode})", "",
        f"- machine: {m.get('gpu_name') or 'no GPU'}"
        + (f" ({m['gpu_memory_gib']:.0f} GiB, sm_{m['capability']})" if m.get("gpu_memory_gib") else "")
        + f", {m.get('cpus')} CPUs, Python {m.get('python')}, torch {m.get('torch', '?')}"
        + (f" (CUDA {m['torch_cuda']})" if m.get("torch_cuda") else "")
        + (f", Transformer Engine {m['transformer_engine']}" if m.get("transformer_engine") else
           ", no Transformer Engine"),
        f"- started {report['started']}, {report['wall_s']:.0f} s of a {report['budget_s']:.0f} s budget, "
        f"commit {(report.get('git_commit') or '?')[:12]}",
        f"- command: `{report['command']}`", "",
        "| step | status | seconds | note |", "|---|---|---|---|",
    ]
    for s in report["steps"]:
        note = _first_line(s).replace("|", "/")
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {note} |")
    for s in report["steps"]:
        r = s.get("result") or {}
        if s["name"] == "wheels" and r:
            lines += ["", "## wheels", ""]
            for w in r.get("wheels", []):
                lines.append(f"- {w['dist']}: {w['action']}")
        if s["name"] == "build" and r:
            lines += ["", "## build", "", f"- `{r.get('command', '')}`"]
            if r.get("ops_backend_on_cuda"):
                lines.append(f"- megatron_spot.ops backend for CUDA tensors: {r['ops_backend_on_cuda']}")
        if s["name"] == "pytest" and r:
            lines += _pytest_section(r)
        if s["name"] == "bench-ops" and r:
            lines += _bench_section(r)
        if s["name"] == "profile" and r:
            lines += _profile_section(r)
    return "\n".join(lines) + "\n"


def _pytest_section(r: dict) -> list[str]:
    c = r.get("counts", {})
    out = ["", "## pytest -m gpu", "",
           f"{c.get('passed', 0)} passed, {c.get('failed', 0)} failed, {c.get('error', 0)} errors, "
           f"{c.get('skipped', 0)} skipped ({len(r.get('files', []))} files; exit code {r.get('exit_code')})", ""]
    bad = [t for t in r.get("tests", []) if t["outcome"] in ("failed", "error")]
    skipped = {}
    for t in r.get("tests", []):
        if t["outcome"] == "skipped":
            skipped.setdefault(t.get("message", "")[:160], []).append(t["name"])
    if bad:
        out += ["| failed test | error |", "|---|---|"]
        out += [f"| {t['name']} | {t.get('message', '')[:300].replace('|', '/')} |" for t in bad]
        out.append("")
    for why, names in skipped.items():
        out.append(f"- skipped x{len(names)}: {why}")
    return out


def _bench_section(r: dict) -> list[str]:
    out = ["", "## fused log-prob op (forward + backward)", "",
           f"{r['device']}; copy bandwidth measured {r['copy_bandwidth_gbs']:.0f} GB/s; time = best of "
           f"{r['reps']} ({r['timer']}); peak extra = "
           + (f"{r['memory_source']} minus the memory with the logits allocated" if r["memory_source"] != "n/a on CPU"
              else "not measured on CPU")
           + "; predicted = bytes moved / measured copy bandwidth (model of benchmarks/bench_ops.py).", "",
           "| tokens x vocab | dtype | implementation | time (ms) | predicted (ms) | bytes moved (GiB, model) "
           "| peak extra (GiB) | extra / logits | max abs diff vs fp64 |", "|---|---|---|---|---|---|---|---|---|"]
    for c in r["cases"]:
        if "error" in c:
            out.append(f"| {c['tokens']} x {c['vocab']} | {c['dtype']} | {c['impl']} | error: "
                       f"{c['error'][:120]} | | | | | |")
            continue
        impl = c["impl"] + (f" ({c['backend']} implementation)" if c.get("backend") else "")
        out.append(f"| {c['tokens']} x {c['vocab']} | {c['dtype']} | {impl} | {c['time_s'] * 1e3:.2f} | "
                   f"{_fmt(c.get('predicted_s') and c['predicted_s'] * 1e3, '.2f')} | "
                   f"{_fmt(c.get('bytes_moved') and c['bytes_moved'] / GiB, '.2f')} | "
                   f"{_fmt(c.get('peak_extra_bytes') and c['peak_extra_bytes'] / GiB, '.3f', 'n/a')} | "
                   f"{_fmt(c.get('peak_extra_bytes') and c['peak_extra_bytes'] / c['logits_bytes'], '.3f', 'n/a')} | "
                   f"{_fmt(c.get('max_abs_diff'), '.2e')} |")
    if r.get("linear_head"):
        out += ["", r["linear_head"]["note"], ""]
        if r["linear_head"].get("cases"):
            out += ["| tokens x hidden x vocab | dtype | implementation | time (ms) | peak extra (GiB) |",
                    "|---|---|---|---|---|"]
            for c in r["linear_head"]["cases"]:
                if "error" in c:
                    out.append(f"| {c['tokens']} | {c['dtype']} | {c['impl']} | error: {c['error'][:120]} | |")
                else:
                    out.append(f"| {c['tokens']} x {c['hidden']} x {c['vocab']} | {c['dtype']} | {c['impl']} | "
                               f"{c['time_s'] * 1e3:.2f} | "
                               f"{_fmt(c.get('peak_extra_bytes') and c['peak_extra_bytes'] / GiB, '.3f', 'n/a')} |")
    return out


def _profile_section(r: dict) -> list[str]:
    out = ["", "## training throughput (tools/profile_throughput.py)", "",
           f"- preset {r['preset']} ({'; '.join(r.get('selection', []))})",
           f"- command: `{r.get('command', '')}`"]
    p = r.get("report")
    if p:
        mem = p["peak_memory_bytes"]
        fl = p["flops_per_step"]
        out += [
            f"- {p['tokens_per_s']:,.0f} tokens/s, {p['tflops_per_device']:.1f} model TFLOP/s, MFU "
            f"{_fmt(p.get('mfu') and 100 * p['mfu'], '.1f')}% vs {p.get('peak_source')}, {p['step_time_s']:.3f} s/step",
            f"- peak memory: measured {mem['measured'] / GiB:.2f} GiB, predicted {mem['predicted'] / GiB:.2f} GiB "
            f"({mem.get('measured_by', '')})",
            f"- FLOPs/step: measured {_fmt(fl.get('measured'), '.4e')}, predicted {_fmt(fl.get('predicted'), '.4e')}",
            f"- predicted at {100 * r['assumed_mfu']:.0f}% MFU: {_fmt(r.get('predicted_step_s'), '.3f')} s/step, "
            f"{_fmt(r.get('predicted_tokens_per_s'), ',.0f')} tokens/s",
        ]
    return out


def write_benchmarks_section(results_json: str, path: str = os.path.join(ROOT, "BENCHMARKS.md")) -> int:
    """Put a GPU run's summary into BENCHMARKS.md as its `gpu` section (replaced on each write), with
    the GPU machine's own description: run here after the results folder came back."""
    with open(results_json) as f:
        report = json.load(f)
    if report.get("dry_run"):
        print(f"error: {results_json} is a dry run on a CPU; BENCHMARKS.md takes GPU runs only", file=sys.stderr)
        return 2
    m = report["machine"]
    body = render_summary(report).split("\n", 1)[1].strip()  # without the summary's own title
    text = (f"<!-- bench:gpu -->\n## GPU acceptance run (tools/gpu_check.py): "
            f"{'passed' if report['ok'] else 'FAILED steps listed below'}\n\n"
            f"Command: `make gpu-check` ({report['command']})  \nMachine: {m.get('gpu_name', '?')}, "
            f"{m.get('cpus')} CPU cores, torch {m.get('torch', '?')}, Python {m.get('python')}  \n"
            f"Run: {report['started']}\n\n{body}\n<!-- /bench:gpu -->\n")
    old = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    pattern = re.compile(r"<!-- bench:gpu -->.*?<!-- /bench:gpu -->\n", re.S)
    new = pattern.sub(lambda _m: text, old) if pattern.search(old) else old.rstrip() + "\n\n" + text
    with open(path + ".tmp", "w") as f:
        f.write(new)
    os.replace(path + ".tmp", path)
    print(f"wrote the gpu section of {path}")
    return 0


# ---------------------------------------------------------------------------------------------
# children: one function per step, run in `--child STEP`
# ---------------------------------------------------------------------------------------------

def _requirement_closure(names) -> set[str]:
    """Normalised names of `names` and everything they require (markers evaluated, no extras)."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

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


def _loaded_distributions() -> list[str]:
    import importlib.metadata as md

    dists = md.packages_distributions()
    return sorted({d for m in list(sys.modules) for d in dists.get(m.split(".")[0], [])})


def child_wheels(p: dict) -> dict:
    """Install the carried wheels the machine does not already have into the private site folder."""
    import importlib
    import importlib.metadata as md
    import importlib.util

    machine = _machine_info()
    with open(os.path.join(p["out"], "logs", "machine.json"), "w") as f:  # kept even if an install fails
        json.dump(machine, f)
    if p["probe"]:
        wanted = [("gpu-check-probe", "1.0", "gpu_check_probe")]
        files = {"gpu-check-probe": os.path.join(p["wheels"], "gpu_check_probe-1.0-py3-none-any.whl")}
    else:
        wanted = list(WHEELS)
        files = _wheel_files(p["wheels"])
    actions, to_install = [], []
    for dist, version, module in wanted:
        try:
            have = md.version(dist)
            actions.append({"dist": dist, "action": f"already installed ({have}); the machine's copy is used"})
            continue
        except md.PackageNotFoundError:
            pass
        if dist not in files:
            raise RuntimeError(f"{p['wheels']}: no wheel for {dist}=={version}, which this machine lacks; "
                               "run `make gpu-wheels` on a machine with the registry first")
        to_install.append((dist, version, module))
        actions.append({"dist": dist, "action": f"installed {os.path.basename(files[dist])}"})
    if to_install and importlib.util.find_spec("pip") is not None:
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", p["wheels"], "--target",
               p["site"], "--no-deps", "--no-compile", "-q", *[f"{d}=={v}" for d, v, _ in to_install]]
        print("+ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    elif to_install:  # no pip on the machine: a wheel is a zip laid out for site-packages
        for dist, _, _ in to_install:
            print(f"no pip: extracting {os.path.basename(files[dist])}", flush=True)
            extract_wheel(files[dist], p["site"])
    importlib.invalidate_caches()
    for dist, _, module in wanted:
        importlib.import_module(module)  # raises with the module's own error if a wheel is broken
    return {"wheels": actions, "site": p["site"], "machine": machine}


def extract_wheel(wheel: str, target: str) -> None:
    """Install a wheel without pip: its files into `target`, `*.data/{purelib,platlib}` merged in,
    `*.data/scripts` into target/bin (executable), as pip --target does for the pinned wheels (ninja
    ships its binary as such a script; none of them needs a generated console-script wrapper)."""
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            if parts[0].endswith(".data") and len(parts) > 2:
                kind, rest = parts[1], parts[2:]
                dest = os.path.join(target, "bin", *rest) if kind == "scripts" else os.path.join(target, *rest)
            else:
                dest = os.path.join(target, *parts)
            if info.is_dir():
                os.makedirs(dest, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with z.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
            mode = (info.external_attr >> 16) & 0o777
            if "/bin/" in dest:  # executables (ninja) may come without mode bits from some zip writers
                mode |= 0o755
            if mode:
                os.chmod(dest, mode)


def _machine_info() -> dict:
    import torch

    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu_name=props.name, gpu_memory_gib=props.total_memory / GiB,
                    capability=f"{props.major}{props.minor}", gpu_count=torch.cuda.device_count())
    try:
        import transformer_engine

        info["transformer_engine"] = getattr(transformer_engine, "__version__", "installed")
    except Exception:
        info["transformer_engine"] = None
    sys.path.insert(0, os.path.join(ROOT, "csrc"))
    try:
        from build_ext_config import find_cuda_home

        info["cuda_home"] = find_cuda_home()
    finally:
        sys.path.pop(0)
    return info


def child_build(p: dict) -> dict:
    """Build the CUDA extension in place against this machine's torch."""
    cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
    if p["dry_run"]:
        return {"status": "skipped", "command": f"MEGATRON_SPOT_EXT=cuda TORCH_CUDA_ARCH_LIST=9.0 {' '.join(cmd)}",
                "reason": "dry run: the CUDA build needs the GPU machine's CUDA torch and toolkit; the ops use the "
                          "extension already built here"}
    import torch

    # this GPU's own architecture only (sm_90 on H100/H200): one target compiles fastest
    arch = "{}.{}".format(*torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else "9.0"
    env = dict(os.environ, MEGATRON_SPOT_EXT="cuda", TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", arch),
               MAX_JOBS=str(os.cpu_count() or 4))
    shown = f"MEGATRON_SPOT_EXT=cuda TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']} {' '.join(cmd)}"
    sys.path.insert(0, os.path.join(ROOT, "csrc"))
    try:
        from build_ext_config import find_cuda_home
    finally:
        sys.path.pop(0)
    if not os.environ.get("CUDA_HOME") and find_cuda_home() is None:
        raise RuntimeError("no CUDA toolkit (include/cuda_runtime.h + bin/nvcc) on this machine: the CUDA kernels "
                           "cannot be built and the ops fall back to the PyTorch reference; set CUDA_HOME if one exists")
    print("+ " + shown, flush=True)
    build = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(build.stdout, flush=True)
    if build.returncode != 0:
        errors = [line for line in build.stdout.splitlines() if "error" in line.lower()]
        raise RuntimeError(f"build failed (exit {build.returncode}): " + " / ".join((errors or
                                                                                       build.stdout.splitlines())[-4:]))
    # a fresh interpreter: does the built module load, and do CUDA tensors now reach our kernels?
    probe = subprocess.run([sys.executable, "-c", "from megatron_spot import ops; print(ops.active_backend('cuda'))"],
                           env=env, cwd=ROOT, capture_output=True, text=True)
    if probe.returncode != 0:
        raise RuntimeError("the built extension does not import: " + probe.stderr.strip()[-1500:])
    backend = probe.stdout.strip().splitlines()[-1]
    if backend != "cuda":
        raise RuntimeError(f"built, but megatron_spot.ops uses the {backend!r} implementation for CUDA tensors")
    return {"command": shown, "ops_backend_on_cuda": backend}


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


def child_pytest(p: dict) -> dict:
    import xml.etree.ElementTree as ET

    import pytest

    files = gpu_test_files()
    junit = os.path.join(p["out"], "logs", "pytest_gpu.xml")
    argv = ["-m", "gpu", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors", "--junitxml", junit,
            "-o", "junit_family=xunit1", *files]
    print("+ pytest " + " ".join(argv), flush=True)
    code = int(pytest.main(argv))
    tests, counts = [], {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    if os.path.exists(junit):
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
    # 0 all passed, 5 nothing selected: both fine when nothing failed; anything else is a failure
    status = "ok" if code in (0, 5) and counts["failed"] == counts["error"] == 0 else "failed"
    res = {"status": status, "exit_code": code, "files": files, "counts": counts, "tests": tests}
    if status == "failed":
        res["error"] = f"pytest exit code {code}: {counts['failed']} failed, {counts['error']} errors (see the table)"
    return res


def _bytes_moved(impl: str, tokens: int, vocab: int, elem: int) -> int:
    """HBM traffic of forward+backward, the model of benchmarks/bench_ops.py's GPU estimate."""
    n, f32 = tokens * vocab * elem, tokens * vocab * 4
    low = elem < 4
    if impl == "fused":  # read once forward, once backward, write the gradient in place
        return 3 * n
    if impl == "naive":  # cast, log_softmax (2 reads + write), gather-backward zeros+scatter,
        return (n + f32) + 3 * f32 + (f32 + 3 * f32) + ((f32 + n) if low else 0)  # its backward, cast back
    # Megatron-Core: cast, max, subtract (r+w), exp (r+w), sum, divide (r+w); backward r+w + read; cast back
    return ((n + f32) if low else 0) + 7 * f32 + 3 * f32 + ((f32 + n) if low else 0)


def child_bench_ops(p: dict) -> dict:
    import torch

    from megatron_spot import ops
    from megatron_spot.config.schema import ParallelConfig
    from megatron_spot.platform import initialize, shutdown
    from megatron_spot.platform.device import has_cuda

    cfg = BENCH_DRY if p["dry_run"] else BENCH_GPU
    info = initialize(ParallelConfig(), seed=0)  # Megatron's cross entropy needs its TP group
    dev = info.device
    cuda = has_cuda()
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    def timed(fn):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3, out
        t = time.perf_counter()
        out = fn()
        return time.perf_counter() - t, out

    def mem_base():
        if not cuda:
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def mem_extra(base):
        return None if base is None else int(torch.cuda.max_memory_allocated() - base)

    # copy bandwidth: what a read+write pass can reach on this device (the time model's denominator)
    buf = torch.empty(min(2**28, max(cfg["tokens"]) * cfg["vocab"]), dtype=torch.float32, device=dev)
    dst = torch.empty_like(buf)
    dst.copy_(buf)
    best = min(timed(lambda: dst.copy_(buf))[0] for _ in range(3))
    bandwidth = 2 * buf.numel() * 4 / best
    buf = dst = None  # free both before the logits are allocated

    impls = {
        "naive": lambda x, t: torch.log_softmax(x.float(), dim=-1).gather(-1, t[..., None]).squeeze(-1),
        "megatron": lambda x, t: -vocab_parallel_cross_entropy(x, t),
        # last: its in-place backward overwrites the logits (refilled before each repetition)
        "fused": lambda x, t: ops.token_logprobs(x, t, inplace_backward=True),
    }
    cases = []
    for tokens in cfg["tokens"]:
        for dtype in (torch.float32, torch.bfloat16):
            V = cfg["vocab"]
            gen = torch.Generator(device=dev)
            logits = torch.empty(tokens, 1, V, dtype=dtype, device=dev)
            targets = torch.randint(0, V, (tokens, 1), device=dev, generator=gen.manual_seed(1))

            def refill():
                with torch.no_grad():
                    logits.copy_(torch.randn(tokens, 1, V, device=dev, generator=gen.manual_seed(0)).mul_(2))

            refill()
            # the independent oracle: fp64 log_softmax + gather, chunked so it needs no fp64 logits copy
            with torch.no_grad():
                exact = torch.cat([torch.log_softmax(c.double(), -1).gather(-1, t[..., None]).squeeze(-1)
                                   for c, t in zip(logits.split(256), targets.split(256))])
            go = torch.ones(tokens, 1, device=dev)
            for impl, fn in impls.items():
                rec = {"impl": impl, "dtype": str(dtype).replace("torch.", ""), "tokens": tokens, "vocab": V}
                try:
                    times, extra, diff = [], None, None
                    for rep in range(cfg["reps"] + 1):  # repetition 0 warms up (kernel load, allocator)
                        refill()
                        x = logits.requires_grad_(True)
                        base = mem_base()

                        def fwd_bwd():
                            y = fn(x, targets)
                            (g,) = torch.autograd.grad(y, x, go)
                            return y.detach()

                        t, y = timed(fwd_bwd)
                        if rep:
                            times.append(t)
                            extra = mem_extra(base)
                        diff = float((y.double() - exact).abs().max())
                        del y
                        logits.requires_grad_(False)
                    rec.update(time_s=min(times), times_s=times, peak_extra_bytes=extra, max_abs_diff=diff,
                               bytes_moved=_bytes_moved(impl, tokens, V, logits.element_size()),
                               logits_bytes=logits.numel() * logits.element_size())
                    rec["predicted_s"] = rec["bytes_moved"] / bandwidth
                    if impl == "fused":
                        rec["backend"] = ops.active_backend(dev)
                except Exception as exc:  # OOM or a kernel error: record it, keep benchmarking
                    rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    logits.requires_grad_(False)
                    if cuda:
                        torch.cuda.empty_cache()
                cases.append(rec)
                print(json.dumps(rec), flush=True)
            logits = exact = None  # free this shape's buffers before the next, larger one
    res = {"device": f"{dev} ({torch.cuda.get_device_name() if cuda else platform.processor() or 'CPU'})",
           "timer": "CUDA events" if cuda else "perf_counter", "reps": cfg["reps"],
           "memory_source": "torch.cuda.max_memory_allocated" if cuda else "n/a on CPU",
           "copy_bandwidth_gbs": bandwidth / 1e9, "cases": cases,
           "linear_head": _bench_linear_head(cfg, dev, cuda, timed, mem_base, mem_extra)}
    shutdown()
    return res


def _bench_linear_head(cfg, dev, cuda, timed, mem_base, mem_extra) -> dict:
    """The fused linear loss head (issue 12) against output GEMM + fused op and GEMM + Megatron CE."""
    import torch

    from megatron_spot import ops

    if not hasattr(ops, "linear_token_logprobs"):
        return {"note": "fused linear head: megatron_spot.ops.linear_token_logprobs does not exist yet; not benchmarked"}
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    H, V = cfg["hidden"], cfg["vocab"]
    impls = {
        "linear_token_logprobs": lambda h, w, t: ops.linear_token_logprobs(h, w, t),
        "GEMM + token_logprobs": lambda h, w, t: ops.token_logprobs(torch.matmul(h, w.t()), t, inplace_backward=True),
        "GEMM + Megatron-Core CE": lambda h, w, t: -vocab_parallel_cross_entropy(torch.matmul(h, w.t()), t),
    }
    cases = []
    for tokens in cfg["tokens"]:
        dtype = torch.bfloat16
        gen = torch.Generator(device=dev).manual_seed(0)
        hidden = torch.randn(tokens, 1, H, device=dev, generator=gen).to(dtype).requires_grad_(True)
        weight = (torch.randn(V, H, device=dev, generator=gen) * H**-0.5).to(dtype).requires_grad_(True)
        targets = torch.randint(0, V, (tokens, 1), device=dev, generator=gen)
        go = torch.ones(tokens, 1, device=dev)
        for impl, fn in impls.items():
            rec = {"impl": impl, "dtype": "bfloat16", "tokens": tokens, "hidden": H, "vocab": V}
            try:
                times, extra = [], None
                for rep in range(cfg["reps"] + 1):
                    base = mem_base()
                    t, _ = timed(lambda: torch.autograd.grad(fn(hidden, weight, targets), (hidden, weight), go))
                    if rep:
                        times.append(t)
                        extra = mem_extra(base)
                rec.update(time_s=min(times), peak_extra_bytes=extra)
            except Exception as exc:
                rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                if cuda:
                    torch.cuda.empty_cache()
            cases.append(rec)
            print(json.dumps(rec), flush=True)
    return {"note": f"fused linear head, bf16, hidden {H}: forward + backward (both GEMM gradients included); "
                    "peak extra counts the gradients of hidden and weight as well", "cases": cases}


def rank_presets(cfg: dict, capacity_bytes: float, peak_tflops: float | None, time_limit_s: float,
                 flash_attention: bool):
    """Candidates predicted to fit 85% of the device memory and a third of the step's time, largest
    first, with the analytical prediction of each and a note for every candidate left out."""
    from megatron_spot.models.qwen3 import load_qwen3_config
    from megatron_spot.profiling.analytical import StepShape, predict

    fitting, notes = [], []
    for name in cfg["candidates"]:
        qwen3 = load_qwen3_config(name)
        layout = StepShape(micro_batch_size=cfg["micro_batch_size"], num_micro_batches=cfg["num_micro_batches"],
                        seq_length=cfg["seq_length"], dtype=cfg["precision"], recompute=cfg["recompute"],
                        flash_attention=flash_attention)
        pred = predict(qwen3, layout, peak_tflops=peak_tflops, assumed_mfu=cfg["assumed_mfu"] if peak_tflops else None,
                       vocab=qwen3.padded_vocab_size)
        mem = pred.memory["peak"]["total"]
        # warm-up + measured steps + the FLOP-counting step; model build and start-up take the rest
        steps_s = (pred.step_time_s or 0.0) * (cfg["steps"] + cfg["warmup_steps"] + 1)
        if mem > 0.85 * capacity_bytes:
            notes.append(f"{name} left out: predicted {mem / GiB:.1f} GiB > 85% of {capacity_bytes / GiB:.0f} GiB")
        elif steps_s > time_limit_s / 3:
            notes.append(f"{name} left out: predicted {steps_s:.0f} s of steps > a third of the {time_limit_s:.0f} s limit")
        else:
            fitting.append((name, pred))
    if not fitting:
        raise RuntimeError("no candidate preset fits: " + "; ".join(notes))
    return fitting, notes


def child_profile(p: dict) -> dict:
    """Profile the largest fitting preset; an attempt that fails (an OOM the model did not foresee)
    falls back to the next smaller preset while time is left. Each attempt is its own process."""
    import torch

    from megatron_spot.models.qwen3.provider import transformer_engine_available
    from megatron_spot.profiling.hardware import current_gpu_name, peak_tflops

    t0 = time.monotonic()
    cfg = PROFILE_DRY if p["dry_run"] else PROFILE_GPU
    if torch.cuda.is_available():
        capacity = torch.cuda.get_device_properties(0).total_memory
        gpu = current_gpu_name()
        peak = peak_tflops(gpu) if gpu else None
    else:
        with open("/proc/meminfo") as f:
            capacity = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        peak = None
    fitting, notes = rank_presets(cfg, capacity, peak, p["limit_s"], transformer_engine_available())
    notes.append(f"{fitting[0][0]} chosen: predicted peak {fitting[0][1].memory['peak']['total'] / GiB:.2f} GiB of "
                 f"{capacity / GiB:.0f} GiB")
    attempts = []
    for preset, pred in fitting:
        left = p["limit_s"] - (time.monotonic() - t0) - 5
        if attempts and left < 30:
            notes.append(f"{preset} not tried: {left:.0f} s left")
            break
        json_path = os.path.join(p["out"], "logs", f"profile_{preset}.json")
        argv = ["--preset", preset, "--seq-length", str(cfg["seq_length"]), "--micro-batch-size",
                str(cfg["micro_batch_size"]), "--num-micro-batches", str(cfg["num_micro_batches"]), "--steps",
                str(cfg["steps"]), "--warmup-steps", str(cfg["warmup_steps"]), "--precision", cfg["precision"],
                "--recompute", cfg["recompute"], "--json", json_path]
        command = "python tools/profile_throughput.py " + " ".join(argv)
        print("+ " + command, flush=True)
        result_path = json_path + ".child.json"
        cmd = [*_python(os.environ), os.path.abspath(__file__), "--child", "profile-run", "--params",
               json.dumps(argv), "--result", result_path]
        proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
        try:
            proc.wait(timeout=max(1.0, left))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.wait()
        rec = {"status": "failed", "error": f"killed after {left:.0f} s"}
        if os.path.exists(result_path):
            with open(result_path) as f:
                rec = json.load(f)
        attempts.append({"preset": preset, "status": rec["status"], "error": rec.get("error")})
        if rec["status"] == "ok":
            with open(json_path) as f:
                report = json.load(f)
            keep = ("tokens_per_s", "tokens_per_s_per_device", "tflops_per_device", "mfu", "peak_source",
                    "step_time_s", "flops_per_step", "peak_memory_bytes", "time_split_s", "layout")
            return {"preset": preset, "selection": notes, "attempts": attempts, "command": command,
                    "assumed_mfu": cfg["assumed_mfu"], "predicted_step_s": pred.step_time_s,
                    "predicted_tokens_per_s": pred.tokens_per_s,
                    "predicted_peak_memory_bytes": pred.memory["peak"]["total"],
                    "report": {k: report.get(k) for k in keep}}
        notes.append(f"{preset} failed: {rec.get('error')}")
    raise RuntimeError("no profile run succeeded: " + "; ".join(notes))


def child_profile_run(argv: list) -> dict:
    from tools.profile_throughput import main as profile_main

    code = profile_main(argv)
    if code != 0:
        raise RuntimeError(f"tools/profile_throughput.py exited with {code}")
    return {}


CHILDREN = {"wheels": child_wheels, "build": child_build, "pytest": child_pytest, "bench-ops": child_bench_ops,
            "profile": child_profile, "profile-run": child_profile_run}


def child_main(step: str, params: dict, result_path: str) -> int:
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


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="Steps: " + ", ".join(f"{s.name} ({s.what})" for s in STEPS))
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_results",
                    help="results folder (default: $OUT if set, else gpu_results)")
    ap.add_argument("--dry-run", action="store_true", help="CPU machine: tiny sizes, no CUDA step")
    ap.add_argument("--wheels", default=None, help="folder of carried wheels (default .gpu-wheels; the dry run "
                                                    "builds a probe wheel instead unless this is given)")
    ap.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="time for all steps together")
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
    if args.child:
        if ROOT not in sys.path:
            sys.path.insert(0, ROOT)
        return child_main(args.child, json.loads(args.params), args.result)
    if args.download_wheels:
        return download_wheels(args.download_wheels)
    if args.to_benchmarks:
        return write_benchmarks_section(args.to_benchmarks)
    if args.budget_s <= 0:
        print(f"error: --budget-s must be > 0, got {args.budget_s}", file=sys.stderr)
        return 2
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
