"""The Megatron-Core side of training: model chunks under DDP, optimizer, LR schedule, and one step.

`Engine.train_step` runs Megatron-Core's pipeline schedule (`get_forward_backward_func`) over this
rank's micro-batches with the SPoT loss on the last stage, reduces gradients with
`finalize_model_grads`, clips and steps the (distributed) optimizer. `Engine.sequence_logps` is the
same forward without gradients, used to score reference log-probs.
"""
from __future__ import annotations

import contextlib
import math
import time
from functools import partial
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_spot.config.schema import TrainConfig
from megatron_spot.models import GPTConfig, build_model_chunks, build_transformer_config
from megatron_spot.platform.device import current_device


class Engine:
    def __init__(self, cfg: TrainConfig, model_cfg: GPTConfig, total_steps: int,
                 load_weights: Optional[Callable[[list], None]] = None, trainable: bool = True, timers=None):
        """timers: an optional megatron.core.timers.Timers (the profiler's). Megatron-Core's schedules and
        optimizer time themselves into it ('forward-compute', p2p, 'params-all-gather', ...); the engine adds
        'loss-compute' (inside forward-compute) and 'optimizer-step'. None: nothing is timed."""
        from megatron.core import parallel_state as ps

        self.cfg = cfg
        self.timers = timers
        self.model_cfg = model_cfg
        self.total_steps = max(1, total_steps)
        self.transformer_config = build_transformer_config(model_cfg, cfg.parallel, cfg.precision, cfg.recompute,
                                                           moe=cfg.moe, training=trainable)
        if timers is not None:
            self.transformer_config.timers = timers
        self.packing = bool(cfg.data.packing)
        if self.packing:
            # Packed micro-batches hold different numbers of pairs: the loss function returns each
            # micro-batch's SUM over pairs and its pair count, and Megatron-Core divides the gradients
            # by the step's total pair count over all DP ranks (finalize_model_grads) instead of
            # averaging per micro-batch and per rank. Rows also differ in length from one micro-batch
            # to the next, so pipeline stages exchange shapes.
            self.transformer_config.calculate_per_token_loss = True
            self.transformer_config.variable_seq_lengths = True
        chunks = build_model_chunks(model_cfg, self.transformer_config, max_sequence_length=cfg.model.max_sequence_length,
                                    fused_linear_loss=cfg.model.fused_linear_loss)  # the config's loss head
        if load_weights is not None:
            load_weights(chunks)  # before the optimizer copies fp32 main params from the model
        # mixture of experts: which module runs the experts (TEGroupedMLP or SequentialMLP, `moe.experts`)
        # (None on a pipeline stage without MoE layers)
        self.experts_module = next((type(layer.mlp.experts).__name__ for chunk in chunks
                                    for layer in chunk.decoder.layers if hasattr(layer.mlp, "experts")), None)
        self.moe_metrics = None  # mixture of experts: load-balancing loss and expert load of each step
        if trainable and model_cfg.num_moe_experts:
            from megatron_spot.training.moe_metrics import MoEStepMetrics

            self.moe_metrics = MoEStepMetrics(chunks, model_cfg.num_hidden_layers, model_cfg.num_moe_experts,
                                              sequence_parallel=cfg.parallel.sequence_parallel,
                                              moe_layer_freq=self.transformer_config.moe_layer_freq)
        self.device = current_device()
        self.pp_last = ps.is_pipeline_last_stage(ignore_virtual=True)
        self.pp_first = ps.is_pipeline_first_stage(ignore_virtual=True)
        self.loss_fn = None
        if not trainable:
            for chunk in chunks:
                chunk.eval()
                chunk.requires_grad_(False)
            self.model, self.optimizer, self.scheduler = chunks, None, None
            return
        self.model = self._wrap(chunks)
        self.optimizer = self._build_optimizer()
        if timers is not None:
            for o in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
                if getattr(o, "config", None) is not None:
                    o.config.timers = timers
        self.scheduler = self._build_scheduler()
        from megatron_spot.losses import SpotLoss

        self.loss_fn = SpotLoss(cfg.loss.objective, beta=cfg.loss.beta, label_smoothing=cfg.loss.label_smoothing,
                                dp_group=ps.get_data_parallel_group())
        from megatron.core.distributed import finalize_model_grads

        tc = self.transformer_config
        tc.grad_scale_func = self.optimizer.scale_loss
        tc.finalize_model_grads_func = finalize_model_grads
        if self.packing and model_cfg.num_moe_experts and (tc.moe_aux_loss_coeff or tc.moe_z_loss_coeff):
            # Megatron-Core's per-token-loss path (calculate_per_token_loss, set above) multiplies each router's
            # load-balancing and z-losses by its micro-batch's non-padding token count and expects
            # finalize_model_grads to divide the gradients by the step's token count. Our packed loss counts
            # pairs, which left these losses' gradients tokens-per-pair times too strong (41x in the PP2 test
            # run: 326 tokens, 8 pairs). Scaled by the step's pairs / tokens, each micro-batch's loss weighs its
            # share of the step's tokens (1 / (micro-batches x DP) when all hold as many, as unpacked rows do).
            self._moe_pairs_per_token = 1.0
            tc.moe_grad_scale_func = self._moe_loss_scale
        if cfg.parallel.overlap_grad_reduce:
            no_sync = [m.no_sync for m in self.model]
            tc.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        if cfg.parallel.overlap_param_gather and cfg.parallel.use_distributed_optimizer:
            tc.param_sync_func = [m.start_param_sync for m in self.model]
            if len(self.model) == 1:
                tc.param_sync_func = tc.param_sync_func[0]

    # ----------------------------------------------------------------------------------------------
    def _wrap(self, chunks: list) -> list:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.transformer.module import Float16Module

        if self.cfg.precision.dtype in ("bf16", "fp16"):
            chunks = [Float16Module(self.transformer_config, c) for c in chunks]
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=self.cfg.parallel.overlap_grad_reduce,
            overlap_param_gather=self.cfg.parallel.overlap_param_gather,
            use_distributed_optimizer=self.cfg.parallel.use_distributed_optimizer,
            check_for_nan_in_grad=False,  # the loop stops on a NaN loss with its own message
        )
        return [
            DistributedDataParallel(config=self.transformer_config, ddp_config=ddp_config, module=c,
                                    disable_bucketing=i > 0)
            for i, c in enumerate(chunks)
        ]

    def _build_optimizer(self):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        o, p = self.cfg.optimizer, self.cfg.precision
        if o.name != "adam":
            from megatron_spot.config.loader import ConfigError

            raise ConfigError(f"optimizer.name={o.name!r}: only 'adam' (AdamW) is supported")
        opt_cfg = OptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad,
            bf16=p.dtype == "bf16", fp16=p.dtype == "fp16", params_dtype=self.transformer_config.params_dtype,
            use_distributed_optimizer=self.cfg.parallel.use_distributed_optimizer,
        )
        return get_megatron_optimizer(opt_cfg, self.model)

    def _build_scheduler(self):
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        o = self.cfg.optimizer
        warmup = int(round(o.warmup_fraction * self.total_steps))
        style = {"cosine": "cosine", "linear": "linear", "constant": "constant"}.get(o.lr_schedule)
        if style is None:
            from megatron_spot.config.loader import ConfigError

            raise ConfigError(f"optimizer.lr_schedule={o.lr_schedule!r}: choose cosine, linear or constant")
        return OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if warmup else o.lr, max_lr=o.lr, min_lr=o.min_lr,
            lr_warmup_steps=warmup, lr_decay_steps=self.total_steps, lr_decay_style=style,
            start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=self.total_steps, wd_incr_style="constant",
        )

    # ----------------------------------------------------------------------------------------------
    def _forward_step(self, loss_func, data_iterator, model):
        batch = next(data_iterator)
        moe = {}
        if self.model_cfg.num_moe_experts and batch.get("padding_mask") is not None:
            moe["padding_mask"] = self._padding_mask(batch["padding_mask"], model)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                       packed_seq_params=batch.get("packed_seq_params"), **moe)
        return output, partial(loss_func, batch)

    def _padding_mask(self, mask, model):
        """The padding mask for the MoE routers (padding tokens still pass through the experts, but stay out of
        the load-balancing and z-losses, as transformers leaves them out with an attention mask). Megatron-Core
        0.19 splits it along the sequence for sequence parallel on the first pipeline stage only, where it
        splits the embeddings; a later stage receives hidden states already split, so its mask is split here."""
        if not self.transformer_config.sequence_parallel:
            return mask
        from megatron.core.utils import get_attr_wrapped_model

        if get_attr_wrapped_model(model, "pre_process"):
            return mask
        from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

        return scatter_to_sequence_parallel_region(mask.transpose(0, 1).contiguous()).transpose(0, 1).contiguous()

    def _moe_loss_scale(self) -> torch.Tensor:
        """Megatron-Core's `moe_grad_scale_func` for packed micro-batches (see __init__): the loss scale (fp16)
        times the step's pairs / non-padding tokens."""
        tc = self.transformer_config
        one = torch.ones(1, device=self.device)
        scale = tc.grad_scale_func(one) if tc.grad_scale_func is not None else one
        return scale * self._moe_pairs_per_token

    def _count_pairs_per_token(self, micro_batches: list[dict]) -> None:
        """The step's pairs / non-padding tokens over all data- and context-parallel ranks (each token
        once; the pairs on context-parallel rank 0, as the packed loss counts them)."""
        from megatron.core import parallel_state as ps

        pairs = sum(sum(mb["group_sizes"]) for mb in micro_batches) if ps.get_context_parallel_rank() == 0 else 0
        tokens = sum((~mb["padding_mask"]).sum() for mb in micro_batches)  # on the device: one sync, below
        counts = torch.stack([torch.tensor(float(pairs), dtype=torch.float64, device=self.device),
                              tokens.to(device=self.device, dtype=torch.float64)])
        dist.all_reduce(counts, group=ps.get_data_parallel_group(with_context_parallel=True))
        self._moe_pairs_per_token = float(counts[0] / counts[1])

    def _packed_train_loss(self, batch, output_tensor):
        """Loss of one packed micro-batch: each group of pairs is one SpotLoss call (one spot-bco delta
        update), in order; returns (sum over pairs of the loss, pair count, per-group metric sums)."""
        seq = self._packed_sequence_logps(batch, output_tensor)
        total, sums, offset = None, {}, 0
        for B, n_chosen in zip(batch["group_sizes"], batch["chosen_tokens"]):
            rows = slice(offset, offset + 2 * B)
            loss, metrics = self.loss_fn.sequence_loss(seq[rows], batch["ref_logps"][rows], n_chosen)
            total = loss * B if total is None else total + loss * B
            for k, v in metrics.items():
                sums[k] = v.double() if k not in sums or k == "delta" else sums[k] + v.double()
            offset += 2 * B
        # "loss" and the other metrics are per-group means summed here; _reduce_metrics divides by
        # the step's group count. delta is a running value: the last group's.
        sums["_groups"] = torch.tensor(float(len(batch["group_sizes"])), dtype=torch.float64, device=seq.device)
        # Megatron-Core sums this count over the DP x CP group: context-parallel ranks of one replica
        # share the pairs, so only CP rank 0 counts them
        from megatron.core import parallel_state as ps

        counted = sum(batch["group_sizes"]) if ps.get_context_parallel_rank() == 0 else 0
        return total, torch.tensor(counted, dtype=torch.int, device=seq.device), sums

    def _packed_score_loss(self, batch, output_tensor):
        seq = self._packed_sequence_logps(batch, output_tensor)
        return output_tensor.new_zeros(()), {"seq_logps": seq.detach()}

    @staticmethod
    def _packed_sequence_logps(batch, output_tensor):
        """Per-sequence log-prob sums of a packed row; with context parallel, this rank's partial sums
        are added over the CP group (backward: each rank keeps the gradient of its own tokens)."""
        from megatron.core import parallel_state as ps

        from megatron_spot.data.packing import segment_sums

        seq = segment_sums(-output_tensor.float(), batch["loss_mask"], batch["segment_ids"], batch["num_sequences"])
        if ps.get_context_parallel_world_size() > 1:
            seq = _SumOverGroup.apply(seq, ps.get_context_parallel_group())
        return seq

    def _train_loss(self, batch, output_tensor):
        token_logps = -output_tensor.float()  # the model returns per-token negative log-probs
        loss, metrics = self.loss_fn(token_logps, batch["loss_mask"], batch["ref_logps"])
        reported = {"loss": loss.detach().clone()}
        reported.update({k: v.detach().float().mean() for k, v in metrics.items()})
        return loss, reported

    def _score_loss(self, batch, output_tensor):
        from megatron_spot.losses import sequence_logps

        seq = sequence_logps(-output_tensor.float(), batch["loss_mask"])
        return output_tensor.new_zeros(()), {"seq_logps": seq.detach()}

    def _run_schedule(self, micro_batches: list[dict], loss_func, forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        seq_length = max(mb["tokens"].shape[1] for mb in micro_batches)
        rows = micro_batches[0]["tokens"].shape[0]
        for mb in micro_batches:
            if not self.packing and tuple(mb["tokens"].shape) != (rows, seq_length):
                raise ValueError("all micro-batches of a step must share one [rows, seq_length] shape")
        iters = [iter(micro_batches) for _ in self.model]
        return get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, loss_func),
            data_iterator=iters if len(iters) > 1 else iters[0],
            model=self.model,
            num_microbatches=len(micro_batches),
            seq_length=seq_length,
            micro_batch_size=rows,
            forward_only=forward_only,
        )

    def train_step(self, micro_batches: list[dict]) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches; metrics are identical on every rank."""
        from megatron.core import parallel_state as ps

        start = time.perf_counter()
        for m in self.model:
            m.train()
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss_func = self._timed("loss-compute", self._packed_train_loss if self.packing else self._train_loss)
        if self.transformer_config.moe_grad_scale_func is not None:
            self._count_pairs_per_token(micro_batches)
        reported = self._run_schedule(micro_batches, loss_func, forward_only=False)
        metrics = self._reduce_metrics(reported)
        if self.moe_metrics is not None:  # collective, on every rank
            metrics.update(self.moe_metrics.collect(len(micro_batches)))
        lr = self.optimizer.param_groups[0]["lr"]
        # Megatron's FP32/BF16 optimizers apply an update whatever the gradients hold: check the loss
        # and the reduced gradients first, so a diverged step never reaches the weights (train.py
        # then stops before anything is saved).
        if not is_finite(metrics["loss"]) or not self._grads_finite():
            metrics.update(grad_norm=float("nan"), lr=lr, update_skipped=1.0, nonfinite=1.0,
                           step_time_s=time.perf_counter() - start, tokens=0.0)
            return metrics
        with self._timer("optimizer-step"):
            ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        metrics.update(grad_norm=float(grad_norm) if grad_norm is not None else float("nan"), lr=lr,
                       update_skipped=float(not ok), nonfinite=0.0, step_time_s=time.perf_counter() - start)
        tokens = sum(int(mb["attention_tokens"]) for mb in micro_batches)
        padded = sum(int(mb["tokens"].numel()) for mb in micro_batches)
        tokens_t = torch.tensor([tokens, padded], dtype=torch.float64, device=self.device)
        dist.all_reduce(tokens_t, group=ps.get_data_parallel_group())
        metrics["tokens"] = float(tokens_t[0].item())  # non-pad tokens of the step, all DP ranks
        metrics["padding_fraction"] = 1.0 - float(tokens_t[0].item()) / max(float(tokens_t[1].item()), 1.0)
        return metrics

    def _timer(self, name: str):
        """A context that times `name` into self.timers (a no-op without timers)."""
        if self.timers is None:
            return contextlib.nullcontext()
        timer = self.timers(name, log_level=1)

        @contextlib.contextmanager
        def timed():
            timer.start()
            try:
                yield
            finally:
                timer.stop()
        return timed()

    def _timed(self, name: str, fn):
        if self.timers is None:
            return fn

        def call(*args, **kwargs):
            with self._timer(name):
                return fn(*args, **kwargs)
        return call

    def _all_finite(self, tensors) -> bool:
        """One flag for the whole world: every rank holds a shard (TP/PP/DP) and any may hold the NaN.
        A sum is one cheap reduction with no full-size temporary; NaN and Inf propagate into it."""
        total = torch.zeros(1, dtype=torch.float32, device=self.device)
        for t in tensors:
            if t.numel():
                total += t.detach().float().sum()
        bad = torch.tensor([0.0 if bool(torch.isfinite(total).all()) else 1.0], device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad)
        return bool(bad.item() == 0)

    @torch.no_grad()
    def _grads_finite(self) -> bool:
        buffers = [b for m in self.model for b in (*m.buffers, *m.expert_parallel_buffers)]
        return self._all_finite(b.grad_data for b in buffers)

    @torch.no_grad()
    def weights_finite(self) -> bool:
        """Collective: True when every parameter of every rank is finite (checked before a save)."""
        return self._all_finite(p for m in self.model for p in m.parameters())

    @torch.no_grad()
    def sequence_logps(self, micro_batches: list[dict]) -> list[torch.Tensor]:
        """Forward only: per-sequence response log-prob sums [2B] for each micro-batch (every rank)."""
        from megatron.core import parallel_state as ps

        for m in self.model:
            m.eval()
        packed = "packed_seq_params" in micro_batches[0]
        out = self._run_schedule(micro_batches, self._packed_score_loss if packed else self._score_loss,
                                 forward_only=True)
        sizes = [mb["num_sequences"] if packed else mb["tokens"].shape[0] for mb in micro_batches]
        if self.pp_last:
            stacked = torch.cat([o["seq_logps"].double() for o in out])
        else:
            stacked = torch.zeros(sum(sizes), dtype=torch.float64, device=self.device)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(stacked, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        return list(stacked.split(sizes))

    def _reduce_metrics(self, reported: list[dict]) -> dict[str, float]:
        """Average the last stage's per-micro-batch metrics over micro-batches and DP ranks; share with all."""
        from megatron.core import parallel_state as ps

        keys = sorted(reported[0].keys()) if self.pp_last and reported else None
        if ps.get_pipeline_model_parallel_world_size() > 1:
            box = [keys]
            dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                                       group=ps.get_pipeline_model_parallel_group())
            keys = box[0]
        if self.pp_last:
            per_mb = torch.stack([torch.stack([r[k].double() for k in keys]) for r in reported])
            if "_groups" in keys:  # packed: per-group metric sums; divide by the step's group count
                values = per_mb.sum(0) / per_mb[:, keys.index("_groups")].sum()
            else:
                values = per_mb.mean(0)
            if "delta" in keys:  # a running statistic: report its value after the step, not a mean
                values[keys.index("delta")] = per_mb[-1, keys.index("delta")]
        else:
            values = torch.zeros(len(keys), dtype=torch.float64, device=self.device)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(values, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        dp = ps.get_data_parallel_world_size()
        if dp > 1:
            dist.all_reduce(values, group=ps.get_data_parallel_group())
            values /= dp
        return {k: float(v) for k, v in zip(keys, values.tolist()) if k != "_groups"}


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) of partial per-sequence sums in forward; identity in backward, since every rank
    computes the same loss from the summed values and its gradient flows to its own tokens only."""

    @staticmethod
    def forward(ctx, partial_sums, group):
        total = partial_sums.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def is_finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))
