"""Model FLOPs of a GPT-style family per token, from the config alone (the convention MFU numbers use).

Matmul FLOPs only (norms, softmax and elementwise work are excluded, as in Megatron-LM's and
PaLM's MFU accounting); causal attention counts half of the QK^T and AV products.
"""
from __future__ import annotations

from megatron_spot.models.gpt.config import GPTConfig


def matmul_params_per_token(cfg: GPTConfig) -> int:
    """Weights touched by one token's matmuls (the N of 6N), LM head included (the family's count)."""
    return cfg.matmul_params_per_token()


def forward_flops_per_token(cfg: GPTConfig, seq_length: int) -> float:
    """Forward FLOPs of one token in a causal sequence of `seq_length` tokens."""
    attn = 2 * seq_length * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers  # causal: half of 4*s*q
    return 2.0 * matmul_params_per_token(cfg) + attn


def train_flops_per_token(cfg: GPTConfig, seq_length: int, full_recompute: bool = False) -> float:
    """Forward + backward (2x forward) [+ recomputed forward] FLOPs of one trained token."""
    return (4.0 if full_recompute else 3.0) * forward_flops_per_token(cfg, seq_length)


def sequence_train_flops(cfg: GPTConfig, lengths, full_recompute: bool = False) -> float:
    """Training FLOPs of a batch of sequences with the given (unpadded or padded) lengths."""
    return float(sum(n * train_flops_per_token(cfg, n, full_recompute) for n in lengths))
