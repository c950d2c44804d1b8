"""The ONE place that knows Megatron-Core hard-codes CUDA.

Megatron-Core creates tensors with ``device="cuda"`` / ``torch.cuda.current_device()``, seeds and
forks the CUDA RNG, synchronises CUDA streams and asserts ``param.grad.type() ==
'torch.cuda.FloatTensor'``. On a machine without CUDA every one of those raises. Instead of forking
megatron's modules, :func:`apply` (called by :mod:`megatron_spot.platform` only when
``torch.cuda.is_available()`` is False) makes the same Python code run on the CPU:

1. a process-wide ``TorchFunctionMode`` rewrites CUDA device arguments (``device="cuda"``,
   ``device=0``, ``.to("cuda")``, ``.cuda()``) to the CPU, drops ``pin_memory``, and reports
   ``Tensor.type()`` with a ``torch.cuda.`` prefix for megatron's grad-type asserts;
2. no-op stand-ins on ``torch.cuda`` for devices, streams, events, synchronisation and memory stats;
3. the CUDA RNG API (and megatron's private CUDA RNG helpers) mapped onto the CPU default generator,
   so megatron's RNG tracker forks/restores the CPU generator exactly as it would the CUDA one;
4. the mode re-entered inside autograd's backward (a TorchFunctionMode is not carried into
   ``autograd.Function.backward``, where activation recompute reruns the forward);
5. the MoE all-to-all dispatcher's device-to-host copy of its split sizes (see
   :func:`_patch_megatron_moe`).

It never runs when CUDA is available, so GPU behaviour is untouched.
Set ``MEGATRON_SPOT_CPU_COMPAT_TRACE=1`` to log the first hit of each rewritten call site: after a
megatron upgrade that is how new CUDA call sites are found.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
import traceback

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_APPLIED = False
_MODE: "_CpuDeviceMode | None" = None
_TRACE = os.environ.get("MEGATRON_SPOT_CPU_COMPAT_TRACE", "0") not in ("", "0")
_TRACED_SITES: set[str] = set()

_TO_FUNCS = {torch.Tensor.to, torch.Tensor.cuda}


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # a bare index means a CUDA device in torch's API
    return False


def _trace(what: str) -> None:
    if not _TRACE:
        return
    for frame in reversed(traceback.extract_stack()[:-3]):
        if "megatron" in frame.filename and "cpu_compat" not in frame.filename:
            site = f"{frame.filename}:{frame.lineno}"
            if site not in _TRACED_SITES:
                _TRACED_SITES.add(site)
                log.warning("cpu_compat: %s at %s", what, site)
            return


class _CpuDeviceMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            _trace(f"device={kwargs['device']!r}")
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.cuda:
            _trace(".cuda()")
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            _trace(".to(cuda)")
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron asserts grad.type() == 'torch.cuda.FloatTensor' in its optimizer paths
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        return func(*args, **kwargs)


class _NoOpStream:
    def __init__(self, *args, **kwargs):
        self.device = torch.device("cpu")

    def wait_stream(self, *_a, **_k):
        pass

    def wait_event(self, *_a, **_k):
        pass

    def record_event(self, event=None):
        event = event or _TimingEvent()
        event.record()
        return event

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _TimingEvent:
    """CUDA Event stand-in that records perf_counter, so megatron's timers still measure time."""

    def __init__(self, *args, **kwargs):
        self._t = None

    def record(self, stream=None):
        self._t = time.perf_counter()

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def elapsed_time(self, end: "_TimingEvent") -> float:
        return (end._t - self._t) * 1000.0


def _stub_torch_cuda() -> None:
    cuda = torch.cuda

    # One function object per stub: torch._dynamo keys its trace rules by function identity.
    def zero():
        return lambda *a, **k: 0

    def noop():
        return lambda *a, **k: None

    cuda.current_device = zero()
    cuda.set_device = noop()
    cuda.synchronize = noop()
    cuda.empty_cache = noop()
    cuda.ipc_collect = noop()
    cuda.memory_allocated = zero()
    cuda.max_memory_allocated = zero()
    cuda.memory_reserved = zero()
    cuda.max_memory_reserved = zero()
    cuda.reset_peak_memory_stats = noop()
    cuda.reset_max_memory_allocated = noop()
    cuda.memory_stats = lambda *a, **k: {}
    cuda.Stream = _NoOpStream
    cuda.Event = _TimingEvent
    _default = _NoOpStream()
    cuda.current_stream = lambda *a, **k: _default
    cuda.default_stream = lambda *a, **k: _default
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.device = lambda *a, **k: contextlib.nullcontext()
    cuda.nvtx.range_push = noop()
    cuda.nvtx.range_pop = noop()
    # RNG: the CUDA generator becomes the CPU default generator. manual_seed must not call
    # torch.manual_seed, which itself calls torch.cuda.manual_seed_all (infinite recursion).
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.get_rng_state = lambda *a, **k: torch.default_generator.get_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.default_generator.set_state(state)
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    cuda.get_rng_state_all = lambda: [torch.default_generator.get_state()]
    cuda.set_rng_state_all = lambda states: torch.default_generator.set_state(states[0])


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device="cuda", clone=False, graph_safe=False):
        state = torch.default_generator.get_state()
        return state.clone() if clone else state

    def set_state(new_state, device=-1, graph_safe=False):
        torch.default_generator.set_state(new_state)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state


def _patch_megatron_moe() -> None:
    """The all-to-all token dispatcher (expert parallel) on CPU tensors.

    At its device-to-host point MoEAlltoAllTokenDispatcher turns the all-to-all split sizes into
    NumPy arrays with ``maybe_move_tensor_to_cpu(t, as_numpy=True)``, which converts only tensors
    that are on CUDA. On the CPU they stay tensors, and ``all_to_all_single`` refuses a tensor as
    split sizes. The stand-in converts CPU tensors too when NumPy is asked for. (The router's
    ``.to(torch.cuda.current_device())``, the dispatcher's ``torch.cuda.Stream()`` and
    ``_AllToAll``'s ``device=torch.cuda.current_device()`` outputs are already handled by 1. and 2.)
    """
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            _trace("MoE split sizes as NumPy")
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _reenter_mode_in_backward() -> None:
    backward_cls = torch.autograd.function.BackwardCFunction
    original_apply = backward_cls.apply

    def apply(self, *args):
        if _MODE is None or torch.overrides._get_current_function_mode() is not None:
            return original_apply(self, *args)
        with _CpuDeviceMode():
            return original_apply(self, *args)

    backward_cls.apply = apply


def apply() -> bool:
    """Make Megatron-Core run on the CPU. Idempotent. Returns False (and does nothing) with CUDA."""
    global _APPLIED, _MODE
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    try:  # build dynamo's rule map from the real torch.cuda functions before they are replaced
        from torch._dynamo import trace_rules

        trace_rules.get_torch_obj_rule_map()
    except Exception:  # pragma: no cover - dynamo internals moved; unique stubs still avoid clashes
        pass
    _stub_torch_cuda()
    _patch_megatron_rng()
    _patch_megatron_moe()
    _reenter_mode_in_backward()
    _MODE = _CpuDeviceMode()
    _MODE.__enter__()  # process-wide: entered once, never exited
    _APPLIED = True
    log.info("cpu_compat: Megatron-Core CUDA call sites redirected to the CPU")
    return True


def is_applied() -> bool:
    return _APPLIED
