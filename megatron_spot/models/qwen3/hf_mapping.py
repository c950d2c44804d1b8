"""Hugging Face Qwen3 <-> Megatron-Core weight mapping (names, shapes and tensor layouts).

Megatron names here are the unsharded (TP1PP1) parameter names of the local layer spec, with global
layer numbers. Fused tensors:
- linear_qkv = per query group g: [q heads of g; k head g; v head g] (each head_dim rows), so that
  column-parallel chunking of dim 0 hands each TP rank whole query groups;
- linear_fc1 = [gate; up] at TP1; a TP rank r holds [gate_r; up_r] (Megatron's gated-linear shard);
- vocabulary rows padded to Qwen3Config.padded_vocab_size (zeros), stripped on the way back.
The table is consumed one entry at a time so converters can stream tensors.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping

import torch

from megatron_spot.models.qwen3.presets import Qwen3Config


@dataclass(frozen=True)
class TensorMapping:
    mcore: str  # Megatron-Core name (TP1, global layer index)
    hf: tuple[str, ...]  # HF tensor name(s) it is built from
    kind: str  # copy | qkv | fc1 | vocab


def mapping_table(cfg: Qwen3Config) -> list[TensorMapping]:
    table = [TensorMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")]
    for i in range(cfg.num_hidden_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        table += [
            TensorMapping(m + "input_layernorm.weight", (h + "input_layernorm.weight",), "copy"),
            TensorMapping(m + "self_attention.linear_qkv.weight",
                          tuple(h + f"self_attn.{p}_proj.weight" for p in "qkv"), "qkv"),
            TensorMapping(m + "self_attention.q_layernorm.weight", (h + "self_attn.q_norm.weight",), "copy"),
            TensorMapping(m + "self_attention.k_layernorm.weight", (h + "self_attn.k_norm.weight",), "copy"),
            TensorMapping(m + "self_attention.linear_proj.weight", (h + "self_attn.o_proj.weight",), "copy"),
            TensorMapping(m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",), "copy"),
            TensorMapping(m + "mlp.linear_fc1.weight", (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"), "fc1"),
            TensorMapping(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), "copy"),
        ]
    table.append(TensorMapping("decoder.final_layernorm.weight", ("model.norm.weight",), "copy"))
    if not cfg.tie_word_embeddings:
        table.append(TensorMapping("output_layer.weight", ("lm_head.weight",), "vocab"))
    return table


def hf_shapes(cfg: Qwen3Config) -> dict[str, tuple[int, ...]]:
    h, d, f, v = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f),
        })
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def mcore_shapes(cfg: Qwen3Config) -> dict[str, tuple[int, ...]]:
    h, d, f, pv = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.padded_vocab_size
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d
    shapes = {"embedding.word_embeddings.weight": (pv, h), "decoder.final_layernorm.weight": (h,)}
    for i in range(cfg.num_hidden_layers):
        p = f"decoder.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "pre_mlp_layernorm.weight": (h,),
            p + "self_attention.linear_qkv.weight": (qkv, h),
            p + "self_attention.linear_proj.weight": (h, cfg.num_attention_heads * d),
            p + "self_attention.q_layernorm.weight": (d,), p + "self_attention.k_layernorm.weight": (d,),
            p + "mlp.linear_fc1.weight": (2 * f, h), p + "mlp.linear_fc2.weight": (h, f),
        })
    if not cfg.tie_word_embeddings:
        shapes["output_layer.weight"] = (pv, h)
    return shapes


def to_mcore(entry: TensorMapping, hf_tensors: list[torch.Tensor], cfg: Qwen3Config) -> torch.Tensor:
    """Build the Megatron tensor of `entry` from its HF tensors (in `entry.hf` order)."""
    if entry.kind == "copy":
        return hf_tensors[0]
    if entry.kind == "vocab":
        w = hf_tensors[0]
        pad = cfg.padded_vocab_size - w.shape[0]
        return torch.cat([w, w.new_zeros(pad, w.shape[1])]) if pad else w
    if entry.kind == "fc1":
        return torch.cat(hf_tensors, dim=0)
    if entry.kind == "qkv":
        q, k, v = hf_tensors
        g, d, hidden = cfg.num_query_groups, cfg.head_dim, q.shape[-1]
        per = cfg.num_attention_heads // g
        q = q.view(g, per * d, hidden)
        k = k.view(g, d, hidden)
        v = v.view(g, d, hidden)
        return torch.cat([q, k, v], dim=1).reshape(-1, hidden)
    raise ValueError(f"unknown mapping kind {entry.kind}")


def to_hf(entry: TensorMapping, tensor: torch.Tensor, cfg: Qwen3Config) -> list[torch.Tensor]:
    """Split a Megatron tensor back into its HF tensors (in `entry.hf` order)."""
    if entry.kind == "copy":
        return [tensor]
    if entry.kind == "vocab":
        return [tensor[: cfg.vocab_size]]
    if entry.kind == "fc1":
        gate, up = tensor.chunk(2, dim=0)
        return [gate, up]
    if entry.kind == "qkv":
        g, d, hidden = cfg.num_query_groups, cfg.head_dim, tensor.shape[-1]
        per = cfg.num_attention_heads // g
        grouped = tensor.view(g, (per + 2) * d, hidden)
        q, k, v = torch.split(grouped, [per * d, d, d], dim=1)
        return [q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)]
    raise ValueError(f"unknown mapping kind {entry.kind}")


def hf_to_mcore_state_dict(hf: Mapping[str, torch.Tensor], cfg: Qwen3Config) -> dict[str, torch.Tensor]:
    """Whole-model convenience (tests, small models). Missing tensors raise KeyError naming them."""
    out = {}
    for entry in mapping_table(cfg):
        missing = [n for n in entry.hf if n not in hf]
        if missing:
            raise KeyError(f"HF state dict lacks {', '.join(missing)}")
        out[entry.mcore] = to_mcore(entry, [hf[n] for n in entry.hf], cfg)
    return out


# ---------------------------------------------------------------------------------------------
# Putting unsharded Megatron tensors into this rank's model chunks (in memory, any TP/PP/VPP)
# ---------------------------------------------------------------------------------------------
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
# TE layer spec fuses the pre-attention / pre-MLP norms into the following linear layers
_TE_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def _global_name(chunk, local_name: str) -> str:
    m = _LAYER.match(local_name)
    if not m:
        return local_name
    layer = chunk.decoder.layers[int(m.group(1))]
    rest = m.group(2)
    for local_suffix, te_suffix in _TE_NAMES.items():
        if rest == te_suffix:
            rest = local_suffix
    return f"decoder.layers.{layer.layer_number - 1}.{rest}"


def _shard(full: torch.Tensor, param: torch.nn.Parameter, name: str, tp_rank: int, tp_size: int) -> torch.Tensor:
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if name.endswith("mlp.linear_fc1.weight"):  # gated: shard gate and up separately
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)
    return full.chunk(tp_size, dim=dim)[tp_rank]


def iter_local_parameters(chunks: Iterable) -> Iterator[tuple[str, str, torch.nn.Parameter]]:
    """(global Megatron name, local name, parameter) for every parameter of this rank's chunks."""
    for chunk in chunks:
        module = getattr(chunk, "module", chunk)  # unwrap DDP
        for local_name, param in module.named_parameters():
            yield _global_name(module, local_name), local_name, param


@torch.no_grad()
def load_full_state_dict(chunks: Iterable, full: Mapping[str, torch.Tensor],
                         get: Callable[[str], torch.Tensor] | None = None) -> int:
    """Copy unsharded Megatron tensors (names as in :func:`mapping_table`) into this rank's chunks."""
    from megatron.core import parallel_state as ps

    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    loaded = 0
    for name, local_name, param in iter_local_parameters(chunks):
        if name == "output_layer.weight" and name not in full and "embedding.word_embeddings.weight" in full:
            name = "embedding.word_embeddings.weight"  # tied: last stage holds a copy of the embedding
        if name not in full:
            raise KeyError(f"no tensor for parameter {local_name} (global name {name})")
        shard = _shard(full[name], param, name, tp_rank, tp_size)
        if tuple(shard.shape) != tuple(param.shape):
            raise ValueError(f"{name}: shard shape {tuple(shard.shape)} != parameter shape {tuple(param.shape)}")
        param.copy_(shard.to(param.dtype))
        loaded += 1
    return loaded
