"""Llama 3.x: what differs from the shared GPT description (models/gpt/config.py): no q/k norm, Llama 3's
RoPE scaling (`rope_type: llama3`), its config.json defaults, and the released models' presets.

RoPE scaling goes through Megatron-Core's own implementation (RotaryEmbedding._apply_scaling, the port
of transformers' llama3 rule). GPTModel's constructor passes it only the factor, with Llama 3.1's
frequency factors (1, 4) and original context (8192) as defaults; :meth:`LlamaConfig.configure_model`
applies the same function with all four values from config.json, so any llama3-scaled checkpoint loads
exactly. Other rope types are refused by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from megatron_spot.config.loader import ConfigError
from megatron_spot.models.gpt.config import GPTConfig, rope_parameters

_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class LlamaRopeScaling:
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def to_hf(self) -> dict[str, Any]:
        return {"rope_type": "llama3", "factor": self.factor, "low_freq_factor": self.low_freq_factor,
                "high_freq_factor": self.high_freq_factor,
                "original_max_position_embeddings": self.original_max_position_embeddings}


@dataclass(frozen=True)
class LlamaConfig(GPTConfig):
    rope_scaling: Optional[LlamaRopeScaling] = None

    family: ClassVar[str] = "llama"
    model_type: ClassVar[str] = "llama"
    architecture: ClassVar[str] = "LlamaForCausalLM"
    DEFAULTS: ClassVar[dict] = dict(rms_norm_eps=1e-6, rope_theta=10_000.0, max_position_embeddings=2048)

    @classmethod
    def _refuse(cls, hf: dict[str, Any], source: str) -> None:
        rope = rope_parameters(hf)
        kind = rope.get("rope_type", "default")
        if kind not in ("default", "llama3"):
            raise ConfigError(f"{source}: rope_type={kind!r} is not supported for Llama (only llama3 scaling or none)")
        if kind == "llama3":
            missing = [k for k in _LLAMA3_ROPE_KEYS if rope.get(k) is None]
            if missing:
                raise ConfigError(f"{source}: llama3 rope scaling lacks {', '.join(missing)}")
            extra = set(rope) - set(_LLAMA3_ROPE_KEYS) - {"rope_type", "type", "rope_theta"}
            if extra:
                raise ConfigError(f"{source}: llama3 rope scaling field(s) {', '.join(sorted(extra))} are not supported")
            if rope["high_freq_factor"] <= rope["low_freq_factor"]:
                raise ConfigError(f"{source}: llama3 rope scaling needs high_freq_factor > low_freq_factor")

    @classmethod
    def _family_fields(cls, hf: dict[str, Any], rope: dict[str, Any], source: str) -> dict[str, Any]:
        if rope.get("rope_type", "default") != "llama3":
            return {}
        return {"rope_scaling": LlamaRopeScaling(float(rope["factor"]), float(rope["low_freq_factor"]),
                                                 float(rope["high_freq_factor"]),
                                                 int(rope["original_max_position_embeddings"]))}

    def _family_hf_fields(self) -> dict[str, Any]:
        return {"mlp_bias": False, "pretraining_tp": 1,
                "rope_scaling": self.rope_scaling.to_hf() if self.rope_scaling else None}

    def configure_model(self, model) -> None:
        """Llama 3 RoPE scaling with all four config.json values, by Megatron-Core's own function."""
        rotary = getattr(model, "rotary_pos_emb", None)
        if self.rope_scaling is None or rotary is None:
            return
        s = self.rope_scaling
        rotary.inv_freq = rotary._apply_scaling(
            rotary.inv_freq, factor=s.factor, low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
            original_max_position_embeddings=s.original_max_position_embeddings)


def _preset(vocab, hidden, inter, layers, heads, kv, tied, rope_factor, **extra) -> dict[str, Any]:
    d = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab, hidden_size=hidden,
        intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=hidden // heads, tie_word_embeddings=tied, rms_norm_eps=1e-5, rope_theta=500_000.0,
        max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001, hidden_act="silu",
        attention_bias=False, mlp_bias=False,
        rope_scaling={"rope_type": "llama3", "factor": rope_factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    )
    d.update(extra)
    return d


_INSTRUCT_EOS = [128001, 128008, 128009]  # end_of_text, eom_id, eot_id (the Instruct models' config.json)

# The released models' config.json values (meta-llama/Llama-3.1-*, Llama-3.2-*), and tiny models for tests.
PRESETS: dict[str, dict[str, Any]] = {
    "llama3.1-8b": _preset(128256, 4096, 14336, 32, 32, 8, False, 8.0),
    "llama3.1-8b-instruct": _preset(128256, 4096, 14336, 32, 32, 8, False, 8.0, eos_token_id=_INSTRUCT_EOS),
    "llama3.1-70b": _preset(128256, 8192, 28672, 80, 64, 8, False, 8.0),
    "llama3.1-70b-instruct": _preset(128256, 8192, 28672, 80, 64, 8, False, 8.0, eos_token_id=_INSTRUCT_EOS),
    "llama3.2-1b": _preset(128256, 2048, 8192, 16, 32, 8, True, 32.0),
    "llama3.2-3b": _preset(128256, 3072, 8192, 28, 24, 8, True, 32.0),
    # tiny, Llama-3.1-style (llama3 RoPE scaling with a short original context, so that a few hundred
    # positions already feel it): 4 layers so PP=2 x VPP=2 splits; 4 heads / 2 query groups so TP=2 splits
    "llama3-tiny": _preset(512, 64, 128, 4, 4, 2, False, 8.0, max_position_embeddings=2048, bos_token_id=None,
                           eos_token_id=1, torch_dtype="float32",
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 256}),
    "llama3-tiny-tied": _preset(512, 64, 128, 4, 4, 2, True, 32.0, max_position_embeddings=2048, bos_token_id=None,
                                eos_token_id=1, torch_dtype="float32",
                                rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 256}),
}
