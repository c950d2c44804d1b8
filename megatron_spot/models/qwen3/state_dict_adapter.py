"""Qwen3's state-dict adapter: every Hugging Face <-> Megatron-Core fact about Qwen3 weights.

torchtitan keeps a model family's HF state-dict adapter beside the model; checkpoint/ (save/load, the
HF conversion driver) only calls what is here, so it knows nothing about Qwen3. Here:

- the mapping, declarative: one row per tensor (LAYER_MAPPINGS) with its kind of transform;
- HF and Megatron shapes implied by a config, and the checks of a HF checkpoint against them
  (:func:`hf_tensor_problems`), of a model against a checkpoint's config (:func:`model_mismatches`),
  and of a parallel layout against the model (:func:`layout_problems`); they return problems as text so
  each caller raises its own error type (ConfigError in preflight, CheckpointError when loading);
- the config.json written beside a checkpoint (:func:`hf_config_dict`);
- putting unsharded Megatron tensors into this rank's chunks (tests, small models).

Megatron names are the unsharded (TP1PP1) parameter names of the local layer spec, with global layer
numbers. Fused tensors:
- linear_qkv = per query group g: [q heads of g; k head g; v head g] (each head_dim rows), so that
  column-parallel chunking of dim 0 hands each TP rank whole query groups;
- linear_fc1 = [gate; up] at TP1; a TP rank r holds [gate_r; up_r] (Megatron's gated-linear shard);
- vocabulary rows padded to Qwen3Config.padded_vocab_size (zeros), stripped on the way back.
The table is consumed one entry at a time so converters can stream tensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Optional

import torch

from megatron_spot.models.qwen3.presets import Qwen3Config


@dataclass(frozen=True)
class TensorMapping:
    mcore: str  # Megatron-Core name (TP1, global layer index)
    hf: tuple[str, ...]  # HF tensor name(s) it is built from
    kind: str  # copy | qkv | fc1 | vocab


# The mapping, declaratively (Megatron-Bridge's habit): one row per tensor, "{i}" is the layer index.
# kind: copy (same tensor) | vocab (rows padded to Qwen3Config.padded_vocab_size) | qkv (per query group
# [q heads; k; v]) | fc1 ([gate; up]).
EMBEDDING = ("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")
LAYER_MAPPINGS = (
    ("decoder.layers.{i}.input_layernorm.weight", ("model.layers.{i}.input_layernorm.weight",), "copy"),
    ("decoder.layers.{i}.self_attention.linear_qkv.weight",
     ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
      "model.layers.{i}.self_attn.v_proj.weight"), "qkv"),
    ("decoder.layers.{i}.self_attention.q_layernorm.weight", ("model.layers.{i}.self_attn.q_norm.weight",), "copy"),
    ("decoder.layers.{i}.self_attention.k_layernorm.weight", ("model.layers.{i}.self_attn.k_norm.weight",), "copy"),
    ("decoder.layers.{i}.self_attention.linear_proj.weight", ("model.layers.{i}.self_attn.o_proj.weight",), "copy"),
    ("decoder.layers.{i}.pre_mlp_layernorm.weight", ("model.layers.{i}.post_attention_layernorm.weight",), "copy"),
    ("decoder.layers.{i}.mlp.linear_fc1.weight",
     ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"), "fc1"),
    ("decoder.layers.{i}.mlp.linear_fc2.weight", ("model.layers.{i}.mlp.down_proj.weight",), "copy"),
)
FINAL_NORM = ("decoder.final_layernorm.weight", ("model.norm.weight",), "copy")
OUTPUT_LAYER = ("output_layer.weight", ("lm_head.weight",), "vocab")  # absent when embeddings are tied


def mapping_table(cfg: Qwen3Config) -> list[TensorMapping]:
    """The declarative rows above expanded for cfg's layers, in checkpoint order."""
    def row(mcore: str, hf: tuple, kind: str, i: int = 0) -> TensorMapping:
        return TensorMapping(mcore.format(i=i), tuple(n.format(i=i) for n in hf), kind)

    table = [row(*EMBEDDING)]
    for i in range(cfg.num_hidden_layers):
        table += [row(*spec, i=i) for spec in LAYER_MAPPINGS]
    table.append(row(*FINAL_NORM))
    if not cfg.tie_word_embeddings:
        table.append(row(*OUTPUT_LAYER))
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
# Checks (text, so that each caller raises its own error type)
# ---------------------------------------------------------------------------------------------
# HF tensors that carry no weights of their own (recomputed buffers)
IGNORABLE_HF_SUFFIXES = (".rotary_emb.inv_freq",)


