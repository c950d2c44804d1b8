"""One run plan for training, reference scoring and profiling: the layout and the micro-batch counts,
derived and validated once, before any process group or allocation.

``plan_run(cfg, world_size, model=...)`` = platform/layout.py's ``Layout.from_config`` (world-size rules,
DP derived) + the model's fit (models/: heads / KV groups by TP, layers by PP x VPP, precision and
platform) + the batch arithmetic (global batch = micro-batch x DP x micro-batches). Callers read
``plan.layout.dp`` and ``plan.micro_batches_per_step``; nobody divides the world size by hand.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_spot.config.loader import ConfigError
from megatron_spot.platform.layout import Layout


@dataclass(frozen=True)
class RunPlan:
    layout: Layout
    micro_batch_size: int  # pairs per micro-batch (per DP rank; a packed row holds a variable number)
    micro_batches_per_step: Optional[int]  # per DP rank per optimizer step; None when the run has no steps (scoring)

    @property
    def pairs_per_step(self) -> Optional[int]:
        if self.micro_batches_per_step is None:
            return None
        return self.micro_batch_size * self.layout.dp * self.micro_batches_per_step


def plan_run(cfg, world_size: int, model=None, optimizer_steps: bool = True, training_rules: bool = True) -> RunPlan:
    """The run's Layout and micro-batch counts; one-line ConfigErrors naming the setting.

    cfg: a TrainConfig (parallel, precision, recompute, data). model: the family config when known (its fit to
    the layout is checked). optimizer_steps: False for runs without optimizer steps (reference scoring), which
    have no global batch and no micro-batch count (and forward-only layout rules). training_rules: False to skip
    the rules only training has, where the caller checks them itself (the profiler predicting for GPUs).
    """
    layout = Layout.from_config(cfg.parallel, world_size)
    if model is not None:
        from megatron_spot.models import validate_model_layout

        validate_model_layout(model, cfg.parallel, cfg.precision, cfg.recompute,
                              training=optimizer_steps and training_rules)
    mbs = cfg.data.micro_batch_size
    if not isinstance(mbs, int) or mbs < 1:
        raise ConfigError(f"data.micro_batch_size={mbs} must be an integer >= 1")
    seq = cfg.data.seq_length
    if not isinstance(seq, int) or seq < 1:  # also what a profile of a recipe takes as --seq-length
        raise ConfigError(f"data.seq_length={seq} must be an integer >= 1")
    if not optimizer_steps:
        return RunPlan(layout, mbs, None)
    global_batch_size = cfg.data.global_batch_size
    per_step = mbs * layout.dp
    if global_batch_size < 1 or global_batch_size % per_step:
        raise ConfigError(f"data.global_batch_size={global_batch_size} is not a multiple of "
                          f"micro_batch_size x data-parallel size = {mbs} x {layout.dp}")
    num_mb = global_batch_size // per_step
    if layout.vpp and num_mb < layout.pp:
        raise ConfigError(f"the interleaved pipeline needs at least pipeline_parallel={layout.pp} "
                          f"micro-batches per step, got {num_mb} (global_batch_size / (micro_batch_size x DP)); "
                          "raise data.global_batch_size or lower data.micro_batch_size")
    return RunPlan(layout, mbs, num_mb)


def validate_packing(cfg, dataset, te_available: bool) -> None:
    """data.packing / parallel.context_parallel against the pack (training and scoring); one-line ConfigErrors."""
    from megatron_spot.data.packing import pair_token_counts

    d, cp = cfg.data, cfg.parallel.context_parallel
    if cp > 1 and not d.packing:
        raise ConfigError(f"parallel.context_parallel={cp} splits packed rows across ranks: set data.packing=true")
    if cp > 1 and not te_available:
        raise ConfigError(f"parallel.context_parallel={cp} needs Transformer Engine attention on CUDA GPUs "
                          "(not available here); set parallel.context_parallel=1")
    if not d.packing:
        return
    largest = int(pair_token_counts(dataset, d.seq_length).max())
    if d.max_tokens_per_micro_batch < largest:
        raise ConfigError(f"data.max_tokens_per_micro_batch={d.max_tokens_per_micro_batch} is smaller than the "
                          f"largest pair of {cfg.data.pack} ({largest} tokens, chosen + rejected with the prompt "
                          f"twice): raise it to at least {largest}")
    if cp > 1 and d.pad_to_multiple_of % (2 * cp):
        raise ConfigError(f"data.pad_to_multiple_of={d.pad_to_multiple_of} must be a multiple of "
                          f"2 x context_parallel = {2 * cp} (each packed sequence is split in 2 x CP chunks)")
