"""The profile step: tools/profile_throughput.py on the largest Qwen3 preset predicted to fit, each
attempt in its own process, falling back to the next smaller preset while time is left."""
from __future__ import annotations

import json
import os
import subprocess
import time

from megatron_spot.gpu_check.orchestrate import child_command, kill_group
from megatron_spot.gpu_check.plan import PROFILE_DRY, PROFILE_GPU, ROOT, GiB


def rank_presets(cfg: dict, capacity_bytes: float, peak_tflops: float | None, time_limit_s: float,
                 flash_attention: bool):
    """Candidates predicted to fit 85% of the device memory and a third of the step's time, largest
    first, with the analytical prediction of each and a note for every candidate left out."""
    from megatron_spot.models import load_model_config
    from megatron_spot.profiling.analytical import StepShape, predict

    fitting, notes = [], []
    for name in cfg["candidates"]:
        model_cfg = load_model_config(name)
        shape = StepShape(micro_batch_size=cfg["micro_batch_size"], num_micro_batches=cfg["num_micro_batches"],
                          seq_length=cfg["seq_length"], dtype=cfg["precision"], recompute=cfg["recompute"],
                          flash_attention=flash_attention)
        pred = predict(model_cfg, shape, peak_tflops=peak_tflops, assumed_mfu=cfg["assumed_mfu"] if peak_tflops else None,
                       vocab=model_cfg.padded_vocab_size)
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


def _device_capacity() -> tuple[float, float | None]:
    """(bytes the profiled run may use, the device's peak dense TFLOP/s or None)."""
    from megatron_spot.platform.device import total_memory_bytes
    from megatron_spot.profiling.hardware import current_gpu_name, peak_tflops

    total = total_memory_bytes()
    if total is not None:
        gpu = current_gpu_name()
        return total, (peak_tflops(gpu) if gpu else None)
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None


def _profile_argv(cfg: dict, preset: str, json_path: str) -> list[str]:
    return ["--preset", preset, "--seq-length", str(cfg["seq_length"]), "--micro-batch-size",
            str(cfg["micro_batch_size"]), "--num-micro-batches", str(cfg["num_micro_batches"]), "--steps",
            str(cfg["steps"]), "--warmup-steps", str(cfg["warmup_steps"]), "--precision", cfg["precision"],
            "--recompute", cfg["recompute"], "--json", json_path]


def _profile_attempt(argv: list[str], result_path: str, left_s: float) -> dict:
    """One profile run in its own process (an OOM or a hang cannot take the step's record with it)."""
    proc = subprocess.Popen(child_command(os.environ, "profile-run", argv, result_path), cwd=ROOT,
                            start_new_session=True)
    try:
        proc.wait(timeout=max(1.0, left_s))
    except subprocess.TimeoutExpired:
        kill_group(proc)
        proc.wait()
    if os.path.exists(result_path):
        with open(result_path) as f:
            return json.load(f)
    return {"status": "failed", "error": f"killed after {left_s:.0f} s"}


def child_profile(p: dict) -> dict:
    """Profile the largest fitting preset; an attempt that fails (an OOM the model did not foresee)
    falls back to the next smaller preset while time is left. Each attempt is its own process."""
    from megatron_spot.platform.device import transformer_engine_available

    t0 = time.monotonic()
    cfg = PROFILE_DRY if p["dry_run"] else PROFILE_GPU
    capacity, peak = _device_capacity()
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
        argv = _profile_argv(cfg, preset, json_path)
        command = "python tools/profile_throughput.py " + " ".join(argv)
        print("+ " + command, flush=True)
        rec = _profile_attempt(argv, json_path + ".child.json", left)
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
    from megatron_spot.cli.profile_throughput import main as profile_main

    code = profile_main(argv)
    if code != 0:
        raise RuntimeError(f"tools/profile_throughput.py exited with {code}")
    return {}
