"""Qwen3-MoE (Qwen3MoeForCausalLM): config differences, presets and the router/expert mapping objects;
registered as the `qwen3_moe` family."""
from megatron_spot.models.qwen3_moe.config import PRESETS, Qwen3MoeConfig
from megatron_spot.models.registry import ModelFamily, register

FAMILY = register(ModelFamily("qwen3_moe", Qwen3MoeConfig, PRESETS))
