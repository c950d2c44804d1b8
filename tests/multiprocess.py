"""One helper for every multi-process test: run a function on N gloo ranks (CPU) and collect results.

Usage:
    results = run_on_ranks(_worker, world_size=4, args=(cfg,))   # list indexed by rank

`_worker(rank, world_size, *args)` must be a module-level function (spawn pickles it). It runs
with torch.distributed already initialised (gloo, MASTER_ADDR/PORT set); it may call
megatron_spot.platform.initialize(...) itself for Megatron parallel state. Its return value must
be picklable. An exception on any rank fails the call with that rank's traceback.

Process start-up costs seconds on 2 cores: put several checks in one worker rather than spawning
once per assertion.
"""
from __future__ import annotations

import os
import socket
import tempfile
import traceback

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, result_dir):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    out = os.path.join(result_dir, f"rank{rank}.pt")
    try:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, out)
    except BaseException:  # report every failure, including assertion errors, to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, out)
        raise
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def run_on_ranks(fn, world_size: int, args: tuple = (), timeout_s: float = 600.0):
    port = _free_port()
    with tempfile.TemporaryDirectory() as result_dir:
        ctx = mp.start_processes(
            _entry, args=(world_size, port, fn, args, result_dir), nprocs=world_size, join=False,
            start_method="spawn",
        )
        errors = []
        try:
            while not ctx.join(timeout=timeout_s):
                pass
        except Exception as exc:  # a rank died; gather what the ranks reported
            errors.append(str(exc))
        results = []
        for rank in range(world_size):
            path = os.path.join(result_dir, f"rank{rank}.pt")
            if not os.path.exists(path):
                errors.append(f"rank {rank} produced no result")
                results.append(None)
                continue
            rec = torch.load(path, weights_only=False)
            if not rec["ok"]:
                errors.append(f"rank {rank} failed:\n{rec['error']}")
            results.append(rec.get("result"))
        if errors:
            raise AssertionError("\n".join(errors))
        return results
