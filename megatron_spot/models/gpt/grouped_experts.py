"""Grouped experts without Transformer Engine: Megatron-Core's TEGroupedMLP with a plain-PyTorch grouped linear.

On GPUs an MoE layer's experts run as Megatron-Core's TEGroupedMLP: per layer one `linear_fc1` and one
`linear_fc2` (Transformer Engine's GroupedLinear) that hold every local expert's weight as a parameter
`weight{e}` and run all of them in one grouped GEMM. Without TE (CPU, tests) the local spec gives
SequentialMLP instead: one MLP module per expert (`local_experts.{e}.linear_fc1.weight`). The two are
different modules with different parameter names; Megatron-Core makes their distributed-checkpoint keys
interchangeable (both save `experts.linear_fc1.weight` with a global expert axis).

This module lets the grouped layout run where TE does not, so that it is tested on CPU rather than first on
a GPU: :class:`ColumnGroupedLinear` / :class:`RowGroupedLinear` implement the builder protocol TEGroupedMLP
declares for its submodules (megatron/core/transformer/moe/experts.py: GroupedLinearFc1Builder, ...) with the
same parameters (`weight{e}`, one [out, in] matrix per local expert, split over the expert-tensor-parallel
group as TE's column/row-parallel grouped linears split them), the same parameter attributes (which
gradients reduce over the expert data-parallel group) and the same sharded state dict as
megatron/core/extensions/transformer_engine.py's TEColumnParallelGroupedLinear / TERowParallelGroupedLinear.
The forward is a loop of matmuls over the experts' token blocks (what a grouped GEMM computes). Selected by
`moe.experts=grouped` on a machine without TE (models/gpt/provider.py).
"""
from __future__ import annotations

from functools import partial

import torch

from megatron.core.models.backends import LocalSpecProvider

from megatron_spot.platform.device import current_device


class _GroupedLinear(torch.nn.Module):
    """`num_gemms` independent [out, in] weights; input rows are split into consecutive blocks, block e
    goes through weight e (TE GroupedLinear's contract: forward(x, m_splits))."""

    parallel_mode: str  # "column" (fc1: output split over expert TP) or "row" (fc2: input split)

    def __init__(self, num_gemms: int, input_size: int, output_size: int, *, config, init_method, bias: bool,
                 skip_bias_add: bool, is_expert: bool, tp_comm_buffer_name=None, pg_collection=None, name=None):
        super().__init__()
        if bias:
            raise ValueError(f"{type(self).__name__}: biased experts are not supported (no supported family has them)")
        if not is_expert or pg_collection is None:
            raise ValueError(f"{type(self).__name__} is an expert layer of TEGroupedMLP (is_expert, pg_collection)")
        from megatron.core.extensions.transformer_engine import _set_expert_parameter_attributes
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, get_expert_parallel_rng_tracker_name

        self.num_gemms = num_gemms
        self._pg_collection = pg_collection
        self._tp_group = pg_collection.expt_tp
        tp = self._tp_group.size()
        # TE is told no model parallelism for experts (the token dispatcher does the communication); the
        # weights are the shards: fc1 (column) holds out/tp rows, fc2 (row) holds in/tp columns
        out_features = output_size // tp if self.parallel_mode == "column" else output_size
        in_features = input_size // tp if self.parallel_mode == "row" else input_size
        device = None if config.use_cpu_initialization else current_device()
        for e in range(num_gemms):
            weight = torch.nn.Parameter(torch.empty(out_features, in_features, dtype=config.params_dtype,
                                                    device=device))
            if config.perform_initialization:
                if config.use_cpu_initialization:  # as Megatron-Core's linears: the default generator
                    init_method(weight)
                else:
                    with get_cuda_rng_tracker().fork(get_expert_parallel_rng_tracker_name()):
                        init_method(weight)
            self.register_parameter(f"weight{e}", weight)
        use_expert_groups = config.expert_model_parallel_size > 1 or (
            config.expert_tensor_parallel_size != config.tensor_model_parallel_size)
        _set_expert_parameter_attributes(self, self.parallel_mode, use_expert_groups)

    def forward(self, x: torch.Tensor, m_splits: list[int]):
        blocks = torch.split(x, list(m_splits), dim=0)
        out = torch.cat([b @ getattr(self, f"weight{e}").t() for e, b in enumerate(blocks)], dim=0)
        return out, None

    def backward_dw(self) -> None:
        """No delayed weight-gradient pass (TE's delay_wgrad_compute): gradients are computed in backward."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None) -> dict:
        """Each expert's weight as one shard of a tensor with a global expert axis (its position among
        EP x num_gemms experts) and the expert-TP axis, under the name SequentialMLP's experts use, as
        TEGroupedLinear._sharded_state_dict_grouped does (without TE's FP8 `_extra_state`)."""
        from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        metadata = metadata or {}
        if metadata.get("singleton_local_shards"):
            raise NotImplementedError("singleton_local_shards checkpoints are not supported by the grouped twin")
        tp_axis = 0 if self.parallel_mode == "column" else 1
        ep = self._pg_collection.ep
        num_global_experts = ep.size() * self.num_gemms
        first = ep.rank() * self.num_gemms
        expert_dp_rank = self._pg_collection.expt_dp.rank()
        out = {}
        for e in range(self.num_gemms):
            offsets = (*sharded_offsets, (len(sharded_offsets), first + e, num_global_experts))
            sub = make_sharded_tensors_for_checkpoint({f"{e}.weight": getattr(self, f"weight{e}")}, "",
                                                      {f"{e}.weight": tp_axis}, offsets, tp_group=self._tp_group,
                                                      dp_cp_group=metadata["dp_cp_group"])
            replace_prefix_for_sharding(sub, f"{e}.", prefix)
            tensor = sub[f"{e}.weight"]
            # one writer per expert shard among the expert data-parallel replicas
            tensor.replica_id = (*tensor.replica_id[:2], expert_dp_rank)
            out[f"{prefix}weight{e}"] = tensor
        return out


class ColumnGroupedLinear(_GroupedLinear):
    """The experts' fc1 ([gate; up] per expert), output split over the expert-tensor-parallel group."""
    parallel_mode = "column"


class RowGroupedLinear(_GroupedLinear):
    """The experts' fc2 (down per expert), input split over the expert-tensor-parallel group."""
    parallel_mode = "row"


class GroupedExpertsLocalSpecProvider(LocalSpecProvider):
    """Megatron-Core's local spec provider, with grouped experts (TEGroupedMLP over the grouped linears above)
    when grouped GEMM is asked for; SequentialMLP otherwise, as the plain local provider."""

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool):
        if not moe_use_grouped_gemm:
            return super().grouped_mlp_modules(False)
        from megatron.core.transformer.moe.experts import GroupedMLPSubmodules, TEGroupedMLP

        return partial(TEGroupedMLP, submodules=GroupedMLPSubmodules(linear_fc1=ColumnGroupedLinear,
                                                                     linear_fc2=RowGroupedLinear))


def grouped_moe_module_spec(num_experts: int):
    """The MoE layer (router, token dispatcher, TEGroupedMLP experts) for a local layer spec."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend

    return get_moe_module_spec_for_backend(GroupedExpertsLocalSpecProvider(), num_experts=num_experts,
                                           moe_grouped_gemm=True)
