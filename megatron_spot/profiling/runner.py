"""The profiling runner: N training steps of the real Engine on synthetic pairs, timed and measured.

Time split uses Megatron-Core's own timers (``config.timers``): 'forward-compute' and
'backward-compute' around each micro-batch's forward/backward, the pipeline p2p timers
('forward-recv', 'backward-send-forward-recv', ...), 'all-grads-sync' (DP gradient reduce in
finalize_model_grads) and the optimizer's 'params-all-gather'. The Timers object is handed to the
Engine (``Engine(..., timers=)``), which times the SPoT loss ('loss-compute', inside Megatron's
forward-compute window, so it is subtracted from forward) and 'optimizer-step'; nothing is patched. Pipeline p2p
time on a rank is mostly *waiting for the neighbour stage* -- that is the bubble (plus stage
imbalance); the transfer itself is small next to it. TP all-reduces run inside forward/backward
compute and are counted there.
"""
from __future__ import annotations

import contextlib
import logging
import os
import resource
from typing import Optional

import torch
import torch.distributed as dist

from megatron_spot.config.schema import TrainConfig
from megatron_spot.models.gpt.config import GPTConfig
from megatron_spot.profiling import analytical
from megatron_spot.ops.token_logprobs import IGNORE_INDEX
from megatron_spot.platform.device import peak_memory_bytes, reset_peak_memory
from megatron_spot.profiling.hardware import current_gpu_name, measure_cpu_matmul_tflops, peak_tflops

log = logging.getLogger("megatron_spot.profile")

_P2P = ("forward-recv", "backward-recv", "forward-send", "backward-send", "forward-send-backward-recv",
        "backward-send-forward-recv", "forward-send-forward-recv", "backward-send-backward-recv",
        "forward-backward-send-forward-backward-recv")
_COMM = ("all-grads-sync", "params-all-gather", "embedding-grads-all-reduce",
         "non-tensor-parallel-grads-all-reduce")


