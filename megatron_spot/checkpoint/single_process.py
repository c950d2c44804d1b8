"""The one-process world conversions run in, and the child process that gives them one when the caller is
a rank of a larger world (rank 0 at the end of training): Megatron-Core's parallel state is global, so a
TP1PP1 model cannot be built inside a TP2 world."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from megatron_spot.checkpoint.errors import CheckpointError

_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE")


def in_multi_rank_world() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def ensure_single_process_world() -> None:
    """torch.distributed + Megatron parallel state for one process at TP1PP1."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_spot.config.schema import ParallelConfig
    from megatron_spot.platform import initialize

    if (dist.is_initialized() and ps.model_parallel_is_initialized()
            and ps.get_tensor_model_parallel_world_size() == 1 and ps.get_pipeline_model_parallel_world_size() == 1):
        return
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # a world of one of our own: stale launcher variables (e.g. inherited from a parent that ran
        # one) would point at a port that is already taken
        for k in _LAUNCHER_ENV:
            os.environ.pop(k, None)
    initialize(ParallelConfig(), seed=0)


def run_in_child(kind: str, kwargs: dict) -> dict:
    """Run a conversion in a fresh single-process python (used from inside a multi-rank world)."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV and not k.startswith("TORCHELASTIC_")}
    with tempfile.NamedTemporaryFile("r", suffix=".json") as result:  # private, removed on exit
        cmd = [sys.executable, "-m", "megatron_spot.checkpoint.hf_convert", kind, json.dumps(kwargs), result.name]
        proc = subprocess.run(cmd, env=env)
        text = open(result.name).read()
    out = json.loads(text) if text.strip() else None
    if proc.returncode != 0 or not out or "error" in out:
        msg = (out or {}).get("error") or f"conversion subprocess failed with exit code {proc.returncode}"
        raise CheckpointError(msg)
    return out["summary"]

