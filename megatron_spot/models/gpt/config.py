"""What every GPT-style family's architecture description shares, built from Hugging Face config.json.

A family subclasses :class:`GPTConfig` and states only its differences (class attributes for its HF
identity and defaults, :meth:`GPTConfig._family_fields` / :meth:`GPTConfig._refuse` for fields of its
own, :meth:`GPTConfig.layer_mappings` for extra tensors, the Megatron-Core settings hooks). Presets are the
released models' config.json values, so a real config.json and a preset go through the same parser.
Configs are frozen: the same object describes the model to preflight, the provider, the conversion
driver and the profiler.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

from megatron_spot.config.loader import ConfigError

# Megatron pads the vocabulary so every TP rank holds an equal shard. A padding that depends on TP
# would make checkpoints TP-specific, so pad to a fixed multiple that every TP size up to 128
# divides; Qwen3's 151,936 (= 128 x 1187) and Llama 3's 128,256 (= 128 x 1002) need none.
VOCAB_PAD_MULTIPLE = 128

# rope_scaling / rope_parameters keys that only describe the default rotary embedding
_ROPE_DEFAULT_KEYS = {"rope_type", "type", "rope_theta"}


def rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    """The rotary settings of a config.json in one dict: transformers 4 writes `rope_theta` and
    `rope_scaling`, transformers 5 nests both under `rope_parameters`."""
    out = dict(hf.get("rope_parameters") or {})
    out.update({k: v for k, v in (hf.get("rope_scaling") or {}).items()})
    if hf.get("rope_theta") is not None:
        out["rope_theta"] = hf["rope_theta"]
    if "type" in out and "rope_type" not in out:
        out["rope_type"] = out["type"]
    return out


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    max_position_embeddings: int = 4096
    bos_token_id: Optional[int] = None
    # an int, or a tuple when config.json lists several (Llama 3.1 Instruct: end_of_text, eom, eot)
    eos_token_id: Optional[Union[int, tuple]] = None
    torch_dtype: str = "bfloat16"

    # --- a family's identity and defaults (class attributes, overridden by each family) ---
    family: ClassVar[str] = "gpt"
    model_type: ClassVar[str] = ""
    architecture: ClassVar[str] = ""
    DEFAULTS: ClassVar[dict] = {}  # config.json defaults of fields a released config may omit
    qk_layernorm: ClassVar[bool] = False

    # ------------------------------------------------------------------ derived facts
    @property
    def padded_vocab_size(self) -> int:
        m = VOCAB_PAD_MULTIPLE
        return (self.vocab_size + m - 1) // m * m

    @property
    def num_query_groups(self) -> int:
        return self.num_key_value_heads

    @property
    def first_eos_token_id(self) -> Optional[int]:
        eos = self.eos_token_id
        return eos[0] if isinstance(eos, tuple) else eos

    def layer_matmul_parameters(self) -> int:
        """Weights of one layer's matmuls (attention projections and the gated MLP)."""
        h, d, f = self.hidden_size, self.head_dim, self.intermediate_size
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        return h * (q + 2 * kv) + q * h + 3 * h * f

    def layer_expert_parameters(self) -> int:
        """The part of layer_matmul_parameters() held by routed experts (split over EP x ETP, not TP); 0 when dense."""
        return 0

    def layer_norm_parameters(self) -> int:
        """Weights of one layer's norms (pre-attention and pre-MLP RMSNorm; q/k norms where the family has them)."""
        return 2 * self.hidden_size + (2 * self.head_dim if self.qk_layernorm else 0)

    def num_parameters(self) -> int:
        """Parameter count of the HF model (unpadded vocab), from the shapes alone."""
        per_layer = self.layer_matmul_parameters() + self.layer_norm_parameters()
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return embed + self.num_hidden_layers * per_layer + self.hidden_size

    def matmul_params_per_token(self) -> int:
        """Weights touched by one token's matmuls (the N of 6N), LM head included."""
        return self.num_hidden_layers * self.layer_matmul_parameters() + self.hidden_size * self.vocab_size

    # ------------------------------------------------------------------ config.json
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json") -> "GPTConfig":
        """Parse a config.json of this family; every field this code would silently ignore is refused by name."""
        arch = hf.get("architectures") or [cls.architecture]
        model_type = hf.get("model_type", cls.model_type)
        if model_type != cls.model_type or cls.architecture not in arch:
            raise ConfigError(f"{source}: unsupported architecture {arch} (model_type={model_type!r}) for the "
                              f"{cls.family} family ({cls.architecture})")
        if hf.get("attention_bias"):
            raise ConfigError(f"{source}: attention_bias=true is not supported ({cls.architecture} has no q/k/v biases)")
        if hf.get("mlp_bias"):
            raise ConfigError(f"{source}: mlp_bias=true is not supported")
        if hf.get("use_sliding_window") and hf.get("sliding_window"):
            raise ConfigError(f"{source}: sliding-window attention (use_sliding_window=true) is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (only silu)")
        if hf.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError(f"{source}: pretraining_tp={hf['pretraining_tp']} is not supported (use 1)")
        cls._refuse(hf, source)
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        missing = [k for k in required if k not in hf]
        if missing:
            raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")
        d = cls.DEFAULTS
        heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id", d.get("eos_token_id"))
        if isinstance(eos, list):  # several end tokens stay a tuple (hashable, frozen); one is an int
            eos = tuple(eos) if len(eos) > 1 else eos[0]
        rope = rope_parameters(hf)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", d.get("tie_word_embeddings", False))),
            rms_norm_eps=hf.get("rms_norm_eps", d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10_000.0))),
            max_position_embeddings=hf.get("max_position_embeddings", d.get("max_position_embeddings", 4096)),
            bos_token_id=hf.get("bos_token_id", d.get("bos_token_id")),
            eos_token_id=eos,
            torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"),
            **cls._family_fields(hf, rope, source),
        )

    @classmethod
    def _refuse(cls, hf: dict[str, Any], source: str) -> None:
        """Raise ConfigError for config.json fields this family cannot honour (the base: any rope scaling)."""
        rope = rope_parameters(hf)
        if rope.get("rope_type", "default") != "default" or set(rope) - _ROPE_DEFAULT_KEYS:
            raise ConfigError(f"{source}: rope scaling {rope!r} is not supported for {cls.architecture}")

    @classmethod
    def _family_fields(cls, hf: dict[str, Any], rope: dict[str, Any], source: str) -> dict[str, Any]:
        """Constructor arguments of the family's own fields, read from config.json."""
        return {}

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers (and vLLM/SGLang) load for this family."""
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        d = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": None,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.torch_dtype,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }
        d.update(self._family_hf_fields())
        return d

    def _family_hf_fields(self) -> dict[str, Any]:
        return {}

    # ------------------------------------------------------------------ Megatron-Core hooks
    def transformer_config_kwargs(self) -> dict[str, Any]:
        """TransformerConfig settings that differ between families (the shared ones are the provider's)."""
        return {"qk_layernorm": self.qk_layernorm}

    def layer_spec_kwargs(self, use_te: bool) -> dict[str, Any]:
        """Arguments of Megatron-Core's layer-spec builders (get_gpt_layer_local_spec and the TE one) that
        differ between families (an MoE family adds num_experts; grouped or sequential experts are the
        provider's choice, from TransformerConfig.moe_grouped_gemm)."""
        return {"qk_layernorm": self.qk_layernorm}

    def gpt_model_kwargs(self) -> dict[str, Any]:
        """GPTModel constructor arguments of the family (rotary embedding)."""
        return {"position_embedding_type": "rope", "rotary_base": int(self.rope_theta)}

    def configure_model(self, model) -> None:
        """Adjust a built GPTModel chunk in ways its constructor cannot express (none for the base)."""

    # --- mixture of experts (a dense family keeps these defaults) ---
    @property
    def num_moe_experts(self) -> int:
        """Routed experts per MoE layer; 0 for a dense model."""
        return 0

    def moe_transformer_config_kwargs(self, moe, use_te: bool) -> dict[str, Any]:
        """TransformerConfig MoE settings from the model and the run's `moe:` section (config/schema.py MoEConfig)."""
        return {}

    @property
    def moe_layers(self) -> Optional[tuple[bool, ...]]:
        """Which layers are MoE layers, when only some are (the others have a dense MLP); None when every layer
        is alike (all dense, or all MoE)."""
        return None

    @property
    def moe_layer_fraction(self) -> float:
        """The share of layers that are MoE layers (0.0 for a dense model)."""
        layers = self.moe_layers
        if layers is None:
            return 1.0 if self.num_moe_experts else 0.0
        return sum(layers) / len(layers)

    def layer_mappings(self, layer: int) -> tuple:
        """Layer `layer`'s HF <-> Megatron mapping objects, "{i}" unfilled (see models/gpt/mappings.py)."""
        from megatron_spot.models.gpt.mappings import DENSE_LAYER

        return DENSE_LAYER

    def layout_problems(self, tp: int, pp: int = 1, vpp: Optional[int] = None, ep: int = 1,
                        etp: Optional[int] = None) -> list[str]:
        """Why the model cannot be split at TP/PP/VPP and expert parallel EP / expert tensor parallel ETP
        (empty when it can): the one copy of these rules, asked by preflight and by checkpoint loading."""
        out = []
        if ep > 1 and not self.num_moe_experts:
            out.append(f"parallel.expert_parallel={ep} needs a mixture-of-experts model; {self.architecture} has no "
                       "experts (set parallel.expert_parallel=1)")
        if self.num_query_groups % tp:
            out.append(f"parallel.tensor_parallel={tp} does not divide the {self.num_query_groups} query groups "
                       f"(KV heads); use a TP that divides {self.num_query_groups}")
        if self.num_attention_heads % tp:
            out.append(f"parallel.tensor_parallel={tp} does not divide the {self.num_attention_heads} attention heads")
        if self.padded_vocab_size % tp:
            out.append(f"parallel.tensor_parallel={tp} does not divide the padded vocabulary {self.padded_vocab_size}")
        stages = pp * (vpp or 1)
        if self.num_hidden_layers % stages:
            out.append(f"{self.num_hidden_layers} layers do not split into PP x VPP = {pp} x {vpp or 1} = {stages} "
                       f"stages; choose parallel.pipeline_parallel/virtual_pipeline whose product divides "
                       f"{self.num_hidden_layers}")
        return out


def replace(cfg: GPTConfig, **changes) -> GPTConfig:
    return dataclasses.replace(cfg, **changes)
