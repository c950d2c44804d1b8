"""Which implementation the ops use: the CUDA extension, the CPU extension, or the PyTorch reference.

Decided once at import (probing per call breaks torch.compile): the compiled module
`megatron_spot._C` is imported if it was built, and its kernels are used for the devices it was
built for. The choice can be forced for the process with MEGATRON_SPOT_OPS_BACKEND=auto|cuda|cpu|reference
or per call with `backend=`. `active_backend(device)` says which one a call would use.
"""
from __future__ import annotations

import logging
import os

import torch

from . import reference

log = logging.getLogger("megatron_spot.ops")

BACKENDS = ("auto", "cuda", "cpu", "reference")
ENV_VAR = "MEGATRON_SPOT_OPS_BACKEND"

try:  # importing the module registers torch.ops.megatron_spot.* (TORCH_LIBRARY)
    from megatron_spot import _C  # type: ignore[attr-defined]

    EXT_LOADED = True
    EXT_CUDA = bool(getattr(_C, "CUDA_BUILT", 0))
    EXT_ERROR = None
except ImportError as exc:  # not built (MEGATRON_SPOT_EXT=none) or built against another torch
    _C = None
    EXT_LOADED = False
    EXT_CUDA = False
    EXT_ERROR = str(exc)


def _env_default() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {', '.join(BACKENDS)}")
    return value


DEFAULT = _env_default()
_logged: set[str] = set()


class _Ext:
    """The compiled ops (dispatched by device inside torch)."""

    name = "extension"

    @staticmethod
    def token_logprobs_stats(*a):
        return torch.ops.megatron_spot.token_logprobs_stats(*a)

    @staticmethod
    def token_logprobs_grad(*a):
        return torch.ops.megatron_spot.token_logprobs_grad(*a)

    @staticmethod
    def token_logprobs_grad_(*a):
        return torch.ops.megatron_spot.token_logprobs_grad_(*a)

    @staticmethod
    def pair_loss(*a):
        return torch.ops.megatron_spot.pair_loss(*a)

    @staticmethod
    def pair_loss_grad(*a):
        return torch.ops.megatron_spot.pair_loss_grad(*a)


def _unavailable(name: str) -> str:
    if not EXT_LOADED:
        why = f"megatron_spot._C is not importable ({EXT_ERROR}); build it with MEGATRON_SPOT_EXT={name} " \
              "pip install --no-deps --no-build-isolation -e ."
    else:
        why = "megatron_spot._C was built without CUDA (MEGATRON_SPOT_EXT=cpu or no nvcc/CUDA torch at build time)"
    return f"megatron_spot.ops backend {name!r} requested but unavailable: {why}"


def resolve(device: torch.device, requested: str | None = None) -> str:
    """Name of the implementation used for tensors on `device`: 'cuda', 'cpu' or 'reference'."""
    req = DEFAULT if requested is None else requested
    if req not in BACKENDS:
        raise ValueError(f"backend={req!r} is not one of {', '.join(BACKENDS)}")
    dev = device.type
    if req == "reference":
        return "reference"
    if req == "cuda":
        if not EXT_CUDA:
            raise RuntimeError(_unavailable("cuda"))
        if dev not in ("cuda", "meta"):
            raise RuntimeError(f"megatron_spot.ops backend 'cuda' requested for tensors on {device}")
        return "cuda"
    if req == "cpu":
        if not EXT_LOADED:
            raise RuntimeError(_unavailable("cpu"))
        if dev not in ("cpu", "meta"):
            raise RuntimeError(f"megatron_spot.ops backend 'cpu' requested for tensors on {device}")
        return "cpu"
    # auto
    if dev == "cuda" and EXT_CUDA:
        return "cuda"
    if dev == "cpu" and EXT_LOADED:
        return "cpu"
    if dev == "meta" and EXT_LOADED:
        return "cuda" if EXT_CUDA else "cpu"
    return "reference"


def impl_for(device: torch.device, requested: str | None = None):
    """(name, implementation namespace) for a call; logs the choice once per name."""
    name = resolve(device, requested)
    if name not in _logged and not torch.compiler.is_compiling():
        _logged.add(name)
        extra = "" if name != "reference" or not (EXT_ERROR or DEFAULT == "reference") else (
            f" (extension: {'forced off' if DEFAULT == 'reference' else EXT_ERROR})"
        )
        log.info("megatron_spot.ops: using the %s implementation for %s tensors%s", name, device.type, extra)
    return name, (reference if name == "reference" else _Ext)


def active_backend(device: torch.device | str = "cpu", backend: str | None = None) -> str:
    """Which implementation megatron_spot.ops uses for tensors on `device` ('cuda', 'cpu' or 'reference')."""
    return resolve(torch.device(device), backend)


def available_backends() -> tuple[str, ...]:
    names = ["reference"]
    if EXT_LOADED:
        names.insert(0, "cpu")
    if EXT_CUDA:
        names.insert(0, "cuda")
    return tuple(names)


def _register_fakes() -> None:
    """Meta/fake kernels so shapes trace (meta tensors, FakeTensor, torch.compile)."""
    if not EXT_LOADED:
        return

    @torch.library.register_fake("megatron_spot::token_logprobs_stats")
    def _stats_fake(logits, targets, vocab_start, valid_local, ignore_index):
        torch._check(logits.dim() == 2, lambda: "logits must be 2-D")
        return logits.new_empty((3, logits.shape[0]), dtype=reference.acc_dtype(logits.dtype))

    @torch.library.register_fake("megatron_spot::token_logprobs_grad")
    def _grad_fake(logits, targets, g, m, logs, vocab_start, valid_local, ignore_index):
        return torch.empty_like(logits)

    @torch.library.register_fake("megatron_spot::token_logprobs_grad_")
    def _grad_inplace_fake(logits, targets, g, m, logs, vocab_start, valid_local, ignore_index):
        return None

    @torch.library.register_fake("megatron_spot::pair_loss")
    def _pair_fake(token_logps, loss_mask, ref_logps, delta, beta, label_smoothing, weights):
        B = token_logps.shape[0] // 2
        return (
            token_logps.new_empty((len(reference.PAIR_OBJECTIVES), B)),
            token_logps.new_empty((2 * B,)),
            token_logps.new_empty((2 * B,)),
            token_logps.new_empty((2 * B,)),
        )

    @torch.library.register_fake("megatron_spot::pair_loss_grad")
    def _pair_grad_fake(grad_pair, coef, loss_mask):
        return torch.empty_like(loss_mask)


_register_fakes()
