"""Peak throughput of known accelerators (for MFU and predictions) and a measured CPU matmul peak."""
from __future__ import annotations

import difflib
import time
from typing import Optional

import torch

from megatron_spot.config.loader import ConfigError
from megatron_spot.platform.device import device_name

# Dense (no sparsity) BF16 / FP8 peak TFLOP/s, memory (GiB) and the GPU-to-GPU bandwidth inside a node
# (GB/s per GPU and direction: half the data sheet's bidirectional NVLink figure, PCIe for the L40S) of
# known GPUs, from vendor data sheets. The link figure is a peak; NCCL's all-to-all reaches less of it.
GPUS = {
    "H100": {"bf16": 989.0, "fp8": 1979.0, "memory_gib": 80, "intra_node_gb_s": 450.0},
    "H800": {"bf16": 989.0, "fp8": 1979.0, "memory_gib": 80, "intra_node_gb_s": 200.0},
    "H200": {"bf16": 989.0, "fp8": 1979.0, "memory_gib": 141, "intra_node_gb_s": 450.0},
    "A100": {"bf16": 312.0, "fp8": None, "memory_gib": 80, "intra_node_gb_s": 300.0},
    "A800": {"bf16": 312.0, "fp8": None, "memory_gib": 80, "intra_node_gb_s": 200.0},
    "B200": {"bf16": 2250.0, "fp8": 4500.0, "memory_gib": 180, "intra_node_gb_s": 900.0},
    "GB200": {"bf16": 2500.0, "fp8": 5000.0, "memory_gib": 186, "intra_node_gb_s": 900.0},
    "L40S": {"bf16": 362.0, "fp8": 733.0, "memory_gib": 48, "intra_node_gb_s": 32.0},
}
# Between nodes, per GPU and direction: one 400 Gb/s (NDR InfiniBand / 400G RoCE) NIC per GPU, as in DGX H100
# and most H100/H200 clusters = 50 GB/s.
INTER_NODE_GB_S = 50.0
# Peak TFLOP/s only (what MFU needs).
GPU_PEAK_TFLOPS = {k: {"bf16": v["bf16"], "fp8": v["fp8"]} for k, v in GPUS.items()}


def gpu_spec(name: str) -> dict:
    """Look a GPU up by name (case-insensitive, 'H100-SXM' style suffixes allowed)."""
    key = name.upper().replace("NVIDIA", "").strip()
    for k in sorted(GPUS, key=len, reverse=True):
        if key == k or key.startswith(k + "-") or key.startswith(k + " "):
            return dict(GPUS[k], name=k)
    close = difflib.get_close_matches(key, list(GPUS), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"unknown GPU '{name}' for MFU.{hint} Known GPUs: {', '.join(GPUS)}")


def peak_tflops(gpu: str, fp8: bool = False) -> float:
    spec = gpu_spec(gpu)
    if fp8 and spec["fp8"] is None:
        raise ConfigError(f"{spec['name']} has no FP8 tensor cores; drop --precision fp8 or pick another GPU")
    return spec["fp8"] if fp8 else spec["bf16"]


def current_gpu_name() -> Optional[str]:
    """This rank's GPU as a key of GPUS (None on CPU or for an unknown GPU)."""
    name = device_name()
    if name is None:
        return None
    for k in sorted(GPUS, key=len, reverse=True):
        if k in name:
            return k
    return None


def gpu_peak_tflops(fp8: bool) -> Optional[float]:
    """MFU denominator of this rank's GPU; None on CPU or for a GPU not in the table."""
    name = current_gpu_name()
    if name is None:
        return None
    spec = GPUS[name]
    return (spec["fp8"] if fp8 else None) or spec["bf16"]


def measure_cpu_matmul_tflops(size: int = 512, dtype: torch.dtype = torch.float32, seconds: float = 0.5) -> float:
    """Best-of-repeats TFLOP/s of a square matmul with this process's thread count.

    The MFU denominator on CPU: what this process can do on dense matmuls right now (other load on
    the machine lowers it, so measure in the same run as the training steps).
    """
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        dt = (time.perf_counter() - t) / 4
        best = max(best, 2 * size**3 / dt / 1e12)
    return best
