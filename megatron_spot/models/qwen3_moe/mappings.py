"""Qwen3-MoE's own HF <-> Megatron-Core tensor mappings: the router and the experts of an MoE layer.

Each object owns its transform both ways, its shapes and how it is split across ranks (the style of
the dense rows: Megatron-Bridge's mapping objects). Megatron names are the unsharded ones (TP1, EP1,
global layer and GLOBAL expert numbers) of the local layer spec's SequentialMLP; a rank at expert
parallel EP holds experts [r * E/EP, (r + 1) * E/EP) as its local_experts.0 .. E/EP - 1
(:meth:`ExpertPlacement.ep_rank`, :meth:`ExpertPlacement.local_mcore`); models/gpt/state_dict.py maps a
rank's local expert numbers to global ones when it loads.

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

from dataclasses import dataclass

from megatron_spot.models.gpt.mappings import Copy, GatedMLP, TensorMapping

_L, _H = "decoder.layers.{i}.", "model.layers.{i}."

# mlp.gate.weight [E, H] <-> mlp.router.weight [E, H]: replicated on every TP and EP rank, never split
ROUTER = Copy(_L + "mlp.router.weight", (_H + "mlp.gate.weight",), shape=lambda c: (c.num_experts, c.hidden_size))


class ExpertPlacement:
    """Where one expert's tensor lives at expert parallel EP (`expert`: its global index)."""
    expert: int

    def ep_rank(self, cfg, ep_size: int) -> int:
        """The expert-parallel rank that holds this expert (Megatron-Core: contiguous blocks of E/EP)."""
        return self.expert // (cfg.num_experts // ep_size)

    def local_mcore(self, cfg, ep_size: int) -> str:
        """This tensor's parameter name on its EP rank (local expert index)."""
        local = self.expert % (cfg.num_experts // ep_size)
        return self.mcore.replace(f"local_experts.{self.expert}.", f"local_experts.{local}.")


@dataclass(frozen=True)
class ExpertGatedFC1(ExpertPlacement, GatedMLP):
    """experts.{e}.gate_proj, up_proj [I, H] -> local_experts.{e}.linear_fc1 = [gate; up] [2I, H]; a rank of
    the expert-tensor-parallel group holds [gate_r; up_r] (GatedMLP's split)."""
    expert: int = 0


@dataclass(frozen=True)
class ExpertFC2(ExpertPlacement, Copy):
    """experts.{e}.down_proj [H, I] <-> local_experts.{e}.linear_fc2 [H, I] (row-parallel: split along dim 1)."""
    expert: int = 0


def _moe_rows(c) -> int:
    return c.moe_intermediate_size


def _down_shape(c) -> tuple:
    return (c.hidden_size, c.moe_intermediate_size)


def expert_rows(num_experts: int) -> tuple[TensorMapping, ...]:
    """The router and every expert's two tensors of one MoE layer, "{i}" unfilled, in checkpoint order."""
    rows: list[TensorMapping] = [ROUTER]
    for e in range(num_experts):
        x, h = f"{_L}mlp.experts.local_experts.{e}.", f"{_H}mlp.experts.{e}."
        rows.append(ExpertGatedFC1(x + "linear_fc1.weight", (h + "gate_proj.weight", h + "up_proj.weight"),
                                   rows=_moe_rows, expert=e))
        rows.append(ExpertFC2(x + "linear_fc2.weight", (h + "down_proj.weight",), shape=_down_shape, expert=e))
    return tuple(rows)
