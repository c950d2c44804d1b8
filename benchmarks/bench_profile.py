#!/usr/bin/env python
"""BENCHMARKS.md section 'profile': a CPU sweep of the tiny model (measured vs predicted) and the
analytical prediction for Qwen3-8B SPoT on 8x H100 (BF16 and FP8).

Usage: python benchmarks/bench_profile.py [--skip-sweep] [--steps 3]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.report import write_section  # noqa: E402
from megatron_spot.models import load_model_config  # noqa: E402
from megatron_spot.profiling.analytical import StepShape, predict, step_flops  # noqa: E402
from megatron_spot.profiling.hardware import peak_tflops  # noqa: E402

GiB = 2**30
PAIRS, EPOCHS, PAIRS_PER_STEP, GPUS = 4000, 2, 32, 8
PAPER_MINUTES = 28.0


def cpu_sweep(steps: int) -> str:
    out = tempfile.mkdtemp(prefix="bench_profile_")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "profile_throughput.py"), "--preset", "qwen3-tiny",
           "--sweep", "1x1,2x1,1x2,2x2", "--sweep-mbs", "2", "--seq-length", "128", "--num-micro-batches", "4",
           "--steps", str(steps), "--warmup-steps", "1", "--out-dir", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
    with open(os.path.join(out, "table.md")) as f:
        return f.read()


def choose_layout(cfg, seq: int, fp8: bool):
    """First layout (fewest model-parallel ranks, least recompute) predicted to fit in 80 GiB."""
    for tp, rc in ((1, None), (2, None), (1, "selective"), (2, "selective"), (4, None), (4, "selective"),
                   (2, "full"), (4, "full"), (8, "full")):
        dp = GPUS // tp
        mbs = 1
        m = PAIRS_PER_STEP // (dp * mbs)
        lay = StepShape(tp=tp, pp=1, dp=dp, micro_batch_size=mbs, num_micro_batches=m, seq_length=seq,
                     dtype="bf16", fp8=fp8, recompute=rc, sequence_parallel=tp > 1, flash_attention=True)
        if predict(cfg, lay).memory["peak"]["total"] <= 80 * GiB * 0.9:  # keep 10% for allocator/NCCL buffers
            return lay
    raise RuntimeError("no layout fits")


def gpu_table() -> str:
    cfg = load_model_config("qwen3-8b")
    steps = PAIRS * EPOCHS // PAIRS_PER_STEP
    rows = ["| precision | mean seq length | layout | pred. peak mem/GPU | model FLOPs/step | assumed MFU | "
            "step time | tokens/s (8 GPUs) | training (250 steps) | + reference scoring | total | "
            "MFU the paper's 28 min (H800) implies |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for fp8 in (False, True):
        for seq in (2048, 4096):
            lay = choose_layout(cfg, seq, fp8)
            peak = peak_tflops("H100", fp8)
            for mfu in ((0.40, 0.25) if not fp8 else (0.30, 0.20)):
                p = predict(cfg, lay, peak_tflops=peak, assumed_mfu=mfu)
                train_s = steps * p.step_time_s
                # reference log-probs: one forward pass over every sequence once (1/3 of a training pass)
                ref_flops = step_flops(cfg, lay) / 3 * (PAIRS / PAIRS_PER_STEP)
                ref_s = ref_flops / (GPUS * peak * 1e12 * mfu)
                total_flops = step_flops(cfg, lay) * steps + ref_flops
                implied = total_flops / (PAPER_MINUTES * 60 * GPUS * 989e12)
                rc = f", {lay.recompute} recompute" if lay.recompute else ""
                rows.append(
                    f"| {'FP8 (TE)' if fp8 else 'BF16'} | {seq} | TP{lay.tp} PP1 DP{lay.dp}{' SP' if lay.sequence_parallel else ''}"
                    f"{rc}, 1 pair x {lay.num_micro_batches} mb | {p.memory['peak']['total'] / GiB:.1f} GiB | "
                    f"{p.flops_per_step:.2e} | {mfu:.0%} of {peak:.0f} | {p.step_time_s:.2f} s | "
                    f"{p.tokens_per_s:,.0f} | {train_s / 60:.1f} min | {ref_s / 60:.1f} min | "
                    f"**{(train_s + ref_s) / 60:.1f} min** | {implied:.0%} of BF16 peak |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    sweep = "(skipped)" if args.skip_sweep else cpu_sweep(args.steps)
    body = f"""### CPU sweep: qwen3-tiny, measured vs predicted

fp32, 1 micro-batch = 2 pairs = 4 sequences x 128 tokens, 4 micro-batches per step, {args.steps} measured steps
after 1 warmup; one `torchrun` per layout (1 thread per rank; the 2 cores are shared, so 4-rank layouts
oversubscribe them and the machine carried other work: compare the FLOPs/memory columns, not the speed).
MFU is against the measured fp32 matmul peak of one rank's thread. FLOPs measured = torch's
FlopCounterMode over one step, summed over ranks; predicted = the analytical executed FLOPs (unfused
attention multiplies the full s x s matrix). Peak memory measured = weights + grad buffers + optimizer
states read off the built objects + peak bytes autograd saved for backward (CPU has no allocator
counter); the prediction counts a fused layer, the local spec on CPU also saves unfused
RMSNorm/RoPE intermediates and the causal mask. Bubble measured = time in pipeline p2p calls
(waiting for the neighbour stage) as a share of the step; predicted = (PP-1)/(m+PP-1).

{sweep}

### Predicted: Qwen3-8B SPoT recipe on 8x H100 (analytical, `megatron_spot.profiling.analytical`)

Recipe as released: {PAIRS} pairs, {EPOCHS} epochs, {PAIRS_PER_STEP} pairs per optimizer step
({PAIRS * EPOCHS // PAIRS_PER_STEP} steps); every pair is 2 sequences (chosen, rejected) of the stated mean length,
no padding (length-bucketed packing). FLOPs: 6 x 7.568e9 per token + causal attention (47.2 GFLOP/token
at 2k). Assumed MFU (model FLOPs / peak) is an input, not a measurement: 40% BF16 is below published
Megatron 8B pretraining (~47% BF16, ~744 TFLOP/s FP8 = 38% of FP8 peak) because SPoT batches are short
and few per step; 25% / 20% rows show a pessimistic case. Gradient reduce-scatter and parameter
all-gather are assumed overlapped with compute; optimizer time is ignored (about 0.1 s/step for 8B
sharded over 8 GPUs). Layout: the first with the fewest TP ranks and least recompute whose predicted
peak memory (weights 2 B + fp32 grads 4 B + 12 B/DP distributed-optimizer states per parameter +
activations with flash attention) fits in 90% of 80 GiB. Reference scoring = one forward pass over the
{PAIRS} pairs (the sidecar), run once. The last column is the MFU (vs BF16 peak) at which the same FLOPs
take the paper's 28 minutes on 8x H800 (same 989 TFLOP/s BF16 peak as H100).

{gpu_table()}

Reading: the paper's 28 minutes correspond to 14% (2k mean length) to 28% (4k) of BF16 peak, so the
BF16 rows at 40% assumed MFU predict 1.3-3x faster; FP8 GEMMs raise the ceiling, not the short-sequence
overheads, hence the lower assumed fraction of FP8 peak.
"""
    write_section("profile", "Throughput profiling (analytical model vs measured) and Qwen3-8B prediction",
                  "python benchmarks/bench_profile.py", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
