"""Platform start-up: torch.distributed, Megatron-Core parallel state, device and RNG seeding.

Entry points call :func:`initialize` first; nothing else in the package initialises
torch.distributed or picks CUDA devices. GPUs present: NCCL and one CUDA device per local rank.
No GPU: gloo on the CPU, with :mod:`megatron_spot.platform.cpu_compat` applied.
"""
from __future__ import annotations

import datetime
import logging
import os
import random
import socket
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_spot.config.schema import ParallelConfig
from megatron_spot.platform import cpu_compat
from megatron_spot.platform.device import current_device, has_cuda
from megatron_spot.platform.layout import Layout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    tp: int
    pp: int
    vpp: Optional[int]
    cp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    layout: Optional[Layout] = None  # the same sizes as one object (platform/layout.py)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def validate_parallel_layout(parallel: ParallelConfig, world_size: int) -> Layout:
    """World-size checks that need no model, before any process group: the run's Layout (platform/layout.py)."""
    return Layout.from_config(parallel, world_size)


# NCCL's default (gloo's is 30 minutes): how long a rank may wait in one collective for its peers.
DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0
_patient_group = None  # a gloo group with a long timeout, for waits on one rank's slow work (patient_barrier)


def init_process_group(timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
                       join_timeout_s: Optional[float] = None) -> tuple[int, int, int, str]:
    """Start torch.distributed from torchrun's environment (or as a single process).

    `timeout_s` bounds every collective of the default group: a peer that died or hangs makes the
    waiting ranks fail after it (gloo raises; NCCL's watchdog aborts the communicator and, with
    asynchronous error handling on, ends the process), so the launcher sees the failure.
    `join_timeout_s` (default: the same) bounds how long the ranks wait for each other to join: each
    runs its input checks first, which take longer on some ranks than on others.
    """
    if not dist.is_initialized():
        backend = "nccl" if has_cuda() else "gloo"
        timeout = datetime.timedelta(seconds=max(timeout_s, join_timeout_s or 0))
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        _warn_if_restarts_share_the_agent_store()
        if "RANK" in os.environ:  # torchrun / SLURM launcher: env:// rendezvous
            if has_cuda():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend=backend, rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
        else:
            # plain `python ...`: a world of one on a private port. Launcher variables are NOT written
            # to os.environ, so subprocesses (torchrun, converters) do not mistake themselves for rank 0
            # of this world.
            if has_cuda():
                torch.cuda.set_device(0)
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1, timeout=timeout)
        if timeout.total_seconds() > timeout_s:  # joined: from now on a collective may wait timeout_s
            _set_group_timeout(datetime.timedelta(seconds=timeout_s))
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    if has_cuda():
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend()


def _set_group_timeout(timeout: datetime.timedelta, group=None) -> None:
    """The timeout of an existing group (default: the world). torch has it as the private
    _set_pg_timeout, which Megatron-Core's parallel_state.update_pg_timeout also calls (that one needs
    CUDA); without it the group keeps its longer join timeout, which is safe, only slower to fail."""
    setter = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if setter is None:
        log.warning("torch.distributed has no _set_pg_timeout: collectives keep the join timeout of %s", timeout)
        return
    setter(timeout, group)


def _warn_if_restarts_share_the_agent_store() -> None:
    """torchrun (c10d rendezvous) lets the workers' process groups share its own key-value store, and
    keeps it across restarts: the restarted group then reads the dead group's connection keys and fails
    to connect (pytorch/pytorch#135712, #167288; seen here with gloo). With
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment each attempt gets a fresh store."""
    if (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0 and os.environ.get("RANK") == "0"):
        log.warning("torchrun --max-restarts without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: a restarted group would "
                    "fail to connect (stale keys in torchrun's store); export it before torchrun (the examples/ "
                    "launchers do)")


def patient_group():
    """The gloo group of patient_barrier() (None in a world of one or before initialize()): for
    collectives whose ranks may wait long on other ranks' collective-free work."""
    return _patient_group


def patient_barrier() -> None:
    """A barrier for ranks that wait on one rank's long, collective-free work (rank 0 publishing a
    checkpoint or exporting the model): it runs on a gloo group whose timeout is initialize()'s
    `patient_timeout_s`, not the short collective timeout a slow export would trip. Every rank calls it."""
    if dist.get_world_size() > 1:
        dist.barrier(group=_patient_group)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch and Megatron's model-parallel RNG tracker reproducibly.

    The default generators get the same seed on every rank so CPU-initialised weights agree across
    TP ranks; Megatron's tracker then derives per-TP-rank streams for dropout from the seed.
    """
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def initialize(parallel: ParallelConfig, seed: int = 1234, collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
               patient_timeout_s: float = 3600.0) -> RuntimeInfo:
    """Start distributed, initialise Megatron-Core model-parallel groups, seed RNGs.

    `collective_timeout_s` is the timeout of every process group (the default one and all of
    Megatron-Core's, NCCL and gloo); `patient_timeout_s` that of patient_barrier()'s group and how long
    the ranks wait for each other to join the default group."""
    global _patient_group
    world_size_env = int(os.environ.get("WORLD_SIZE", "1"))
    validate_parallel_layout(parallel, dist.get_world_size() if dist.is_initialized() else world_size_env)
    if not has_cuda():
        cpu_compat.apply()
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads()))
    if not collective_timeout_s > 0:
        raise ValueError(f"collective timeout must be positive, got {collective_timeout_s}")
    rank, world_size, local_rank, backend = init_process_group(collective_timeout_s, join_timeout_s=patient_timeout_s)
    layout = Layout.from_config(parallel, world_size)

    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    vpp = layout.vpp
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=layout.cp,
        distributed_timeout_minutes=collective_timeout_s / 60,  # Megatron makes timedelta(minutes=...)
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
    )
    if _patient_group is None and world_size > 1:  # collective: every rank creates it, once per process
        _patient_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(
            seconds=max(patient_timeout_s, collective_timeout_s)))
    # our derivation and Megatron's must agree
    if (ps.get_data_parallel_world_size(), ps.get_expert_data_parallel_world_size()) != (layout.dp, layout.expert_dp):
        raise RuntimeError(f"internal: Megatron-Core's data-parallel sizes (dense {ps.get_data_parallel_world_size()}, "
                           f"experts {ps.get_expert_data_parallel_world_size()}) != {layout.describe()}")
    seed_everything(seed)
    device = current_device()
    info = RuntimeInfo(
        rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend,
        tp=layout.tp, pp=layout.pp, vpp=vpp, cp=layout.cp, dp=layout.dp, layout=layout,
        tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )
    if rank == 0:
        log.info("platform: %s on %s, %s", backend, device.type, layout.describe())
    return info


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    global _patient_group
    if dist.is_initialized():
        dist.barrier()
        _patient_group = None
        dist.destroy_process_group()
