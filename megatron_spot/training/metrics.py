"""Per-step metrics: a readable console line, metrics.jsonl in the run folder, TensorBoard if installed."""
from __future__ import annotations

import json
import logging
import os
from typing import Callable, Optional

from megatron_spot.platform.device import peak_memory_bytes
from megatron_spot.training.moe_metrics import console_summary as moe_console_summary
from megatron_spot.utils.atomic import write_text_atomic

log = logging.getLogger("megatron_spot.train")


def keep_rows_up_to(path: str, step: int) -> None:
    """Drop metrics.jsonl rows after `step` (the step training resumes from; 0 for a fresh run), so
    the steps a resumed run repeats, or an earlier run in the same folder, leave one row per step."""
    if not os.path.exists(path):
        return
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row_step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):  # a torn last line of a killed run
                dropped += 1
                continue
            if row_step <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        write_text_atomic(path, "".join(kept))


class MetricsLogger:
    """flops_per_token(mean_sequence_length) -> model FLOPs of one trained token, and peak_tflops (the MFU
    denominator, None: no MFU) are handed in by the entry point (profiling/ knows the model's FLOPs and
    the GPU table; training/ stays below it)."""

    def __init__(self, run_dir: str, world_size: int, enabled: bool, flops_per_token: Callable[[int], float],
                 peak_tflops: Optional[float] = None, tensorboard: bool = True, start_step: int = 0):
        self.enabled = enabled
        self.world_size = world_size
        self.flops_per_token = flops_per_token
        self.peak = peak_tflops
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if enabled:
            keep_rows_up_to(self.path, start_step)
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except Exception:  # tensorboard not installed: jsonl + console only
                self.tb = None

    def enrich(self, metrics: dict, mean_seq_length: float) -> dict:
        tokens, seconds = metrics["tokens"], max(metrics["step_time_s"], 1e-9)
        flops = tokens * self.flops_per_token(int(mean_seq_length))
        metrics["tokens_per_s"] = tokens / seconds
        metrics["tflops_per_device"] = flops / seconds / self.world_size / 1e12
        if self.peak:
            metrics["mfu"] = metrics["tflops_per_device"] / self.peak
        metrics["peak_memory_gib"] = peak_memory_bytes() / 2**30
        return metrics

    def log(self, step: int, total: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}  # full precision: resumed runs are compared exactly
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        mfu = f" mfu {metrics['mfu']:.1%}" if "mfu" in metrics else ""
        log.info(
            "step %d/%d | loss %.4f | reward ch %+.4f rej %+.4f margin %+.4f acc %.2f | delta %+.4f | "
            "lr %.2e | grad %.3f | %.0f tok/s | %.3f TFLOP/s/dev%s | mem %.2f GiB%s",
            step, total, metrics.get("loss", float("nan")), metrics.get("rewards/chosen", 0.0),
            metrics.get("rewards/rejected", 0.0), metrics.get("rewards/margin", 0.0),
            metrics.get("rewards/accuracy", 0.0), metrics.get("delta", 0.0), metrics["lr"], metrics["grad_norm"],
            metrics["tokens_per_s"], metrics["tflops_per_device"], mfu, metrics["peak_memory_gib"],
            moe_console_summary(metrics),
        )

    def close(self):
        if self.tb is not None:
            self.tb.close()
