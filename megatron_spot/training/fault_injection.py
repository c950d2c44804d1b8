"""Test-only fault injection: make one rank die or hang in the middle of a chosen training step.

The cluster-fault tests (tests/training/test_cluster_faults.py) set, for the training processes only,

    MEGATRON_SPOT_TEST_FAULT="<SIGNAL>:rank=<R>:step=<K>[:attempt=<A>]"

e.g. "SIGKILL:rank=1:step=3": global rank R sends itself SIGNAL (SIGKILL, SIGSTOP, ...) at the first
forward of training step K (1-based), i.e. after its batch was built and while its peers are inside
the step's collectives. It fires only in launcher attempt A (torchrun's TORCHELASTIC_RESTART_COUNT,
default 0), so the restarted group runs clean. This variable is read here and nowhere else; unset
(every real run) nothing is installed.
"""
from __future__ import annotations

import os
import signal
from typing import Callable

ENV = "MEGATRON_SPOT_TEST_FAULT"


def parse_fault(spec: str) -> tuple[signal.Signals, int, int, int]:
    """(signal, rank, step, attempt) of a MEGATRON_SPOT_TEST_FAULT value; ValueError naming it if malformed."""
    try:
        name, *fields = spec.split(":")
        values = dict(f.split("=", 1) for f in fields)
        sig = signal.Signals[name.upper()]
        rank, step = int(values.pop("rank")), int(values.pop("step"))
        attempt = int(values.pop("attempt", 0))
        if values:
            raise KeyError(", ".join(values))
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{ENV}={spec!r}: expected SIGNAL:rank=R:step=K[:attempt=A] ({exc})") from None
    return sig, rank, step, attempt


def arm_test_fault(model_chunks: list, rank: int, training_step: Callable[[], int]) -> None:
    """Install the fault of MEGATRON_SPOT_TEST_FAULT on this rank, if it names this rank and attempt.
    training_step() -> the number of the step being trained (1-based)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    sig, fault_rank, fault_step, attempt = parse_fault(spec)
    if fault_rank != rank or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) != attempt:
        return

    def fire(_module, _args):
        if training_step() == fault_step:
            os.kill(os.getpid(), sig)

    model_chunks[0].register_forward_pre_hook(fire)
