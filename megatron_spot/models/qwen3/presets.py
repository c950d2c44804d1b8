"""Qwen3 architecture description, built from Hugging Face `config.json` fields.

Presets are the released models' config.json values (plus tiny ones for tests), so a real
config.json and a preset go through the same code.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Optional

from megatron_spot.config.loader import ConfigError, read_json

# Megatron pads the vocabulary so every TP rank holds an equal shard. A padding that depends on TP
# would make checkpoints TP-specific, so pad to a fixed multiple that every TP size up to 128
# divides; Qwen3's 151,936 (= 128 x 1187) needs no padding at all.
VOCAB_PAD_MULTIPLE = 128


@dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    bos_token_id: Optional[int] = 151643
    eos_token_id: Optional[int] = 151645
    torch_dtype: str = "bfloat16"

    @property
    def padded_vocab_size(self) -> int:
        m = VOCAB_PAD_MULTIPLE
        return (self.vocab_size + m - 1) // m * m

    @property
    def num_query_groups(self) -> int:
        return self.num_key_value_heads

    def num_parameters(self) -> int:
        """Parameter count of the HF model (unpadded vocab), from the shapes alone."""
        h, v, f, d = self.hidden_size, self.vocab_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        per_layer = h * q + 2 * h * kv + q * h + 2 * d + 3 * h * f + 2 * h
        embed = v * h * (1 if self.tie_word_embeddings else 2)
        return embed + self.num_hidden_layers * per_layer + h

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json") -> "Qwen3Config":
        arch = hf.get("architectures") or ["Qwen3ForCausalLM"]
        model_type = hf.get("model_type", "qwen3")
        if model_type != "qwen3" or "Qwen3ForCausalLM" not in arch:
            raise ConfigError(
                f"{source}: unsupported architecture {arch} (model_type={model_type!r}); "
                "megatron_spot supports dense Qwen3 (Qwen3ForCausalLM)"
            )
        if hf.get("attention_bias"):
            raise ConfigError(f"{source}: attention_bias=true is not supported (Qwen3 has no q/k/v biases)")
        if hf.get("use_sliding_window") and hf.get("sliding_window"):
            raise ConfigError(f"{source}: sliding-window attention (use_sliding_window=true) is not supported")
        if hf.get("rope_scaling") not in (None, {}) and (hf.get("rope_scaling") or {}).get("rope_type", "default") != "default":
            raise ConfigError(f"{source}: rope_scaling={hf['rope_scaling']!r} is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (Qwen3 uses silu)")
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        missing = [k for k in required if k not in hf]
        if missing:
            raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")
        heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0]
        rope_theta = hf.get("rope_theta")
        if rope_theta is None:  # transformers 5 nests it under rope_parameters
            rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 1_000_000.0)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads", heads),
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=hf.get("max_position_embeddings", 40960),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos,
            torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers' Qwen3ForCausalLM (and vLLM/SGLang) load."""
        return {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "max_window_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": None,
            "rope_theta": self.rope_theta,
            "sliding_window": None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.torch_dtype,
            "use_cache": True,
            "use_sliding_window": False,
            "vocab_size": self.vocab_size,
        }


def _preset(vocab, hidden, inter, layers, heads, kv, head_dim, tied, **extra) -> dict[str, Any]:
    d = dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=vocab, hidden_size=hidden,
        intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, head_dim=head_dim, tie_word_embeddings=tied, rms_norm_eps=1e-6,
        rope_theta=1_000_000.0, max_position_embeddings=40960,
    )
    d.update(extra)
    return d


# The released models' config.json values (Qwen/Qwen3-*), and tiny models for tests and demos.
PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": _preset(151936, 1024, 3072, 28, 16, 8, 128, True),
    "qwen3-1.7b": _preset(151936, 2048, 6144, 28, 16, 8, 128, True),
    "qwen3-4b": _preset(151936, 2560, 9728, 36, 32, 8, 128, True),
    "qwen3-8b": _preset(151936, 4096, 12288, 36, 32, 8, 128, False),
    "qwen3-14b": _preset(151936, 5120, 17408, 40, 40, 8, 128, False),
    "qwen3-32b": _preset(151936, 5120, 25600, 64, 64, 8, 128, False),
    # tiny: 4 layers so PP=2 x VPP=2 splits; 4 heads / 2 query groups so TP=2 splits
    "qwen3-tiny": _preset(512, 64, 128, 4, 4, 2, 16, False, max_position_embeddings=1024,
                          bos_token_id=None, eos_token_id=1, torch_dtype="float32"),
    "qwen3-tiny-tied": _preset(512, 64, 128, 4, 4, 2, 16, True, max_position_embeddings=1024,
                               bos_token_id=None, eos_token_id=1, torch_dtype="float32"),
}


def load_qwen3_config(preset_or_path: str, hf_config: Optional[str] = None) -> Qwen3Config:
    """Resolve a preset name, a config.json path or a checkpoint folder to a Qwen3Config."""
    source = hf_config or preset_or_path
    if source in PRESETS:
        return Qwen3Config.from_hf_dict(PRESETS[source], source=f"preset {source}")
    path = os.path.join(source, "config.json") if os.path.isdir(source) else source
    if os.path.isfile(path):
        return Qwen3Config.from_hf_dict(read_json(path), source=path)
    import difflib

    close = difflib.get_close_matches(source, list(PRESETS), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(
        f"unknown model preset or config path '{source}'.{hint} "
        f"Presets: {', '.join(PRESETS)}; or give a folder/config.json of a Hugging Face Qwen3 model"
    )


def replace(cfg: Qwen3Config, **changes) -> Qwen3Config:
    return dataclasses.replace(cfg, **changes)