def synthetic_micro_batches(num: int, pairs: int, seq_length: int, vocab: int, seed: int,
                            device: torch.device) -> list[dict]:
    """Full-length pairs (no padding, so every position is a real token): a shared prompt of half the
    sequence and different responses; the engine's micro-batch layout (chosen rows, then rejected)."""
    g = torch.Generator().manual_seed(seed)
    prompt = max(1, seq_length // 2)
    out = []
    for _ in range(num):
        rows = 2 * pairs
        tokens = torch.randint(2, vocab, (rows, seq_length), generator=g)
        tokens[pairs:, :prompt] = tokens[:pairs, :prompt]
        labels = torch.full((rows, seq_length), IGNORE_INDEX, dtype=torch.long)
        labels[:, prompt - 1:-1] = tokens[:, prompt:]
        loss_mask = (labels != IGNORE_INDEX).float()
        out.append({
            "tokens": tokens.to(device), "labels": labels.to(device), "loss_mask": loss_mask.to(device),
            "position_ids": torch.arange(seq_length).unsqueeze(0).expand(rows, seq_length).contiguous().to(device),
            "attention_tokens": rows * seq_length,
            "ref_logps": (-torch.rand(rows, generator=g) * 5 - 20.0).to(device),
        })
    return out


class SavedActivationTracker:
    """Peak bytes of tensors autograd keeps for backward (activations), parameters excluded.

    Storages are deduplicated (views of one buffer count once) and released when autograd drops them.
    """

    def __init__(self, params):
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in params}
        self.live: dict[int, list] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key):
        rec = self.live.get(key)
        if rec is None:
            return
        rec[1] -= 1
        if rec[1] == 0:
            self.current -= rec[0]
            del self.live[key]

    def pack(self, t):
        if t.device.type == "meta":
            return t
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self.param_ptrs or key == 0:
            return t
        if key in self.live:
            self.live[key][1] += 1
        else:
            self.live[key] = [st.nbytes(), 1]
            self.current += st.nbytes()
            self.peak = max(self.peak, self.current)
        return _Handle(t, self, key)

    @staticmethod
    def unpack(h):
        return h.t if isinstance(h, _Handle) else h

    def context(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Handle:
    __slots__ = ("t", "tracker", "key")

    def __init__(self, t, tracker, key):
        self.t, self.tracker, self.key = t, tracker, key

    def __del__(self):
        self.tracker._release(self.key)


def model_state_bytes_measured(engine) -> dict:
    """Bytes of this rank's model weights, DDP gradient buffers and optimizer states (fp32 main params,
    Adam moments), read off the built objects."""
    weights = sum(p.numel() * p.element_size() for m in engine.model for p in m.parameters())
    grads = 0
    for m in engine.model:
        for buf in list(getattr(m, "buffers", [])) + list(getattr(m, "expert_parallel_buffers", [])):
            grads += buf.grad_data.numel() * buf.grad_data.element_size()
    opt = 0
    seen = set()
    opts = getattr(engine.optimizer, "chained_optimizers", [engine.optimizer])
    for o in opts:
        inner = getattr(o, "optimizer", o)
        for state in inner.state.values():
            for v in state.values():
                if torch.is_tensor(v) and v.numel() > 1 and v.untyped_storage().data_ptr() not in seen:
                    seen.add(v.untyped_storage().data_ptr())
                    opt += v.numel() * v.element_size()
        for group in getattr(o, "shard_fp32_from_float16_groups", []) or []:
            for p in group:
                if p.untyped_storage().data_ptr() not in seen:
                    seen.add(p.untyped_storage().data_ptr())
                    opt += p.numel() * p.element_size()
    return {"weights": int(weights), "grads": int(grads), "optimizer": int(opt)}


def _make_timers():
    """Megatron-Core's Timers at log level 2 (every timer its schedules and optimizer know), handed to the
    Engine, which also times 'loss-compute' and 'optimizer-step' into them."""
    from megatron.core.timers import Timers

    return Timers(2, "max")


def _read_split(timers, step_time: float) -> dict:
    def take(name):
        t = timers._timers.get(name)
        return t.elapsed(reset=True) if t is not None else 0.0

    fwd, bwd = take("forward-compute"), take("backward-compute")
    p2p = sum(take(n) for n in _P2P)
    gather = take("params-all-gather")  # inside optimizer.step
    comm = gather + sum(take(n) for n in _COMM)
    loss, opt = take("loss-compute"), take("optimizer-step")
    for name in list(timers._timers):
        take(name)
    split = {"forward_s": max(0.0, fwd - loss), "loss_s": loss, "backward_s": bwd, "pipeline_bubble_s": p2p,
             "communication_s": comm, "optimizer_s": max(0.0, opt - gather)}
    split["other_s"] = max(0.0, step_time - sum(split.values()))
    return split


def run_profile(cfg: TrainConfig, model_cfg: GPTConfig, steps: int, warmup_steps: int = 1,
                num_micro_batches: int = 1, trace_dir: Optional[str] = None,
                trace_steps: Optional[tuple[int, int]] = None, gpu: Optional[str] = None,
                count_flops: bool = True, seed: int = 1234, progress: bool = False) -> dict:
    """Initialise the platform, build the Engine, run warmup + `steps` steps; rank-0 gets the report."""

    from megatron_spot.platform import initialize
    from megatron_spot.training.engine import Engine

    info = initialize(cfg.parallel, seed)
    fp8 = bool(cfg.precision.fp8)
    timers = _make_timers()
    engine = Engine(cfg, model_cfg, total_steps=steps + warmup_steps + 1, timers=timers)
    device = engine.device
    L, pairs = cfg.data.seq_length, cfg.data.micro_batch_size
    layout = analytical.StepShape(
        tp=info.tp, pp=info.pp, vpp=info.vpp, dp=info.dp, ep=info.layout.ep if info.layout else 1,
        etp=info.layout.etp if info.layout else None,
        micro_batch_size=pairs,
        num_micro_batches=num_micro_batches, seq_length=L, dtype=cfg.precision.dtype, fp8=fp8,
        recompute=cfg.recompute.granularity, sequence_parallel=cfg.parallel.sequence_parallel,
        distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        flash_attention=False,  # local spec: unfused attention (TE on GPU would use fused attention)
        fused_linear_loss=cfg.model.fused_linear_loss,
    )
    from megatron_spot.platform.device import transformer_engine_available

    layout.flash_attention = transformer_engine_available()
    if info.is_cuda:
        gpu = gpu or current_gpu_name()
        peak = peak_tflops(gpu, fp8) if gpu else None
        peak_source = f"{gpu} dense {'FP8' if fp8 else 'BF16'} peak" if gpu else "unknown GPU (pass --gpu)"
    else:
        peak = measure_cpu_matmul_tflops(dtype=torch.float32)
        peak_source = f"measured fp32 matmul peak of this process ({torch.get_num_threads()} threads)"
    pred = analytical.predict(model_cfg, layout, peak_tflops=peak, assumed_mfu=1.0 if peak else None,
                              vocab=model_cfg.padded_vocab_size)

    def batches(step):
        return synthetic_micro_batches(num_micro_batches, pairs, L, model_cfg.vocab_size,
                                       seed=seed + 1000 * step + info.dp_rank, device=device)

    # warmup (not reported)
    for s in range(warmup_steps):
        engine.train_step(batches(s))
    _read_split(timers, 0.0)
    reset_peak_memory()

    prof = None
    if trace_dir:
        from torch.profiler import ProfilerActivity, profile, schedule

        a, b = trace_steps or (0, min(steps, 2))
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if info.is_cuda else [])
        os.makedirs(trace_dir, exist_ok=True)

        def on_ready(p):
            p.export_chrome_trace(os.path.join(trace_dir, f"trace_rank{info.rank}.json"))

        prof = profile(activities=acts, schedule=schedule(wait=a, warmup=0, active=max(1, b - a), repeat=1),
                       on_trace_ready=on_ready, record_shapes=False)
        prof.__enter__()

    tracker = SavedActivationTracker([p for m in engine.model for p in m.parameters()])
    per_step = []
    for s in range(steps):
        mbs = batches(warmup_steps + s)
        ctx = tracker.context() if s == 0 else contextlib.nullcontext()
        dist.barrier()
        with ctx:
            m = engine.train_step(mbs)
        split = _read_split(timers, m["step_time_s"])
        per_step.append({"step": s, "step_time_s": m["step_time_s"], "tokens": m["tokens"], "loss": m["loss"],
                         **split})
        if prof is not None:
            prof.step()
        if progress and info.rank == 0:
            log.info("step %d/%d: %.3f s, loss %.4f", s + 1, steps, m["step_time_s"], m["loss"])
    if prof is not None:
        prof.__exit__(None, None, None)

    measured_flops = None
    if count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            engine.train_step(batches(10_000))
        t = torch.tensor([float(fc.get_total_flops())], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        measured_flops = float(t.item())

    states = model_state_bytes_measured(engine)
    act_peak = tracker.peak
    if info.is_cuda:
        peak_mem = peak_memory_bytes()
        mem_source = "torch.cuda.max_memory_allocated"
    else:
        peak_mem = states["weights"] + states["grads"] + states["optimizer"] + act_peak
        mem_source = "model states + peak saved activations (tensor sizes; CPU has no allocator counter)"
    rss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    local = {"rank": info.rank, "tp_rank": info.tp_rank, "pp_rank": info.pp_rank, "dp_rank": info.dp_rank,
             "peak_memory_bytes": peak_mem, "activation_bytes": act_peak, "rss_bytes": rss, **states,
             "split": {k: sum(r[k] for r in per_step) / len(per_step) for k in per_step[0] if k.endswith("_s") and k != "step_time_s"},
             "peak_tflops": peak}
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, local)
    report = None
    if info.rank == 0:
        report = _aggregate(per_step, gathered, pred, layout, model_cfg, measured_flops, peak, peak_source,
                            mem_source, info,
                            fused_head=cfg.model.fused_linear_loss)
    engine_done = engine  # keep alive until all ranks reported
    dist.barrier()
    del engine_done
    return report


