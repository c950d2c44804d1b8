"""The state-dict adapter every GPT-style family shares: the mapping table expanded for a config, the HF
and Megatron shapes it implies, the checks of a HF checkpoint and of a built model against a config, the
config.json written beside a checkpoint, and putting unsharded Megatron tensors into this rank's chunks.

torchtitan keeps a family's HF state-dict adapter beside the model; checkpoint/ only calls what is here
(through models/__init__.py), so it knows no family. Checks return problems as text so each caller
raises its own error type (ConfigError in preflight, CheckpointError when loading). The table is consumed
one entry at a time so converters can stream tensors.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Iterator, Mapping, Optional

import torch

from megatron_spot.models.gpt.config import GPTConfig
from megatron_spot.models.gpt.mappings import EMBEDDING, FINAL_NORM, OUTPUT_LAYER, TensorMapping


def mapping_table(cfg: GPTConfig) -> list[TensorMapping]:
    """The family's mapping rows expanded for cfg's layers, in checkpoint order."""
    table = [EMBEDDING]
    for i in range(cfg.num_hidden_layers):
        table += [m.at(i) for m in cfg.layer_mappings(i)]
    table.append(FINAL_NORM)
    if not cfg.tie_word_embeddings:
        table.append(OUTPUT_LAYER)
    return table


def hf_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    return {name: shape for m in mapping_table(cfg) for name, shape in zip(m.hf, m.hf_shapes(cfg))}


def mcore_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    return {m.mcore: m.mcore_shape(cfg) for m in mapping_table(cfg)}


def hf_to_mcore_state_dict(hf: Mapping[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Whole-model convenience (tests, small models). Missing tensors raise KeyError naming them."""
    out = {}
    for entry in mapping_table(cfg):
        missing = [n for n in entry.hf if n not in hf]
        if missing:
            raise KeyError(f"HF state dict lacks {', '.join(missing)}")
        out[entry.mcore] = entry.to_mcore([hf[n] for n in entry.hf], cfg)
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


def hf_tensor_problems(present: Mapping[str, tuple], cfg: GPTConfig) -> tuple[Optional[str], list[str]]:
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
        return (f"unexpected tensor(s) {_names(unexpected)} - not part of a {cfg.architecture} model with this "
                "config.json (attention biases? a different architecture?)"), sorted(ignored)
    bad = [f"{n} has shape {list(present[n])}, config.json implies {list(s)}"
           for n, s in expected.items() if tuple(present[n]) != tuple(s)]
    if bad:
        return ("shape mismatch: " + "; ".join(bad[:5]) + (f" ... and {len(bad) - 5} more" if len(bad) > 5 else ""),
                sorted(ignored))
    return None, sorted(ignored)


def model_mismatches(chunk, cfg: GPTConfig) -> list[str]:
    """Architecture fields where a built GPTModel chunk differs from `cfg` ("name: checkpoint a, model b")."""
    tc = chunk.config
    built = getattr(chunk, "family_config", None)
    pairs = [("architecture", cfg.architecture, getattr(built, "architecture", cfg.architecture)),
             ("num_hidden_layers", cfg.num_hidden_layers, tc.num_layers),
             ("hidden_size", cfg.hidden_size, tc.hidden_size),
             ("intermediate_size", cfg.intermediate_size, tc.ffn_hidden_size),
             ("num_attention_heads", cfg.num_attention_heads, tc.num_attention_heads),
             ("num_key_value_heads", cfg.num_query_groups, tc.num_query_groups or tc.num_attention_heads),
             ("head_dim", cfg.head_dim, tc.kv_channels),
             ("q/k norm", cfg.qk_layernorm, bool(tc.qk_layernorm)),
             ("experts", cfg.num_moe_experts, tc.num_moe_experts or 0),
             ("padded vocab", cfg.padded_vocab_size, chunk.vocab_size),
             ("tie_word_embeddings", cfg.tie_word_embeddings, chunk.share_embeddings_and_output_weights)]
    return [f"{name}: checkpoint {a}, model {b}" for name, a, b in pairs if a != b]


def hf_config_dict(cfg: GPTConfig, dtype: str) -> dict:
    """config.json for a checkpoint stored in `dtype` (a config/dtypes.py short name)."""
    from megatron_spot.config.dtypes import HF_DTYPE_NAMES

    d = cfg.to_hf_dict()
    d["torch_dtype"] = HF_DTYPE_NAMES[dtype]
    return d


