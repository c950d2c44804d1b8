"""Qwen3 (dense): config differences and presets; registered as the `qwen3` family."""
from megatron_spot.models.qwen3.config import PRESETS, Qwen3Config
from megatron_spot.models.registry import ModelFamily, register

FAMILY = register(ModelFamily("qwen3", Qwen3Config, PRESETS))
