"""Model FLOPs of Qwen3 per token, from the config alone (the convention MFU numbers use).

Matmul FLOPs only (norms, softmax and elementwise work are excluded, as in Megatron-LM's and
PaLM's MFU accounting); causal attention counts half of the QK^T and AV products.
"""
from __future__ import annotations

from megatron_spot.models.qwen3.presets import Qwen3Config


def matmul_params_per_token(cfg: Qwen3Config) -> int:
    """Weights touched by one token's matmuls (the N of 6N), LM head included."""
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * f
    return cfg.num_hidden_layers * per_layer + h * cfg.vocab_size


def forward_flops_per_token(cfg: Qwen3Config, seq_length: int) -> float:
    """Forward FLOPs of one token in a causal sequence of `seq_length` tokens."""
    attn = 2 * seq_length * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers  # causal: half of 4*s*q
    return 2.0 * matmul_params_per_token(cfg) + attn


def train_flops_per_token(cfg: Qwen3Config, seq_length: int, full_recompute: bool = False) -> float:
    """Forward + backward (2x forward) [+ recomputed forward] FLOPs of one trained token."""
    return (4.0 if full_recompute else 3.0) * forward_flops_per_token(cfg, seq_length)


def sequence_train_flops(cfg: Qwen3Config, lengths, full_recompute: bool = False) -> float:
    """Training FLOPs of a batch of sequences with the given (unpadded or padded) lengths."""
    return float(sum(n * train_flops_per_token(cfg, n, full_recompute) for n in lengths))
