"""summary.md (printed at the end of a check) and the BENCHMARKS.md `gpu` section, both from one
gpu_results.json. Standard library only."""
from __future__ import annotations

import json
import os
import re
import sys

from megatron_spot.gpu_check.plan import GiB, ROOT


def _fmt(x, spec=".3g", missing="-"):
    return missing if x is None else format(x, spec)


def first_line(rec: dict) -> str:
    """The first line of a step's error or skip reason (the summary table's note)."""
    text = rec.get("error") or rec.get("reason") or ""
    return text.strip().splitlines()[0][:200] if text.strip() else ""


def _machine_line(m: dict) -> str:
    return (f"- machine: {m.get('gpu_name') or 'no GPU'}"
            + (f" ({m['gpu_memory_gib']:.0f} GiB, sm_{m['capability']})" if m.get("gpu_memory_gib") else "")
            + f", {m.get('cpus')} CPUs, Python {m.get('python')}, torch {m.get('torch', '?')}"
            + (f" (CUDA {m['torch_cuda']})" if m.get("torch_cuda") else "")
            + (f", Transformer Engine {m['transformer_engine']}" if m.get("transformer_engine") else
               ", no Transformer Engine"))


def render_summary(report: dict) -> str:
    mode = "DRY RUN on CPU (tiny sizes; no CUDA step ran)" if report["dry_run"] else "GPU run"
    lines = [
        f"# GPU check: {'PASSED' if report['ok'] else 'FAILED'} ({mode})", "",
        _machine_line(report["machine"]),
        f"- started {report['started']}, {report['wall_s']:.0f} s of a {report['budget_s']:.0f} s budget, "
        f"commit {(report.get('git_commit') or '?')[:12]}",
        f"- command: `{report['command']}`", "",
        "| step | status | seconds | note |", "|---|---|---|---|",
    ]
    for s in report["steps"]:
        note = first_line(s).replace("|", "/")
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {note} |")
    for s in report["steps"]:
        r = s.get("result") or {}
        if r and s["name"] in _SECTIONS:
            lines += _SECTIONS[s["name"]](r)
    return "\n".join(lines) + "\n"


def _wheels_section(r: dict) -> list[str]:
    return ["", "## wheels", ""] + [f"- {w['dist']}: {w['action']}" for w in r.get("wheels", [])]


def _build_section(r: dict) -> list[str]:
    out = ["", "## build", "", f"- `{r.get('command', '')}`"]
    if r.get("ops_backend_on_cuda"):
        out.append(f"- megatron_spot.ops backend for CUDA tensors: {r['ops_backend_on_cuda']}")
    return out


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


def _op_row(c: dict) -> str:
    if "error" in c:
        return f"| {c['tokens']} x {c['vocab']} | {c['dtype']} | {c['impl']} | error: {c['error'][:120]} | | | | | |"
    impl = c["impl"] + (f" ({c['backend']} implementation)" if c.get("backend") else "")
    return (f"| {c['tokens']} x {c['vocab']} | {c['dtype']} | {impl} | {c['time_s'] * 1e3:.2f} | "
            f"{_fmt(c.get('predicted_s') and c['predicted_s'] * 1e3, '.2f')} | "
            f"{_fmt(c.get('bytes_moved') and c['bytes_moved'] / GiB, '.2f')} | "
            f"{_fmt(c.get('peak_extra_bytes') and c['peak_extra_bytes'] / GiB, '.3f', 'n/a')} | "
            f"{_fmt(c.get('peak_extra_bytes') and c['peak_extra_bytes'] / c['logits_bytes'], '.3f', 'n/a')} | "
            f"{_fmt(c.get('max_abs_diff'), '.2e')} |")


