"""The accelerator as the rest of the package sees it: one place for every torch.cuda call.

Everything here has a CPU answer, so callers never branch on CUDA themselves and the CPU twin
runs the same code path (see cpu_compat.py for the calls Megatron-Core makes on its own).
"""
from __future__ import annotations

from typing import Optional

import torch


def has_cuda() -> bool:
    return torch.cuda.is_available()


def transformer_engine_available() -> bool:
    """Transformer Engine is usable only with CUDA; its torch binding cannot be built on a CPU box."""
    if not has_cuda():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def requested_device(name: str) -> torch.device:
    """A device a user asked for by name ('cpu', 'cuda', 'cuda:1'), checked against this machine; raises
    ValueError with one line saying what is missing (so `--device cuda` on a CPU machine is refused before
    any work, not at the first tensor moved there)."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"device {name!r}: only cpu and cuda[:N] are supported")
    if not has_cuda():
        why = ("this torch is a CPU-only build" if torch.version.cuda is None
               else f"no CUDA device is visible (torch built for CUDA {torch.version.cuda})")
        raise ValueError(f"device {name!r}: {why}; use cpu")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"device {name!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return dev


def current_device() -> torch.device:
    """This rank's compute device (platform.initialize pinned the CUDA device per local rank)."""
    return torch.device("cuda", torch.cuda.current_device()) if has_cuda() else torch.device("cpu")


def move_to_device(module: torch.nn.Module) -> torch.nn.Module:
    """Place a freshly built module on this rank's device; modules on the meta device stay there."""
    first = next(module.parameters(), None)
    if has_cuda() and first is not None and first.device.type != "meta":
        module.cuda(torch.cuda.current_device())
    return module


def device_name() -> Optional[str]:
    return torch.cuda.get_device_name() if has_cuda() else None


def compute_capability() -> Optional[tuple[int, int]]:
    return torch.cuda.get_device_capability() if has_cuda() else None


def synchronize() -> None:
    """Wait for the accelerator's queued work (timing, memory baselines); nothing to wait for on CPU."""
    if has_cuda():
        torch.cuda.synchronize()


def time_call(fn):
    """(seconds, fn()): CUDA events around the call on a GPU (its queued kernels counted), wall clock on CPU."""
    if has_cuda():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3, out
    import time

    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def allocated_memory_bytes() -> Optional[int]:
    """Accelerator memory held by tensors now; None on CPU (its allocator keeps no count)."""
    return int(torch.cuda.memory_allocated()) if has_cuda() else None


def total_memory_bytes() -> Optional[int]:
    """The accelerator's memory; None on CPU."""
    return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory) if has_cuda() else None


def release_cached_memory() -> None:
    """Hand cached accelerator blocks back (after an OOM, before a larger case); CPU caches nothing."""
    if has_cuda():
        torch.cuda.empty_cache()


def reset_peak_memory() -> None:
    if has_cuda():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_bytes() -> int:
    """Peak allocated accelerator memory; on CPU the process's peak resident set size."""
    if has_cuda():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def accelerator_rng_state() -> Optional[torch.Tensor]:
    """The CUDA generator's state (None on CPU, where the default generator is all there is)."""
    return torch.cuda.get_rng_state() if has_cuda() else None


def set_accelerator_rng_state(state: Optional[torch.Tensor]) -> None:
    if state is not None and has_cuda():
        torch.cuda.set_rng_state(state)
