"""Qwen3-MoE (Qwen3MoeForCausalLM): what differs from dense Qwen3 (models/qwen3/config.py): every layer's
MLP is a mixture of experts (a softmax router over `num_experts`, the top `num_experts_per_tok` of them
per token, their weights renormalised when `norm_topk_prob`), and the released models' presets.

Megatron-Core runs it with its MoE layer: the router (`moe_router_score_function=softmax`; without
pre-softmax Megatron softmaxes the top-k logits, which is HF's renormalised top-k; with pre-softmax it
keeps the full softmax's top-k values, which is HF without `norm_topk_prob`), the all-to-all token
dispatcher (expert parallel), and the experts as TEGroupedMLP (one grouped GEMM per layer: Transformer
Engine's on GPUs, models/gpt/grouped_experts.py's twin without TE) or SequentialMLP (`moe.experts`; by
default grouped where TE runs). Dropless by default (`moe.capacity_factor`).

Dense MLP layers among the MoE ones are honoured as transformers builds them: layer i is an MoE layer when
i is not in `mlp_only_layers` and (i + 1) % `decoder_sparse_step` == 0, a dense Qwen3 MLP of
`intermediate_size` otherwise (Megatron-Core's `moe_layer_freq` list; no released Qwen3-MoE has one).
Refused by name: shared experts, a model without any MoE layer, sliding windows and rope scaling (the dense
Qwen3 rules).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from megatron_spot.config.loader import ConfigError
from megatron_spot.models.gpt.mappings import DENSE_LAYER, QK_NORMS
from megatron_spot.models.qwen3.config import Qwen3Config

LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")
EXPERT_LAYOUTS = ("auto", "grouped", "sequential")


@dataclass(frozen=True)
class Qwen3MoeConfig(Qwen3Config):
    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    family: ClassVar[str] = "qwen3_moe"
    model_type: ClassVar[str] = "qwen3_moe"
    architecture: ClassVar[str] = "Qwen3MoeForCausalLM"

    # ------------------------------------------------------------------ config.json
    @classmethod
    def _refuse(cls, hf: dict[str, Any], source: str) -> None:
        super()._refuse(hf, source)
        step, layers = hf.get("decoder_sparse_step", 1), hf.get("num_hidden_layers", 0)
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ConfigError(f"{source}: decoder_sparse_step={step!r} must be an integer >= 1")
        dense = hf.get("mlp_only_layers") or []
        if not isinstance(dense, list) or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < layers
                                              for i in dense):
            raise ConfigError(f"{source}: mlp_only_layers={dense!r} must list layer numbers in [0, {layers})")
        if layers and not any(_is_moe_layer(i, step, dense) for i in range(layers)):
            raise ConfigError(f"{source}: decoder_sparse_step={step} and mlp_only_layers={dense} leave no MoE layer; "
                              "a model without experts is a dense Qwen3 (model_type qwen3)")
        if hf.get("shared_expert_intermediate_size"):
            raise ConfigError(f"{source}: shared_expert_intermediate_size={hf['shared_expert_intermediate_size']} "
                              "(a shared expert) is not supported; Qwen3-MoE has none")
        experts = _num_experts(hf, source)
        missing = [k for k, v in (("num_experts", experts), ("moe_intermediate_size", hf.get("moe_intermediate_size")))
                   if not v]
        if missing:
            raise ConfigError(f"{source}: missing field(s) {', '.join(missing)} (a Qwen3-MoE config.json names them)")
        top_k = hf.get("num_experts_per_tok", 8)
        if not 1 <= top_k <= experts:
            raise ConfigError(f"{source}: num_experts_per_tok={top_k} must be between 1 and num_experts={experts}")

    @classmethod
    def _family_fields(cls, hf: dict[str, Any], rope: dict[str, Any], source: str) -> dict[str, Any]:
        return dict(num_experts=int(_num_experts(hf, source)), num_experts_per_tok=int(hf.get("num_experts_per_tok", 8)),
                    moe_intermediate_size=int(hf["moe_intermediate_size"]),
                    # transformers' default is False; every released Qwen3-MoE sets it true
                    norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                    router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
                    decoder_sparse_step=int(hf.get("decoder_sparse_step", 1)),
                    mlp_only_layers=tuple(sorted(set(hf.get("mlp_only_layers") or []))))

    def _family_hf_fields(self) -> dict[str, Any]:
        return dict(super()._family_hf_fields(), decoder_sparse_step=self.decoder_sparse_step,
                    mlp_only_layers=list(self.mlp_only_layers),
                    num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                    moe_intermediate_size=self.moe_intermediate_size, norm_topk_prob=self.norm_topk_prob,
                    router_aux_loss_coef=self.router_aux_loss_coef, output_router_logits=False)

    # ------------------------------------------------------------------ counts
    def _attention_parameters(self) -> int:
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        return h * (q + 2 * kv) + q * h

    def _expert_parameters(self) -> int:
        return 3 * self.hidden_size * self.moe_intermediate_size

    def _dense_mlp_parameters(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    def _mlp_parameters(self, experts_used: int) -> tuple[int, int]:
        """(summed over the layers: MLP matmul weights with `experts_used` experts per MoE layer, of them in
        routed experts): router + experts in MoE layers, the dense MLP in the others."""
        pattern = self.moe_layers
        moe = self.num_hidden_layers if pattern is None else sum(pattern)
        experts = moe * experts_used * self._expert_parameters()
        return experts + moe * self.num_experts * self.hidden_size + (self.num_hidden_layers - moe) * \
            self._dense_mlp_parameters(), experts

    def layer_matmul_parameters(self) -> int:
        """One layer's matmul weights: attention, router, every expert (averaged over the layers when some have
        a dense MLP instead)."""
        return self._attention_parameters() + self._mlp_parameters(self.num_experts)[0] // self.num_hidden_layers

    def layer_expert_parameters(self) -> int:
        return self._mlp_parameters(self.num_experts)[1] // self.num_hidden_layers

    def num_parameters(self) -> int:
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        per_layer = self._attention_parameters() + self.layer_norm_parameters()
        return embed + self.num_hidden_layers * per_layer + self._mlp_parameters(self.num_experts)[0] + self.hidden_size

    def active_parameters(self) -> int:
        """Parameters one token uses (its top-k experts): the "A3B" / "A22B" of the released names."""
        return self.num_parameters() - self._mlp_parameters(self.num_experts - self.num_experts_per_tok)[1]

    def matmul_params_per_token(self) -> int:
        """Weights one token's matmuls touch (the N of 6N): attention, router, its top-k experts, LM head."""
        return (self.num_hidden_layers * self._attention_parameters() + self._mlp_parameters(self.num_experts_per_tok)[0]
                + self.hidden_size * self.vocab_size)

    @property
    def moe_layers(self) -> Optional[tuple[bool, ...]]:
        layers = tuple(_is_moe_layer(i, self.decoder_sparse_step, self.mlp_only_layers)
                       for i in range(self.num_hidden_layers))
        return None if all(layers) else layers

    # ------------------------------------------------------------------ Megatron-Core hooks
    @property
    def num_moe_experts(self) -> int:
        return self.num_experts

    def moe_transformer_config_kwargs(self, moe, use_te: bool) -> dict[str, Any]:
        if moe.load_balancing not in LOAD_BALANCING:
            raise ConfigError(f"moe.load_balancing={moe.load_balancing!r}: choose one of {', '.join(LOAD_BALANCING)}")
        coeff = self.router_aux_loss_coef if moe.aux_loss_coeff is None else moe.aux_loss_coeff
        if coeff < 0:
            raise ConfigError(f"moe.aux_loss_coeff={coeff} must be >= 0")
        if moe.experts not in EXPERT_LAYOUTS:
            raise ConfigError(f"moe.experts={moe.experts!r}: choose one of {', '.join(EXPERT_LAYOUTS)}")
        if moe.z_loss_coeff is not None and moe.z_loss_coeff < 0:
            raise ConfigError(f"moe.z_loss_coeff={moe.z_loss_coeff} must be >= 0 (or null: off)")
        if moe.capacity_factor is not None and moe.capacity_factor <= 0:
            raise ConfigError(f"moe.capacity_factor={moe.capacity_factor} must be > 0 (or null: dropless)")
        return dict(
            num_moe_experts=self.num_experts,
            moe_router_topk=self.num_experts_per_tok,
            moe_ffn_hidden_size=self.moe_intermediate_size,
            moe_router_score_function="softmax",
            moe_router_pre_softmax=not self.norm_topk_prob,
            moe_router_load_balancing_type=moe.load_balancing,
            moe_aux_loss_coeff=0.0 if moe.load_balancing == "none" else float(coeff),
            # 0 = off: Megatron-Core computes the z-loss whenever the coefficient is not None and logs it
            # divided by the coefficient (0 / 0 = NaN in metrics.jsonl)
            moe_z_loss_coeff=moe.z_loss_coeff or None,
            moe_expert_capacity_factor=moe.capacity_factor,
            moe_token_dispatcher_type="alltoall",
            # which layers are MoE layers (1) or dense (0); the provider builds the per-layer specs from it
            moe_layer_freq=[int(m) for m in self.moe_layers] if self.moe_layers is not None else 1,
            # TEGroupedMLP (TE's grouped GEMM; models/gpt/grouped_experts.py without TE) or SequentialMLP;
            # the provider builds the layer spec from this
            moe_grouped_gemm=moe.experts == "grouped" or (moe.experts == "auto" and use_te),
        )

    def layer_spec_kwargs(self, use_te: bool) -> dict[str, Any]:
        return dict(super().layer_spec_kwargs(use_te), num_experts=self.num_experts)

    def layer_mappings(self, layer: int) -> tuple:
        from megatron_spot.models.qwen3_moe.mappings import expert_rows

        # Qwen3's attention rows (q/k norms after the fused QKV), the pre-MLP norm, then the router and experts
        if self.moe_layers is not None and not self.moe_layers[layer]:
            return super().layer_mappings(layer)  # a dense Qwen3 layer
        attention = DENSE_LAYER[:2] + QK_NORMS + DENSE_LAYER[2:4]
        return attention + expert_rows(self.num_experts)

    def layout_problems(self, tp: int, pp: int = 1, vpp: Optional[int] = None, ep: int = 1,
                        etp: Optional[int] = None) -> list[str]:
        out = super().layout_problems(tp, pp, vpp, ep, etp)
        if self.num_experts % ep:
            out.append(f"parallel.expert_parallel={ep} does not divide the {self.num_experts} experts; use an EP "
                       f"that divides {self.num_experts}")
        etp = tp if etp is None else etp
        if self.moe_intermediate_size % etp:
            out.append(f"parallel.expert_tensor_parallel={etp} does not divide moe_intermediate_size "
                       f"{self.moe_intermediate_size}")
        return out


