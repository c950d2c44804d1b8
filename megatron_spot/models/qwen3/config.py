"""Qwen3 (dense): what differs from the shared GPT description (models/gpt/config.py): q/k RMSNorm per
head, its config.json defaults, and the released models' presets."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from megatron_spot.models.gpt.config import GPTConfig
from megatron_spot.models.gpt.mappings import DENSE_LAYER, QK_NORMS


@dataclass(frozen=True)
class Qwen3Config(GPTConfig):
    # config.json defaults live in DEFAULTS (configs are only ever built by from_hf_dict)
    family: ClassVar[str] = "qwen3"
    model_type: ClassVar[str] = "qwen3"
    architecture: ClassVar[str] = "Qwen3ForCausalLM"
    DEFAULTS: ClassVar[dict] = dict(rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=40960)
    qk_layernorm: ClassVar[bool] = True

    def layer_mappings(self, layer: int) -> tuple:
        # q/k norms sit between the fused QKV and the output projection in checkpoint order
        return DENSE_LAYER[:2] + QK_NORMS + DENSE_LAYER[2:]

    def _family_hf_fields(self) -> dict[str, Any]:
        return {"max_window_layers": self.num_hidden_layers, "sliding_window": None, "use_sliding_window": False}


def _preset(vocab, hidden, inter, layers, heads, kv, head_dim, tied, **extra) -> dict[str, Any]:
    d = dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=vocab, hidden_size=hidden,
        intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, head_dim=head_dim, tie_word_embeddings=tied, rms_norm_eps=1e-6,
        rope_theta=1_000_000.0, max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645,
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
