"""Everything Qwen3-specific: presets, Megatron-Core model construction (provider), the model subclass
(model.py), and the HF state-dict adapter (mapping + HF checks, state_dict_adapter.py)."""
from megatron_spot.models.qwen3.presets import PRESETS, VOCAB_PAD_MULTIPLE, Qwen3Config, load_qwen3_config
from megatron_spot.models.qwen3.provider import (
    build_model_chunks,
    build_transformer_config,
    layer_spec,
    meta_parameter_count,
    transformer_engine_available,
    validate_model_layout,
)

__all__ = [
    "PRESETS", "VOCAB_PAD_MULTIPLE", "Qwen3Config", "load_qwen3_config", "build_model_chunks",
    "build_transformer_config", "layer_spec", "meta_parameter_count", "transformer_engine_available", "validate_model_layout",
]
