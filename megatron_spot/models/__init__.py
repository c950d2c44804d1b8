"""Model families behind one registry (models/registry.py).

Callers outside models/ import only from here: a config for a preset, config.json or checkpoint
(:func:`load_model_config`, :func:`config_from_hf_dict`), the family behind it (:func:`family_of`), and
the family-independent machinery every GPT-style family shares (models/gpt/): TransformerConfig and
model construction, the layout fit, the state-dict adapter over mapping objects. A family's folder
(qwen3/, qwen3_moe/, llama/) holds only its differences; importing this package registers every family.
"""
from megatron_spot.models import llama, qwen3, qwen3_moe  # noqa: F401  (registers the families)
from megatron_spot.models.gpt import state_dict as state_dict_adapter
from megatron_spot.models.gpt.config import VOCAB_PAD_MULTIPLE, GPTConfig, replace
from megatron_spot.models.gpt.provider import (
    build_model_chunks,
    build_transformer_config,
    build_unsharded_model,
    layer_spec,
    meta_parameter_count,
    validate_model_layout,
)
from megatron_spot.models.registry import (
    ModelFamily,
    all_presets,
    config_from_hf_dict,
    families,
    family_of,
    load_model_config,
)

__all__ = [
    "GPTConfig", "ModelFamily", "VOCAB_PAD_MULTIPLE", "all_presets", "build_model_chunks",
    "build_transformer_config", "build_unsharded_model", "config_from_hf_dict", "families", "family_of",
    "layer_spec", "load_model_config", "meta_parameter_count", "replace", "state_dict_adapter",
    "validate_model_layout",
]