def generation_defaults(cfg: GPTConfig) -> dict:
    """generation_config.json when the source has none."""
    eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos}
    return {k: v for k, v in gen.items() if v is not None}


# the parameter whose dtype is the checkpoint's dtype (norms may stay fp32 with the local spec)
DTYPE_DEFINING_SUFFIX = "linear_fc2.weight"


# ---------------------------------------------------------------------------------------------
# Putting unsharded Megatron tensors into this rank's model chunks (in memory, any TP/PP/VPP)
# ---------------------------------------------------------------------------------------------
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
# TE layer spec fuses the pre-attention / pre-MLP norms into the following linear layers
_TE_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


# an expert of Megatron-Core's SequentialMLP: this rank holds experts [ep_rank * n, (ep_rank + 1) * n)
_LOCAL_EXPERT = re.compile(r"^(mlp\.experts\.local_experts\.)(\d+)(\..*)$")
# the same weight in TEGroupedMLP: local expert e's matrix is parameter weight{e} of the grouped linear
_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc[12])\.weight(\d+)$")


def _global_name(chunk, local_name: str) -> str:
    m = _LAYER.match(local_name)
    if not m:
        return local_name
    layer = chunk.decoder.layers[int(m.group(1))]
    rest = m.group(2)
    for local_suffix, te_suffix in _TE_NAMES.items():
        if rest == te_suffix:
            rest = local_suffix
    sequential, grouped = _LOCAL_EXPERT.match(rest), _GROUPED_EXPERT.match(rest)
    if sequential or grouped:  # global expert number, as in the unsharded (EP1) names of the mapping table
        experts = layer.mlp.experts
        first = experts.ep_group.rank() * experts.num_local_experts
        if sequential:
            rest = f"{sequential.group(1)}{first + int(sequential.group(2))}{sequential.group(3)}"
        else:
            rest = f"mlp.experts.local_experts.{first + int(grouped.group(2))}.{grouped.group(1)}.weight"
    return f"decoder.layers.{layer.layer_number - 1}.{rest}"


def iter_local_parameters(chunks: Iterable) -> Iterator[tuple[str, str, torch.nn.Parameter]]:
    """(global Megatron name, local name, parameter) for every parameter of this rank's chunks."""
    for chunk in chunks:
        module = getattr(chunk, "module", chunk)  # unwrap DDP
        for local_name, param in module.named_parameters():
            yield _global_name(module, local_name), local_name, param


@torch.no_grad()
def load_full_state_dict(chunks: Iterable, full: Mapping[str, torch.Tensor],
                         get: Callable[[str], torch.Tensor] | None = None) -> int:
    """Copy unsharded Megatron tensors (names as in :func:`mapping_table`) into this rank's chunks; each
    tensor is split for this TP rank by its mapping object."""
    from megatron.core import parallel_state as ps

    chunks = list(chunks)
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    # experts are split over their own tensor-parallel group (ETP), not the dense layers' TP
    etp_rank, etp_size = ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
    cfg = getattr(getattr(chunks[0], "module", chunks[0]), "family_config", None) if chunks else None
    mappings = {m.mcore: m for m in mapping_table(cfg)} if cfg is not None else {}
    loaded = 0
    for name, local_name, param in iter_local_parameters(chunks):
        if name == "output_layer.weight" and name not in full and "embedding.word_embeddings.weight" in full:
            name = "embedding.word_embeddings.weight"  # tied: last stage holds a copy of the embedding
        if name not in full:
            raise KeyError(f"no tensor for parameter {local_name} (global name {name})")
        shard = full[name]
        rank, size = (etp_rank, etp_size) if ".mlp.experts." in name else (tp_rank, tp_size)
        if size > 1 and getattr(param, "tensor_model_parallel", False):
            mapping = mappings.get(name) or TensorMapping(name, ())
            shard = mapping.tp_shard(shard, param.partition_dim, rank, size)
        if tuple(shard.shape) != tuple(param.shape):
            raise ValueError(f"{name}: shard shape {tuple(shard.shape)} != parameter shape {tuple(param.shape)}")
        param.copy_(shard.to(param.dtype))
        loaded += 1
    return loaded
