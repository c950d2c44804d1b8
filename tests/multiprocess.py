"""One helper for every multi-process test: run a function on N gloo ranks (CPU) and collect results.

Usage:
    results = run_on_ranks(_worker, world_size=4, args=(cfg,))   # list indexed by rank

`_worker(rank, world_size, *args)` must be a module-level function (spawn pickles it). It runs
with torch.distributed already initialised (gloo, MASTER_ADDR/PORT set); it may call
megatron_spot.platform.initialize(...) itself for Megatron parallel state. Its return value must
be picklable. An exception on any rank fails the call with that rank's traceback; a run that has not
finished after `timeout_s` seconds kills every rank and fails. Either way the error shows the tail of
each rank's output (stdout and stderr of each rank go to a log file, not the terminal).

Process start-up costs seconds on 2 cores: put several checks in one worker rather than spawning
once per assertion. Ranks are forked from a forkserver that imported torch, Megatron-Core and the
training engine once (about 7 s of CPU per process otherwise, paid by every rank of every spawn); each
rank gets the caller's environment as it is at the call, not the forkserver's from its start.
"""
from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# imported once in the forkserver, before any thread exists; every rank forks from it
_PRELOAD = ["torch", "torch.distributed", "megatron.core", "megatron_spot.training.engine", "transformers"]
_START_METHOD = "forkserver"


def _entry(rank, world_size, port, fn, args, result_dir, environ):
    os.environ.clear()  # the caller's environment at the call (the forkserver's is from its own start)
    os.environ.update(environ)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    # fd-level redirect so C++/gloo messages land in the log too; the parent shows its tail on failure
    log = open(os.path.join(result_dir, f"rank{rank}.log"), "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
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


def _kill_all(ctx) -> None:
    for proc in ctx.processes:
        if proc.is_alive():
            proc.kill()
    for proc in ctx.processes:
        proc.join(10)


def _log_tail(result_dir: str, rank: int, chars: int = 3000) -> str:
    path = os.path.join(result_dir, f"rank{rank}.log")
    if not os.path.exists(path):
        return "(no output)"
    with open(path, errors="replace") as f:
        text = f.read()
    return text[-chars:] if text.strip() else "(no output)"


def run_on_ranks(fn, world_size: int, args: tuple = (), timeout_s: float = 600.0):
    import multiprocessing

    multiprocessing.set_forkserver_preload(_PRELOAD)  # takes effect when the forkserver first starts
    port = _free_port()
    with tempfile.TemporaryDirectory() as result_dir:
        ctx = mp.start_processes(
            _entry, args=(world_size, port, fn, args, result_dir, dict(os.environ)), nprocs=world_size,
            join=False, start_method=_START_METHOD,
        )
        errors = []
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    errors.append(f"ranks still running after {timeout_s:.0f} s: killed them")
                    break
        except Exception as exc:  # a rank died; gather what the ranks reported
            errors.append(str(exc))
        finally:
            _kill_all(ctx)  # a hung or orphaned rank must never outlive the test
        results = []
        for rank in range(world_size):
            path = os.path.join(result_dir, f"rank{rank}.pt")
            if not os.path.exists(path):
                errors.append(f"rank {rank} produced no result")
                results.append(None)
                continue
            rec = torch.load(path, weights_only=False)  # written by our own _entry above, never user data
            if not rec["ok"]:
                errors.append(f"rank {rank} failed:\n{rec['error']}")
            results.append(rec.get("result"))
        if errors:
            logs = "\n".join(f"--- rank {r} output (tail) ---\n{_log_tail(result_dir, r)}" for r in range(world_size))
            raise AssertionError("\n".join(errors) + "\n" + logs)
        return results
