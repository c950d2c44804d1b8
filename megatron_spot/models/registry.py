"""The model-family registry (torchtitan's model_registry, Megatron-Bridge's one bridge per HF
architecture): a family is found from a HF `model_type` (config.json), a preset name or a converted
checkpoint's stored config.json, and gives one spec: its config class (config.json parsing with refusals by
name, TransformerConfig and GPTModel settings, layer-spec choice, mapping objects, layout fit, parameter
and FLOP counts) and its presets. Families register themselves from their package's __init__; adding
one is a folder with a config class and presets plus one line in models/__init__.py.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Any, Optional

from megatron_spot.config.loader import ConfigError, read_json
from megatron_spot.models.gpt.config import GPTConfig


@dataclass(frozen=True)
class ModelFamily:
    name: str
    config_cls: type  # a GPTConfig subclass
    presets: dict  # preset name -> released config.json values

    @property
    def model_type(self) -> str:
        return self.config_cls.model_type

    @property
    def architecture(self) -> str:
        return self.config_cls.architecture


_FAMILIES: dict[str, ModelFamily] = {}  # by HF model_type


def register(family: ModelFamily) -> ModelFamily:
    clash = [p for f in _FAMILIES.values() if f.name != family.name for p in f.presets if p in family.presets]
    if clash:
        raise ValueError(f"preset name(s) {clash} registered twice")
    _FAMILIES[family.model_type] = family
    return family


def families() -> list[ModelFamily]:
    return list(_FAMILIES.values())


def all_presets() -> dict[str, dict[str, Any]]:
    return {name: values for f in _FAMILIES.values() for name, values in f.presets.items()}


def family_of(cfg: GPTConfig) -> ModelFamily:
    return _FAMILIES[type(cfg).model_type]


def family_for_model_type(model_type: Optional[str], source: str) -> ModelFamily:
    if model_type in _FAMILIES:
        return _FAMILIES[model_type]
    supported = ", ".join(f"{f.model_type} ({f.architecture})" for f in _FAMILIES.values())
    raise ConfigError(f"{source}: unsupported model_type {model_type!r}; megatron_spot supports {supported}")


def config_from_hf_dict(hf: dict[str, Any], source: str = "config.json") -> GPTConfig:
    """Parse a config.json (or a checkpoint's stored copy) with its family's parser."""
    model_type = hf.get("model_type")
    if model_type is None:  # older files name only the architecture
        arch = (hf.get("architectures") or [None])[0]
        model_type = next((f.model_type for f in _FAMILIES.values() if f.architecture == arch), None)
    return family_for_model_type(model_type, source).config_cls.from_hf_dict(hf, source=source)


def load_model_config(preset_or_path: str, hf_config: Optional[str] = None) -> GPTConfig:
    """Resolve a preset name (any family), a config.json path or a checkpoint folder to its family's config."""
    source = hf_config or preset_or_path
    presets = all_presets()
    if source in presets:
        return config_from_hf_dict(presets[source], source=f"preset {source}")
    path = os.path.join(source, "config.json") if os.path.isdir(source) else source
    if os.path.isfile(path):
        return config_from_hf_dict(read_json(path), source=path)
    close = difflib.get_close_matches(source, list(presets), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(
        f"unknown model preset or config path '{source}'.{hint} Presets: {', '.join(presets)}; or give a "
        "folder/config.json of a Hugging Face model of a supported family"
    )
