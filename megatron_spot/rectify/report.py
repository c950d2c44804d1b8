"""The report every stage refreshes: rejects.jsonl (all stages' rejects), report.json (counts per
stage and reason, the accounting check, tokens and cost), change_ratio_hist.png; and the summary
the command line prints."""
from __future__ import annotations

import os
import sys
from typing import Optional

from megatron_spot.utils.atomic import atomic_file

from .config import STAGES, PipelineConfig
from .jsonl import read_json, read_records, write_json_atomic, write_jsonl_atomic


def finalize(cfg: PipelineConfig, plot: bool = False) -> dict:
    """Merge the stage files into rejects.jsonl and report.json (and, with ``plot``, redraw
    change_ratio_hist.png from the filter stage's ratios; the filter stage does that)."""
    stats = {s: read_json(cfg.path(f"stats.{s}.json")) for s in STAGES}
    stats = {k: v for k, v in stats.items() if v is not None}
    all_rejects = []
    for s in STAGES:
        p = cfg.path(f"rejects.{s}.jsonl")
        if os.path.exists(p):
            all_rejects.extend(read_records(p))
    write_jsonl_atomic(cfg.path("rejects.jsonl"), all_rejects)
    n_pairs = sum(1 for _ in open(cfg.path("pairs.jsonl"), encoding="utf-8")) if os.path.exists(cfg.path("pairs.jsonl")) else None
    report: dict = {"output_dir": os.path.abspath(cfg.output_dir), "pairs": n_pairs,
                    "rejects": len(all_rejects),
                    "rejects_by_stage_and_reason": {}, "stages": {}, "config": cfg.public()}
    for r in all_rejects:
        d = report["rejects_by_stage_and_reason"].setdefault(r["stage"], {})
        d[r["reason"]] = d.get(r["reason"], 0) + 1
    for s, st in stats.items():
        report["stages"][s] = {k: v for k, v in st.items() if k != "change_ratios"}
    if all(s in stats for s in ("rectify", "verify", "filter")) and n_pairs is not None:
        n_in = stats["rectify"]["input_items"]
        n_rej = sum(stats[s]["rejected"] for s in ("rectify", "verify", "filter"))
        report["accounting"] = {"rectify_inputs": n_in, "pairs": n_pairs, "rejects_after_elicit": n_rej,
                                "balanced": n_in == n_pairs + n_rej}
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0, "http_requests": 0, "cache_hits": 0}
    for st in stats.values():
        c = st.get("client") or {}
        for k in usage:
            usage[k] += c.get(k, 0) or 0
    report["usage"] = usage  # summed over each stage's latest run (stats.<stage>.json)
    if "filter" in stats and plot:
        _histogram(cfg, stats["filter"].get("change_ratios", []))
    if os.path.exists(cfg.path("change_ratio_hist.png")):
        report["histogram_png"] = cfg.path("change_ratio_hist.png")
    write_json_atomic(cfg.path("report.json"), report)
    return report


def _histogram(cfg: PipelineConfig, ratios: list) -> Optional[str]:
    path = cfg.path("change_ratio_hist.png")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # plotting is optional
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    bins = [i / 40 for i in range(41)]
    kept = [r for r in ratios if r <= cfg.gamma]
    dropped = [r for r in ratios if r > cfg.gamma]
    ax.hist([kept, dropped], bins=bins, stacked=True, color=["#3a7bd5", "#d9534f"],
            label=[f"kept ({len(kept)})", f"dropped R > {cfg.gamma} ({len(dropped)})"])
    ax.axvline(cfg.gamma, color="k", linestyle="--", linewidth=1)
    ax.set_xlabel("change ratio R = 1 - LCS(rejected, chosen) / |chosen|")
    ax.set_ylabel("pairs")
    ax.set_title("Rectified pairs: change ratio")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path, binary=True) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path


def print_summary(cfg: PipelineConfig) -> None:
    """One line of counts, one per stage's reject reasons, usage and the answer cap (stdout)."""
    rep = read_json(cfg.path("report.json"), {})
    print(f"pairs: {rep.get('pairs')}  rejects: {rep.get('rejects')}  -> {os.path.abspath(cfg.output_dir)}")
    for stage, reasons in rep.get("rejects_by_stage_and_reason", {}).items():
        print(f"  {stage}: " + ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())))
    u = rep.get("usage") or {}
    if u.get("http_requests") or u.get("cache_hits"):
        print(f"  (latest run of each stage) requests sent: {u['http_requests']}  cache hits: {u['cache_hits']}  tokens: "
              f"{u['prompt_tokens']} prompt + {u['completion_tokens']} completion  cost: ${u['cost_usd']:.4f}")
    capped = (read_json(cfg.path("stats.rectify.json"), {}).get("client") or {}).get("capped")
    if capped:
        print(f"  capped: {capped} Oracle answer(s) larger than --max-answer-bytes were rejected")
    acc = rep.get("accounting")
    if acc and not acc["balanced"]:
        print("WARNING: inputs != pairs + rejects", acc, file=sys.stderr)