def _aggregate(per_step, ranks, pred, layout, model_cfg, measured_flops, peak, peak_source, mem_source, info,
               fused_head: bool = False) -> dict:
    world = info.world_size
    model_flops = pred.flops_per_step
    steps = []
    for r in per_step:
        t = r["step_time_s"]
        tf = model_flops / t / world / 1e12
        steps.append({**r, "tokens_per_s": r["tokens"] / t, "tokens_per_s_per_device": r["tokens"] / t / world,
                      "tflops_per_device": tf, "mfu": tf / peak if peak else None})
    mean_t = sum(r["step_time_s"] for r in per_step) / len(per_step)
    tokens = per_step[0]["tokens"]
    tflops = model_flops / mean_t / world / 1e12
    # the rank-mean time split (each rank's own forward/backward/bubble...)
    keys = list(ranks[0]["split"])
    split = {k: sum(r["split"][k] for r in ranks) / world for k in keys}
    peak_rank = max(ranks, key=lambda r: r["peak_memory_bytes"])
    pm = pred.memory["peak"]
    return {
        "preset_layers": model_cfg.num_hidden_layers, "layout": pred.layout, "world_size": world,
        "steps": steps, "step_time_s": mean_t, "tokens_per_step": tokens,
        "tokens_per_s": tokens / mean_t, "tokens_per_s_per_device": tokens / mean_t / world,
        "tflops_per_device": tflops, "mfu": tflops / peak if peak else None,
        "peak_tflops_per_device": peak, "peak_source": peak_source,
        "time_split_s": split,
        "flops_per_step": {"measured": measured_flops, "predicted": pred.executed_flops_per_step,
                           "model": model_flops,
                           "measured_by": "torch.utils.flop_counter.FlopCounterMode over one extra step, summed over ranks"
                                          + (" (fused loss head: prompt tokens skipped, one GEMM inside a custom op "
                                             "not seen; below the analytical count by design)"
                                             if fused_head else "")},
        "peak_memory_bytes": {"measured": peak_rank["peak_memory_bytes"], "predicted": pm["total"],
                              "measured_by": mem_source},
        "memory_per_rank": [{k: r[k] for k in ("rank", "tp_rank", "pp_rank", "dp_rank", "weights", "grads",
                                               "optimizer", "activation_bytes", "peak_memory_bytes", "rss_bytes")}
                            for r in ranks],
        "predicted": {"memory_stages": pred.memory["stages"], "bubble_fraction": pred.bubble_fraction,
                      "bubble_share_of_step": analytical.bubble_share_of_step(layout.pp, layout.num_micro_batches,
                                                                              layout.vpp),
                      "step_time_s_at_peak": pred.step_time_s},
    }