def _is_moe_layer(layer: int, decoder_sparse_step: int, mlp_only_layers) -> bool:
    """transformers' Qwen3MoeDecoderLayer: a sparse MoE block unless listed in mlp_only_layers, every
    decoder_sparse_step-th layer (counting from 1)."""
    return layer not in mlp_only_layers and (layer + 1) % decoder_sparse_step == 0


def _num_experts(hf: dict[str, Any], source: str) -> Optional[int]:
    """The released config.json says num_experts; transformers 5 writes it as num_local_experts."""
    a, b = hf.get("num_experts"), hf.get("num_local_experts")
    if a and b and a != b:
        raise ConfigError(f"{source}: num_experts={a} and num_local_experts={b} disagree")
    return a or b


def _preset(vocab, hidden, inter, moe_inter, layers, heads, kv, experts, top_k, **extra) -> dict[str, Any]:
    d = dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=vocab, hidden_size=hidden,
        intermediate_size=inter, moe_intermediate_size=moe_inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=128, num_experts=experts,
        num_experts_per_tok=top_k, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        router_aux_loss_coef=0.001, tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
        max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645,
    )
    d.update(extra)
    return d


# The released models' config.json values (Qwen/Qwen3-30B-A3B, Qwen/Qwen3-235B-A22B), and a tiny one for
# tests: 8 experts top-2, 4 layers / 4 heads / 2 KV groups (TP2, PP2 x VPP2, EP2/4/8 all split).
PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-30b-a3b": _preset(151936, 2048, 6144, 768, 48, 32, 4, 128, 8),
    "qwen3-235b-a22b": _preset(151936, 4096, 12288, 1536, 94, 64, 4, 128, 8),
    "qwen3-moe-tiny": _preset(512, 64, 128, 32, 4, 4, 2, 8, 2, head_dim=16, max_position_embeddings=1024,
                              bos_token_id=None, eos_token_id=1, torch_dtype="float32"),
}
