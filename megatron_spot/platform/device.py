"""The accelerator as the rest of the package sees it: one place for every torch.cuda call.

Everything here has a CPU answer, so callers never branch on CUDA themselves and the CPU twin
runs the same code path (see cpu_compat.py for the calls Megatron-Core makes on its own).
"""
from __future__ import annotations

from typing import Optional

import torch


def has_cuda() -> bool:
    return torch.cuda.is_available()


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
