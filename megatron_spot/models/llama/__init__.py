"""Llama 3.x: config differences (llama3 RoPE scaling, no q/k norm) and presets; registered as `llama`."""
from megatron_spot.models.llama.config import PRESETS, LlamaConfig
from megatron_spot.models.registry import ModelFamily, register

FAMILY = register(ModelFamily("llama", LlamaConfig, PRESETS))