def _linear_head_rows(head: dict) -> list[str]:
    out = ["", head["note"], ""]
    if not head.get("cases"):
        return out
    out += ["| tokens x hidden x vocab | dtype | implementation | time (ms) | peak extra (GiB) |", "|---|---|---|---|---|"]
    for c in head["cases"]:
        if "error" in c:
            out.append(f"| {c['tokens']} | {c['dtype']} | {c['impl']} | error: {c['error'][:120]} | |")
        else:
            out.append(f"| {c['tokens']} x {c['hidden']} x {c['vocab']} | {c['dtype']} | {c['impl']} | "
                       f"{c['time_s'] * 1e3:.2f} | "
                       f"{_fmt(c.get('peak_extra_bytes') and c['peak_extra_bytes'] / GiB, '.3f', 'n/a')} |")
    return out


def _bench_section(r: dict) -> list[str]:
    peak_extra = (f"{r['memory_source']} minus the memory with the logits allocated"
                  if r["memory_source"] != "n/a on CPU" else "not measured on CPU")
    out = ["", "## fused log-prob op (forward + backward)", "",
           f"{r['device']}; copy bandwidth measured {r['copy_bandwidth_gbs']:.0f} GB/s; time = best of "
           f"{r['reps']} ({r['timer']}); peak extra = {peak_extra}"
           "; predicted = bytes moved / measured copy bandwidth (model of benchmarks/bench_ops.py).", "",
           "| tokens x vocab | dtype | implementation | time (ms) | predicted (ms) | bytes moved (GiB, model) "
           "| peak extra (GiB) | extra / logits | max abs diff vs fp64 |", "|---|---|---|---|---|---|---|---|---|"]
    out += [_op_row(c) for c in r["cases"]]
    if r.get("linear_head"):
        out += _linear_head_rows(r["linear_head"])
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


def _moe_row(r: dict, reference: bool = False) -> str:
    if "history" not in r:
        return f"| {r['name']} | | | {r.get('precision', '')} | | | failed: {first_line(r)} | |"
    device = r["device"] + (" (TE)" if r.get("te") else "")
    experts = r.get("experts_module") or "?"
    last = r["history"][-1]
    speed = f"{last['step_time_s']:.3f} s, {_fmt(last.get('tokens_per_s'), ',.0f')}"
    if reference:
        return f"| {r['name']} (reference) | {device} | {experts} | {r['precision']} | | | | {speed} |"
    tol, worst = r["tolerance"], r["max_rel_diff"]
    diffs = " / ".join(format(worst[k], ".1e") for k in ("loss", "logps/chosen", "logps/rejected", "grad_norm"))
    return (f"| {r['name']} | {device} | {experts} | {r['precision']} | {tol['rel']:g}; "
            f"{tol['grad_norm_rel']:g} | {diffs} | {'passed' if r['passed'] else 'FAILED'} | {speed} |")


def _moe_section(r: dict) -> list[str]:
    ref = r.get("reference")
    out = ["", f"## MoE: {r['preset']} grouped experts vs sequential experts on the CPU (fp32)", "",
           f"{r['steps']} SPoT steps (spot-bco, 8 pairs each, EP1) from the same checkpoint, data and seed, "
           "compared per step: loss, sequence log-probs, grad norm; relative tolerance |a - b| <= tol x "
           "max(|a|, |b|, 1e-3)"
           + (f"; training moved the reference's loss by {ref['loss_moved']:.3g}" if ref else "") + ".", "",
           "| run | device | experts module | precision | tolerance (rel; grad norm) | max rel diff (loss / chosen / "
           "rejected / grad norm) | result | last step (s, tokens/s) |", "|---|---|---|---|---|---|---|---|"]
    out += [_moe_row(run) for run in r.get("runs", [])]
    if ref:
        out.append(_moe_row(ref, reference=True))
    for run in r.get("runs", []):
        out += [f"- {run['name']}: {v}" for v in run.get("violations", [])]
    out += [f"- {n}" for n in r.get("notes", [])]
    return out


# the per-step sections of the summary, in the steps' order
_SECTIONS = {"wheels": _wheels_section, "build": _build_section, "pytest": _pytest_section,
             "bench-ops": _bench_section, "moe": _moe_section, "profile": _profile_section}


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
