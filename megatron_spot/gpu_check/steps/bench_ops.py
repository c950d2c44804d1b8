"""The bench-ops step: forward + backward of the fused log-prob op against naive log_softmax + gather
and Megatron-Core's cross entropy (time, peak memory beyond the logits, bytes-moved model, error vs
fp64), and the fused linear loss head against GEMM + op."""
from __future__ import annotations

import json
import platform

from megatron_spot.gpu_check.plan import BENCH_DRY, BENCH_GPU


def _bytes_moved(impl: str, tokens: int, vocab: int, elem: int) -> int:
    """HBM traffic of forward+backward, the model of benchmarks/bench_ops.py's GPU estimate."""
    n, f32 = tokens * vocab * elem, tokens * vocab * 4
    low = elem < 4
    if impl == "fused":  # read once forward, once backward, write the gradient in place
        return 3 * n
    if impl == "naive":  # cast, log_softmax (2 reads + write), gather-backward zeros+scatter,
        return (n + f32) + 3 * f32 + (f32 + 3 * f32) + ((f32 + n) if low else 0)  # its backward, cast back
    # Megatron-Core: cast, max, subtract (r+w), exp (r+w), sum, divide (r+w); backward r+w + read; cast back
    return ((n + f32) if low else 0) + 7 * f32 + 3 * f32 + ((f32 + n) if low else 0)


