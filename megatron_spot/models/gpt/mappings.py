"""HF <-> Megatron-Core tensor mappings as objects (Megatron-Bridge's habit): each row of a family's
mapping table is one object that owns its transform both ways, its shapes and its tensor-parallel split,
so the conversion driver (checkpoint/hf_convert.py) calls them and knows no family and no kind of tensor.

Megatron names are the unsharded (TP1PP1) parameter names of the local layer spec with global layer
numbers; "{i}" in a row's names is the layer index until :meth:`TensorMapping.at` fills it in.
Fused tensors:
- linear_qkv = per query group g: [q heads of g; k head g; v head g] (each head_dim rows), so that
  column-parallel chunking of dim 0 hands each TP rank whole query groups;
- linear_fc1 = [gate; up] at TP1; a TP rank r holds [gate_r; up_r] (Megatron's gated-linear shard);
- vocabulary rows padded to the config's padded_vocab_size (zeros), stripped on the way back.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

Shape = Callable[[object], tuple]


@dataclass(frozen=True)
class TensorMapping:
    mcore: str  # Megatron-Core name (TP1, global layer index)
    hf: tuple[str, ...]  # HF tensor name(s) it is built from, in order

    # The Megatron tensor's rows are one HF tensor's rows (zero rows beyond for padding): a converter may
    # copy them straight from the file in row blocks, with no full-size temporary.
    row_copy: ClassVar[bool] = False
    # The Megatron tensor is its HF tensors stacked along dim 0, in order: a converter may store each part
    # from memory of its own (torch_dist would otherwise clone the views).
    stacked: ClassVar[bool] = False

    def at(self, layer: int) -> "TensorMapping":
        """This row for layer `layer`."""
        return dataclasses.replace(self, mcore=self.mcore.format(i=layer), hf=tuple(n.format(i=layer) for n in self.hf))

    def hf_shapes(self, cfg) -> list[tuple]:
        raise NotImplementedError

    def mcore_shape(self, cfg) -> tuple:
        raise NotImplementedError

    def to_mcore(self, hf_tensors: list[torch.Tensor], cfg) -> torch.Tensor:
        raise NotImplementedError

    def to_hf(self, tensor: torch.Tensor, cfg) -> list[torch.Tensor]:
        raise NotImplementedError

    def tp_shard(self, full: torch.Tensor, dim: int, tp_rank: int, tp_size: int) -> torch.Tensor:
        """This TP rank's shard of the unsharded Megatron tensor split along `dim` (the parameter's partition_dim)."""
        return full.chunk(tp_size, dim=dim)[tp_rank]


@dataclass(frozen=True)
class Copy(TensorMapping):
    """The same tensor on both sides (a large one is streamed from the file in row blocks)."""
    row_copy: ClassVar[bool] = True
    shape: Shape = None

    def hf_shapes(self, cfg):
        return [tuple(self.shape(cfg))]

    def mcore_shape(self, cfg):
        return tuple(self.shape(cfg))

    def to_mcore(self, hf_tensors, cfg):
        return hf_tensors[0]

    def to_hf(self, tensor, cfg):
        return [tensor]


@dataclass(frozen=True)
class VocabRows(TensorMapping):
    """Embedding / output layer: HF [V, H]; Megatron [padded V, H] with zero rows beyond V."""
    row_copy: ClassVar[bool] = True

    def hf_shapes(self, cfg):
        return [(cfg.vocab_size, cfg.hidden_size)]

    def mcore_shape(self, cfg):
        return (cfg.padded_vocab_size, cfg.hidden_size)

    def to_mcore(self, hf_tensors, cfg):
        w = hf_tensors[0]
        pad = cfg.padded_vocab_size - w.shape[0]
        return torch.cat([w, w.new_zeros(pad, w.shape[1])]) if pad else w

    def to_hf(self, tensor, cfg):
        return [tensor[: cfg.vocab_size]]


@dataclass(frozen=True)
class QKV(TensorMapping):
    """q_proj, k_proj, v_proj -> linear_qkv, interleaved per query group."""

    def hf_shapes(self, cfg):
        h, d = cfg.hidden_size, cfg.head_dim
        return [(cfg.num_attention_heads * d, h), (cfg.num_key_value_heads * d, h), (cfg.num_key_value_heads * d, h)]

    def mcore_shape(self, cfg):
        return ((cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim, cfg.hidden_size)

    def to_mcore(self, hf_tensors, cfg):
        q, k, v = hf_tensors
        g, d, hidden = cfg.num_query_groups, cfg.head_dim, q.shape[-1]
        per = cfg.num_attention_heads // g
        return torch.cat([q.view(g, per * d, hidden), k.view(g, d, hidden), v.view(g, d, hidden)], dim=1).reshape(-1, hidden)

    def to_hf(self, tensor, cfg):
        g, d, hidden = cfg.num_query_groups, cfg.head_dim, tensor.shape[-1]
        per = cfg.num_attention_heads // g
        q, k, v = torch.split(tensor.view(g, (per + 2) * d, hidden), [per * d, d, d], dim=1)
        return [q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)]


@dataclass(frozen=True)
class GatedMLP(TensorMapping):
    """gate_proj, up_proj -> linear_fc1 = [gate; up]; each TP rank holds [gate_r; up_r]."""
    stacked: ClassVar[bool] = True
    rows: Shape = None  # rows of gate (= of up), from the config

    def hf_shapes(self, cfg):
        return [(self.rows(cfg), cfg.hidden_size)] * 2

    def mcore_shape(self, cfg):
        return (2 * self.rows(cfg), cfg.hidden_size)

    def to_mcore(self, hf_tensors, cfg):
        return torch.cat(hf_tensors, dim=0)

    def to_hf(self, tensor, cfg):
        gate, up = tensor.chunk(2, dim=0)
        return [gate, up]

    def tp_shard(self, full, dim, tp_rank, tp_size):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)


def _hidden(c) -> tuple:
    return (c.hidden_size,)


def _head_dim(c) -> tuple:
    return (c.head_dim,)


_L, _H = "decoder.layers.{i}.", "model.layers.{i}."
EMBEDDING = VocabRows("embedding.word_embeddings.weight", ("model.embed_tokens.weight",))
FINAL_NORM = Copy("decoder.final_layernorm.weight", ("model.norm.weight",), shape=_hidden)
OUTPUT_LAYER = VocabRows("output_layer.weight", ("lm_head.weight",))  # absent when embeddings are tied

# The rows of a dense GPT layer (Llama, Qwen3 without its q/k norms), in checkpoint order.
INPUT_NORM = Copy(_L + "input_layernorm.weight", (_H + "input_layernorm.weight",), shape=_hidden)
ATTENTION_QKV = QKV(_L + "self_attention.linear_qkv.weight",
                    (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight", _H + "self_attn.v_proj.weight"))
ATTENTION_OUT = Copy(_L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",),
                     shape=lambda c: (c.hidden_size, c.num_attention_heads * c.head_dim))
QK_NORMS = (Copy(_L + "self_attention.q_layernorm.weight", (_H + "self_attn.q_norm.weight",), shape=_head_dim),
            Copy(_L + "self_attention.k_layernorm.weight", (_H + "self_attn.k_norm.weight",), shape=_head_dim))
MLP_NORM = Copy(_L + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",), shape=_hidden)
DENSE_MLP = (GatedMLP(_L + "mlp.linear_fc1.weight", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
                      rows=lambda c: c.intermediate_size),
             Copy(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",),
                  shape=lambda c: (c.hidden_size, c.intermediate_size)))
DENSE_LAYER = (INPUT_NORM, ATTENTION_QKV, ATTENTION_OUT, MLP_NORM, *DENSE_MLP)
