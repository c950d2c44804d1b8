"""Peak memory per rank in real SPoT training steps with the fused linear loss head (model default) and
with Megatron's output layer + `token_logprobs` (`model.fused_linear_loss=false`), through
`tools/profile_throughput.py` (random weights, synthetic full-length pairs, the real Engine):

(1) the CPU demo's recipe (examples/tiny_cpu_spot.yaml: qwen3-tiny, TP2 x PP2, 4 gloo ranks); its
    vocabulary is 512 tokens, so its logits are small beside the activations;
(2) Qwen3-0.6B's shapes (vocabulary 151,936) on one process, where the logits dominate the head.

Memory per rank is what the profiler measures: model states plus the peak of the tensors autograd keeps
for backward (its SavedActivationTracker; the logits the unfused head saves are among them), and the
process's RSS high-water mark. Both heads run the same steps, one after the other (~12 minutes in all on
2 cores, most of it the 0.6B case).

Usage: python benchmarks/bench_loss_head_training.py [--no-write] [--skip-0.6b]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MiB = 2**20

CASES = {
    "demo recipe (qwen3-tiny, V=512, TP2 x PP2, fp32, 2 pairs x 1024 tokens)": [
        "--config", os.path.join("examples", "tiny_cpu_spot.yaml"), "--steps", "1", "--warmup-steps", "1"],
    "Qwen3-0.6B shapes (V=151,936, TP1, fp32, 1 pair x 512 tokens)": [
        "--preset", "qwen3-0.6b", "--seq-length", "512", "--micro-batch-size", "1", "--num-micro-batches", "2",
        "--steps", "1", "--warmup-steps", "0"],
}


def profile(argv: list[str], fused: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "prof.json")
        cmd = [sys.executable, os.path.join(ROOT, "tools", "profile_throughput.py"), *argv, "--no-flop-count",
               "--json", out] + ([] if fused else ["--unfused-loss-head"])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
        if proc.returncode != 0:
            return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1][:200]}
        with open(out) as f:
            report = json.load(f)
    report["wall_s"] = time.perf_counter() - t0
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    ap.add_argument("--skip-0.6b", dest="skip_big", action="store_true",
                    help="only the demo recipe (the 0.6B case needs ~12 GiB and a few minutes)")
    args = ap.parse_args()
    rows = ["| case | loss head | rank (pp stage) | saved activations (MiB) | peak per rank, profiler (MiB) | "
            "RSS high-water (MiB) |", "|---|---|---|---|---|---|"]
    deltas = []
    for name, argv in CASES.items():
        if args.skip_big and "0.6B" in name:
            continue
        results = {fused: profile(argv, fused) for fused in (False, True)}
        for fused, r in results.items():
            head = "fused linear head" if fused else "output layer + token_logprobs"
            if "error" in r:
                rows.append(f"| {name} | {head} | failed: {r['error']} | | | |")
                continue
            last = max(m["pp_rank"] for m in r["memory_per_rank"])
            for m in r["memory_per_rank"]:
                if m["tp_rank"] != 0:  # TP ranks of a stage hold the same amounts
                    continue
                rows.append(f"| {name} | {head} | {m['rank']} ({m['pp_rank']}{', last' if m['pp_rank'] == last else ''})"
                            f" | {m['activation_bytes'] / MiB:,.1f} | {m['peak_memory_bytes'] / MiB:,.1f} | "
                            f"{m['rss_bytes'] / MiB:,.0f} |")
        if all("error" not in r for r in results.values()):
            def last_stage(r):
                last = max(m["pp_rank"] for m in r["memory_per_rank"])
                return max(m["peak_memory_bytes"] for m in r["memory_per_rank"] if m["pp_rank"] == last)
            before, after = last_stage(results[False]), last_stage(results[True])
            deltas.append(f"{name}: last stage {before / MiB:,.1f} -> {after / MiB:,.1f} MiB per rank "
                          f"({100 * (after - before) / before:+.1f}%)")
    body = "\n".join([
        "Per rank, one measured training step after the recipe's warm-up, random weights. 'saved activations' is "
        "the peak of the tensors autograd kept for backward; 'peak per rank' adds weights, gradients and Adam "
        "states (the profiler's `peak_memory_bytes`); the RSS high-water mark is the whole process over its life "
        "(Python, torch, gloo buffers, model build, first optimizer step), which the head does not set. Step times "
        "are left out: these runs share the cores with other work, and the throughput benchmarks measure speed.",
        "", *rows, "",
        "Before -> after (output layer + token_logprobs -> fused linear head): " + "; ".join(deltas) + ".",
    ])
    print(body)
    if not args.no_write:
        sys.path.insert(0, HERE)
        from report import write_section

        write_section("loss_head_training", "Loss head in training: peak memory per rank, fused vs unfused",
                      "python benchmarks/bench_loss_head_training.py", body)
        print("wrote the loss_head_training section of BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