class _Meter:
    """Time (CUDA events on a GPU, perf_counter on a CPU: platform.device.time_call) and the peak
    accelerator memory beyond a baseline (None on a CPU, whose allocator keeps no count)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def timed(self, fn):
        from megatron_spot.platform.device import time_call

        return time_call(fn)

    def mem_base(self):
        from megatron_spot.platform.device import allocated_memory_bytes, reset_peak_memory, synchronize

        if not self.cuda:
            return None
        synchronize()
        reset_peak_memory()
        return allocated_memory_bytes()

    def mem_extra(self, base):
        from megatron_spot.platform.device import peak_memory_bytes

        return None if base is None else peak_memory_bytes() - base


def _error_text(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _copy_bandwidth(cfg: dict, dev, meter: _Meter) -> float:
    """Bytes/s a read+write pass reaches on this device (the time model's denominator)."""
    import torch

    buf = torch.empty(min(2**28, max(cfg["tokens"]) * cfg["vocab"]), dtype=torch.float32, device=dev)
    dst = torch.empty_like(buf)
    dst.copy_(buf)
    best = min(meter.timed(lambda: dst.copy_(buf))[0] for _ in range(3))
    return 2 * buf.numel() * 4 / best


def _bench_op_case(impl: str, fn, logits, targets, exact, refill, reps: int, meter: _Meter) -> dict:
    """Forward + backward of one implementation at one shape: best time, peak extra, error vs fp64."""
    import torch

    tokens, _, vocab = logits.shape
    go = torch.ones(tokens, 1, device=logits.device)
    times, extra, diff = [], None, None
    for rep in range(reps + 1):  # repetition 0 warms up (kernel load, allocator)
        refill()
        x = logits.requires_grad_(True)
        base = meter.mem_base()

        def fwd_bwd():
            y = fn(x, targets)
            (g,) = torch.autograd.grad(y, x, go)
            return y.detach()

        t, y = meter.timed(fwd_bwd)
        if rep:
            times.append(t)
            extra = meter.mem_extra(base)
        diff = float((y.double() - exact).abs().max())
        del y
        logits.requires_grad_(False)
    return {"time_s": min(times), "times_s": times, "peak_extra_bytes": extra, "max_abs_diff": diff,
            "bytes_moved": _bytes_moved(impl, tokens, vocab, logits.element_size()),
            "logits_bytes": logits.numel() * logits.element_size()}


def child_bench_ops(p: dict) -> dict:
    import torch

    from megatron_spot import ops
    from megatron_spot.config.schema import ParallelConfig
    from megatron_spot.platform import initialize, shutdown
    from megatron_spot.platform.device import device_name, has_cuda, release_cached_memory

    cfg = BENCH_DRY if p["dry_run"] else BENCH_GPU
    info = initialize(ParallelConfig(), seed=0)  # Megatron's cross entropy needs its TP group
    dev = info.device
    cuda = has_cuda()
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    meter = _Meter(cuda)
    bandwidth = _copy_bandwidth(cfg, dev, meter)  # its buffers are freed before the logits are allocated
    impls = {
        "naive": lambda x, t: torch.log_softmax(x.float(), dim=-1).gather(-1, t[..., None]).squeeze(-1),
        "megatron": lambda x, t: -vocab_parallel_cross_entropy(x, t),
        # last: its in-place backward overwrites the logits (refilled before each repetition)
        "fused": lambda x, t: ops.token_logprobs(x, t, inplace_backward=True),
    }
    cases = []
    for tokens in cfg["tokens"]:
        for dtype in (torch.float32, torch.bfloat16):
            V = cfg["vocab"]
            gen = torch.Generator(device=dev)
            logits = torch.empty(tokens, 1, V, dtype=dtype, device=dev)
            targets = torch.randint(0, V, (tokens, 1), device=dev, generator=gen.manual_seed(1))

            def refill():
                with torch.no_grad():
                    logits.copy_(torch.randn(tokens, 1, V, device=dev, generator=gen.manual_seed(0)).mul_(2))

            refill()
            # the independent oracle: fp64 log_softmax + gather, chunked so it needs no fp64 logits copy
            with torch.no_grad():
                exact = torch.cat([torch.log_softmax(c.double(), -1).gather(-1, t[..., None]).squeeze(-1)
                                   for c, t in zip(logits.split(256), targets.split(256))])
            for impl, fn in impls.items():
                rec = {"impl": impl, "dtype": str(dtype).replace("torch.", ""), "tokens": tokens, "vocab": V}
                try:
                    rec.update(_bench_op_case(impl, fn, logits, targets, exact, refill, cfg["reps"], meter))
                    rec["predicted_s"] = rec["bytes_moved"] / bandwidth
                    if impl == "fused":
                        rec["backend"] = ops.active_backend(dev)
                except Exception as exc:  # OOM or a kernel error: record it, keep benchmarking
                    rec["error"] = _error_text(exc)
                    logits.requires_grad_(False)
                    release_cached_memory()
                cases.append(rec)
                print(json.dumps(rec), flush=True)
            logits = exact = None  # free this shape's buffers before the next, larger one
    res = {"device": f"{dev} ({device_name() or platform.processor() or 'CPU'})",
           "timer": "CUDA events" if cuda else "perf_counter", "reps": cfg["reps"],
           "memory_source": "torch.cuda.max_memory_allocated" if cuda else "n/a on CPU",
           "copy_bandwidth_gbs": bandwidth / 1e9, "cases": cases,
           "linear_head": _bench_linear_head(cfg, dev, cuda, meter)}
    shutdown()
    return res


def _bench_linear_head(cfg, dev, cuda, meter: _Meter) -> dict:
    """The fused linear loss head (issue 12) against output GEMM + fused op and GEMM + Megatron CE."""
    import torch
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_spot import ops
    from megatron_spot.platform.device import release_cached_memory

    from megatron_spot.ops.linear_token_logprobs import default_chunk_size, default_vocab_chunk_size

    H, V = cfg["hidden"], cfg["vocab"]
    # both chunk layouts at the default budget: plan_chunks picks vocabulary chunks below V tokens on the
    # argument that they re-read [T, H] instead of the [V, H] weight-gradient accumulator; this measures it
    impls = {
        "linear_token_logprobs, vocabulary chunks": lambda h, w, t: ops.linear_token_logprobs(
            h, w, t, vocab_chunk_size=default_vocab_chunk_size(t.numel(), h.dtype)),
        "linear_token_logprobs, token chunks": lambda h, w, t: ops.linear_token_logprobs(
            h, w, t, chunk_size=default_chunk_size(w.shape[0], h.dtype)),
        "GEMM + token_logprobs": lambda h, w, t: ops.token_logprobs(torch.matmul(h, w.t()), t, inplace_backward=True),
        "GEMM + Megatron-Core CE": lambda h, w, t: -vocab_parallel_cross_entropy(torch.matmul(h, w.t()), t),
    }
    cases = []
    for tokens in cfg["tokens"]:
        dtype = torch.bfloat16
        gen = torch.Generator(device=dev).manual_seed(0)
        hidden = torch.randn(tokens, 1, H, device=dev, generator=gen).to(dtype).requires_grad_(True)
        weight = (torch.randn(V, H, device=dev, generator=gen) * H**-0.5).to(dtype).requires_grad_(True)
        targets = torch.randint(0, V, (tokens, 1), device=dev, generator=gen)
        go = torch.ones(tokens, 1, device=dev)
        for impl, fn in impls.items():
            rec = {"impl": impl, "dtype": "bfloat16", "tokens": tokens, "hidden": H, "vocab": V}
            try:
                times, extra = [], None
                for rep in range(cfg["reps"] + 1):
                    base = meter.mem_base()
                    t, _ = meter.timed(lambda: torch.autograd.grad(fn(hidden, weight, targets), (hidden, weight), go))
                    if rep:
                        times.append(t)
                        extra = meter.mem_extra(base)
                rec.update(time_s=min(times), peak_extra_bytes=extra)
            except Exception as exc:
                rec["error"] = _error_text(exc)
                release_cached_memory()
            cases.append(rec)
            print(json.dumps(rec), flush=True)
    return {"note": f"fused linear head, bf16, hidden {H}: forward + backward (both GEMM gradients included); "
                    "peak extra counts the gradients of hidden and weight as well", "cases": cases}
