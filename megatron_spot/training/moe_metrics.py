"""Mixture-of-experts metrics of one training step: the load-balancing losses and each MoE layer's
expert load.

- Load-balancing losses: Megatron-Core's routers record them (divided by their coefficient, i.e. the
  loss itself) per layer in its MoE metrics tracker; :meth:`MoEStepMetrics.collect` reports their mean over
  MoE layers and micro-batches, reduced the way Megatron-Core's own training loop does.
- Expert load: a forward hook on every router counts the tokens routed to each expert (its routing
  map, before the all-to-all), padding tokens left out (the engine passes the batch's padding mask).
  Counted only when autograd records (training forwards; Megatron's activation recompute runs the first
  forward without grad), so reference scoring and evaluation do not count. Summed over the ranks that see
  different tokens, each layer's max / mean tokens per expert (1.0 = perfectly balanced) is what an
  aux-loss coefficient is meant to hold down; with expert parallel the busiest expert's rank sets the step
  time.

Every call of :meth:`collect` is collective (all ranks, same order) and clears what it reports.
"""
from __future__ import annotations

from typing import Iterable

import torch

# Megatron-Core's tracker names of the load-balancing losses (router.py), and our metrics.jsonl keys: one per
# moe.load_balancing type (aux_loss, seq_aux_loss, global_aux_loss) and the z-loss, each the loss without
# its coefficient
_TRACKER_LOSSES = {"load_balancing_loss": "moe_aux_loss", "seq_load_balancing_loss": "moe_seq_aux_loss",
                   "global_load_balancing_loss": "moe_global_aux_loss", "z_loss": "moe_z_loss"}
# the console line's names of the MoE metrics
_CONSOLE = {"moe_aux_loss": "aux loss", "moe_seq_aux_loss": "seq aux loss", "moe_global_aux_loss": "global aux loss",
            "moe_z_loss": "z-loss", "moe_load_imbalance": "expert load max/mean"}


def console_summary(metrics: dict) -> str:
    """The step's MoE metrics for the console line, e.g. " | moe: aux loss 1.02 | expert load max/mean 1.41";
    '' without any (dense models)."""
    parts = [f"{name} {metrics[key]:.4g}" for key, name in _CONSOLE.items() if key in metrics]
    return " | moe: " + " | ".join(parts) if parts else ""


def _routers(chunks: Iterable) -> list:
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, TopKRouter)]


class MoEStepMetrics:
    """Hooks on this rank's routers; :meth:`collect` once per optimizer step on every rank."""

    def __init__(self, chunks: Iterable, num_layers: int, num_experts: int, sequence_parallel: bool = False,
                 moe_layer_freq=None):
        """moe_layer_freq: TransformerConfig.moe_layer_freq (which layers are MoE layers; the losses are
        averaged over those)."""
        self.routers = _routers(chunks)
        self.num_layers, self.num_experts, self.moe_layer_freq = num_layers, num_experts, moe_layer_freq
        self.sequence_parallel = sequence_parallel
        from megatron_spot.platform.device import current_device

        self.device = current_device()
        # on the routers' device: counting costs no host sync per forward
        self.tokens = torch.zeros(num_layers, num_experts, dtype=torch.float64, device=self.device)
        self._handles = [r.register_forward_hook(self._count) for r in self.routers]

    def _count(self, router, inputs, output) -> None:
        if not torch.is_grad_enabled():
            return
        routing_map = output[1].detach()  # [tokens, experts] bool: token t is sent to expert e
        padding = inputs[1] if len(inputs) > 1 else None  # MoELayer.route: router(hidden_states, padding_mask)
        if padding is not None:  # [s, b], True at padding, flattened like the router's logits
            routing_map = routing_map & ~padding.reshape(-1, 1)
        self.tokens[router.layer_number - 1] += routing_map.sum(dim=0).to(torch.float64)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def collect(self, num_micro_batches: int) -> dict:
        """The step just run: moe_aux_loss (and the other load-balancing losses that are on), the tokens routed to
        the busiest expert of each MoE layer (moe_expert_load_max, a list in layer order), the tokens per expert
        if balanced (moe_expert_load_mean) and the worst layer's max / mean (moe_load_imbalance, 1.0 =
        balanced)."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        out = {}
        tracker = get_moe_metrics_tracker()
        # every rank reports the same names (a pipeline stage without MoE layers still joins the all-reduce)
        names = sorted(_TRACKER_LOSSES)
        for name in names:
            tracker.ensure_initialized(name, self.num_layers, device=self.device)
        scalars: dict = {}
        tracker.report(loss_scale=1.0 / num_micro_batches, iteration=0, track_names=names, force_initialize=True,
                       num_layers=self.num_layers, moe_layer_freq=self.moe_layer_freq, total_loss_dict=scalars)
        for name in names:
            value = float(scalars.get(name, 0.0))
            if value:
                out[_TRACKER_LOSSES[name]] = value
        # tokens per expert: every rank counted its own tokens of the layers it holds. Tensor-parallel ranks
        # without sequence parallel route the same tokens, so one of them counts for the group.
        tokens = self.tokens.clone()
        dist.all_reduce(tokens)
        tokens = tokens.cpu()
        if not self.sequence_parallel:
            tokens /= ps.get_tensor_model_parallel_world_size()
        self.tokens.zero_()
        moe_layers = tokens.sum(dim=1) > 0  # (layers without a router, or no training forward: left out)
        if moe_layers.any():
            tokens = tokens[moe_layers]
            mean = tokens.mean(dim=1)  # = routed tokens x top-k / experts: the same in every MoE layer
            out["moe_expert_load_max"] = [round(v) for v in tokens.max(dim=1).values.tolist()]
            out["moe_expert_load_mean"] = float(mean.mean())
            out["moe_load_imbalance"] = float((tokens.max(dim=1).values / mean).max())
        return out