def _names(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def hf_tensor_problems(present: Mapping[str, tuple], cfg: Qwen3Config) -> tuple[Optional[str], list[str]]:
    """(the first problem of a HF checkpoint's tensors {name: shape} against cfg or None, names to ignore).

    Missing, unexpected (attention biases, another architecture) and wrongly shaped tensors; a tied
    model's duplicate lm_head and recomputed rotary buffers are ignored."""
    expected = hf_shapes(cfg)
    ignored = {n for n in present if n.endswith(IGNORABLE_HF_SUFFIXES)}
    if cfg.tie_word_embeddings and "lm_head.weight" in present:
        ignored.add("lm_head.weight")  # tied: some writers store the shared matrix twice
    missing = set(expected) - set(present)
    unexpected = set(present) - set(expected) - ignored
    if missing:
        return f"missing tensor(s) {_names(missing)} ({len(missing)} of {len(expected)})", sorted(ignored)
    if unexpected:
        return (f"unexpected tensor(s) {_names(unexpected)} - not part of a Qwen3 model with this config.json "
                "(attention biases? a different architecture?)"), sorted(ignored)
    bad = [f"{n} has shape {list(present[n])}, config.json implies {list(s)}"
           for n, s in expected.items() if tuple(present[n]) != tuple(s)]
    if bad:
        return ("shape mismatch: " + "; ".join(bad[:5]) + (f" ... and {len(bad) - 5} more" if len(bad) > 5 else ""),
                sorted(ignored))
    return None, sorted(ignored)


def layout_problems(cfg: Qwen3Config, tp: int, pp: int = 1, vpp: Optional[int] = None) -> list[str]:
    """Why Qwen3 `cfg` cannot be split at TP/PP/VPP (empty when it can). The one copy of these rules:
    preflight (models/qwen3/provider.py) and checkpoint loading both ask here."""
    out = []
    if cfg.num_query_groups % tp:
        out.append(f"parallel.tensor_parallel={tp} does not divide the {cfg.num_query_groups} "
                   f"query groups (KV heads); use a TP that divides {cfg.num_query_groups} (e.g. 1, 2, 4, 8 for Qwen3)")
    if cfg.num_attention_heads % tp:
        out.append(f"parallel.tensor_parallel={tp} does not divide the "
                   f"{cfg.num_attention_heads} attention heads")
    if cfg.padded_vocab_size % tp:
        out.append(f"parallel.tensor_parallel={tp} does not divide the padded vocabulary "
                   f"{cfg.padded_vocab_size}")
    stages = pp * (vpp or 1)
    if cfg.num_hidden_layers % stages:
        out.append(f"{cfg.num_hidden_layers} layers do not split into PP x VPP = {pp} x {vpp or 1} = {stages} stages; "
                   f"choose parallel.pipeline_parallel/virtual_pipeline whose product divides {cfg.num_hidden_layers}")
    return out


def model_mismatches(chunk, cfg: Qwen3Config) -> list[str]:
    """Architecture fields where a built GPTModel chunk differs from `cfg` ("name: checkpoint a, model b")."""
    tc = chunk.config
    pairs = [("num_hidden_layers", cfg.num_hidden_layers, tc.num_layers),
             ("hidden_size", cfg.hidden_size, tc.hidden_size),
             ("intermediate_size", cfg.intermediate_size, tc.ffn_hidden_size),
             ("num_attention_heads", cfg.num_attention_heads, tc.num_attention_heads),
             ("num_key_value_heads", cfg.num_query_groups, tc.num_query_groups or tc.num_attention_heads),
             ("head_dim", cfg.head_dim, tc.kv_channels),
             ("padded vocab", cfg.padded_vocab_size, chunk.vocab_size),
             ("tie_word_embeddings", cfg.tie_word_embeddings, chunk.share_embeddings_and_output_weights)]
    return [f"{name}: checkpoint {a}, model {b}" for name, a, b in pairs if a != b]


def hf_config_dict(cfg: Qwen3Config, dtype: str) -> dict:
    """config.json for a checkpoint stored in `dtype` (a config/dtypes.py short name)."""
    from megatron_spot.config.dtypes import HF_DTYPE_NAMES

    d = cfg.to_hf_dict()
    d["torch_dtype"] = HF_DTYPE_NAMES[dtype]
    return d


def generation_defaults(cfg: Qwen3Config) -> dict:
    """generation_config.json when the source has none."""
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    return {k: v for k, v in gen.items() if v is not None}


# the parameter whose dtype is the checkpoint's dtype (norms may stay fp32 with the local spec)
DTYPE_DEFINING_SUFFIX = "linear_fc2.weight"


def config_from_hf_dict(hf: dict, source: str) -> Qwen3Config:
    return Qwen3Config.from_hf_dict(hf, source=source)



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
