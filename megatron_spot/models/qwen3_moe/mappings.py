"""Qwen3-MoE's own HF <-> Megatron-Core tensor mappings: the router and the experts of an MoE layer.

Each object owns its transform both ways, its shapes and how it is split across ranks (the style of
the dense rows: Megatron-Bridge's mapping objects). Megatron names are the unsharded ones (TP1, EP1,
global layer and GLOBAL expert numbers) of the local layer spec's SequentialMLP; a rank at expert
parallel EP holds experts [r * E/EP, (r + 1) * E/EP) as its local_experts.0 .. E/EP - 1
(:meth:`ExpertMapping.ep_rank`, :meth:`ExpertMapping.local_mcore`).

HF side: the checkpoint files (safetensors) of the released models and of transformers' save_pretrained
hold one tensor per expert, `model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`, and the router
`model.layers.{i}.mlp.gate.weight` [E, H]. (transformers 5 fuses the experts in memory into
`mlp.experts.gate_up_proj` [E, 2I, H] and `mlp.experts.down_proj` [E, H, I] when it loads and splits
them again when it saves; the converter reads and writes the files, so the per-expert names are the
ones that matter.)

Tensors:
- router: mlp.gate.weight [E, H] -> mlp.router.weight [E, H], the same on every TP and EP rank;
- expert e's linear_fc1 = [gate_e; up_e] [2I, H]; at expert tensor parallel ETP a rank r holds
  [gate_e,r; up_e,r] (Megatron's gated-linear shard, as the dense MLP);
- expert e's linear_fc2 = down_e [H, I], split along dim 1 at ETP.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch

_L, _H = "decoder.layers.{i}.", "model.layers.{i}."
_LOCAL_EXPERT = re.compile(r"^(.*\.mlp\.experts\.local_experts\.)(\d+)(\..*)$")


@dataclass(frozen=True)
class Router:
    """mlp.gate.weight [E, H] <-> mlp.router.weight [E, H]: replicated, never split."""
    mcore: str = _L + "mlp.router.weight"
    hf: tuple = (_H + "mlp.gate.weight",)
    row_copy: ClassVar[bool] = True
    stacked: ClassVar[bool] = False

    def at(self, layer: int) -> "Router":
        return type(self)(self.mcore.format(i=layer), tuple(n.format(i=layer) for n in self.hf))

    def hf_shapes(self, cfg) -> list[tuple]:
        return [(cfg.num_experts, cfg.hidden_size)]

    def mcore_shape(self, cfg) -> tuple:
        return (cfg.num_experts, cfg.hidden_size)

    def to_mcore(self, hf_tensors, cfg):
        return hf_tensors[0]

    def to_hf(self, tensor, cfg):
        return [tensor]

    def tp_shard(self, full, dim, tp_rank, tp_size):  # the router is not tensor-parallel
        return full


@dataclass(frozen=True)
class ExpertMapping:
    """One expert's tensor of one MoE layer; `expert` is its global index."""
    mcore: str
    hf: tuple
    expert: int
    row_copy: ClassVar[bool] = False
    stacked: ClassVar[bool] = False

    def at(self, layer: int) -> "ExpertMapping":
        return type(self)(self.mcore.format(i=layer), tuple(n.format(i=layer) for n in self.hf), self.expert)

    def ep_rank(self, cfg, ep_size: int) -> int:
        """The expert-parallel rank that holds this expert (Megatron-Core: contiguous blocks of E/EP)."""
        return self.expert // (cfg.num_experts // ep_size)

    def local_mcore(self, cfg, ep_size: int) -> str:
        """This tensor's parameter name on its EP rank (local expert index)."""
        return self.mcore.replace(f"local_experts.{self.expert}.", f"local_experts.{self.expert % (cfg.num_experts // ep_size)}.")

    def tp_shard(self, full, dim, tp_rank, tp_size):
        """Shard for expert-tensor-parallel rank `tp_rank` of `tp_size` (the ETP group, not the dense TP)."""
        return full.chunk(tp_size, dim=dim)[tp_rank]


@dataclass(frozen=True)
class ExpertGatedFC1(ExpertMapping):
    """experts.{e}.gate_proj, up_proj [I, H] each -> local_experts.{e}.linear_fc1 = [gate; up] [2I, H]."""
    stacked: ClassVar[bool] = True

    def hf_shapes(self, cfg):
        return [(cfg.moe_intermediate_size, cfg.hidden_size)] * 2

    def mcore_shape(self, cfg):
        return (2 * cfg.moe_intermediate_size, cfg.hidden_size)

    def to_mcore(self, hf_tensors, cfg):
        return torch.cat(hf_tensors, dim=0)

    def to_hf(self, tensor, cfg):
        gate, up = tensor.chunk(2, dim=0)
        return [gate, up]

    def tp_shard(self, full, dim, tp_rank, tp_size):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)


@dataclass(frozen=True)
class ExpertFC2(ExpertMapping):
    """experts.{e}.down_proj [H, I] <-> local_experts.{e}.linear_fc2 [H, I] (row-parallel: split along dim 1)."""
    row_copy: ClassVar[bool] = True

    def hf_shapes(self, cfg):
        return [(cfg.hidden_size, cfg.moe_intermediate_size)]

    def mcore_shape(self, cfg):
        return (cfg.hidden_size, cfg.moe_intermediate_size)

    def to_mcore(self, hf_tensors, cfg):
        return hf_tensors[0]

    def to_hf(self, tensor, cfg):
        return [tensor]


def expert_rows(num_experts: int) -> tuple:
    """The router and every expert's two tensors of one MoE layer, "{i}" unfilled, in checkpoint order."""
    rows: list = [Router()]
    for e in range(num_experts):
        x, h = f"{_L}mlp.experts.local_experts.{e}.", f"{_H}mlp.experts.{e}."
        rows.append(ExpertGatedFC1(x + "linear_fc1.weight", (h + "gate_proj.weight", h + "up_proj.weight"), e))
        rows.append(ExpertFC2(x + "linear_fc2.weight", (h + "down_proj.weight",), e))
    return tuple(rows)


def global_expert_name(local_name: str, ep_rank: int, num_local_experts: int) -> str:
    """A parameter name with its local expert index replaced by the global one (unchanged when not an expert)."""
    m = _LOCAL_EXPERT.match(local_name)
    if not m:
        return local_name
    return f"{m.group(1)}{ep_rank * num_local_experts + int(m.group(2))}{m.group(3)}"
