"""What the per-case benchmarks (bench_ops, bench_loss_head) share: each case runs in a fresh child
process that prints one `RESULT <json>` line, its memory is read from the kernel's RSS counters, the free
memory is checked before a large case starts, and Megatron-Core's ops get a one-process gloo world.

Run as scripts, the benchmarks find this module beside them (a script's folder leads sys.path).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess

RESULT_PREFIX = "RESULT "


def rss_bytes() -> int:
    """The process's resident set size now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM); Linux >= 4.0. False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The RSS high-water mark since the process started or since reset_peak_rss()."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (unbounded where it cannot be read)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def init_single_process_megatron() -> None:
    """A one-rank gloo world with Megatron-Core's parallel state at TP=1, for its vocab-parallel ops."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    # a port per process: cases run one after another, and a dying child may hold its port a while
    os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 500))
    dist.init_process_group("gloo", rank=0, world_size=1)
    ps.initialize_model_parallel(tensor_model_parallel_size=1)


def print_result(result: dict) -> None:
    """The child's side of the protocol: its one result line."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(cmd: list[str], cwd: str, on_error: dict) -> dict:
    """Run one case as `cmd` and return its result; if it printed none, `on_error` plus the tail of its
    output under "error" (the report then shows the failure instead of stopping)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    return {**on_error, "error": (proc.stderr or proc.stdout)[-2000:]}
