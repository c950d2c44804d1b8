"""Core attention that honours Megatron-Core's `PackedSeqParams` (THD) without Transformer Engine.

With packed pairs a micro-batch is one row of concatenated sequences; attention must stay inside
each sequence. On GPUs Transformer Engine's attention does this from `cu_seqlens`. Megatron-Core's
local `DotProductAttention` (the CPU layer spec) refuses packed input, so this subclass, plugged into
the local spec's `core_attention` slot through ModuleSpec, runs the parent's own causal attention
once per sequence: the same Python (and the same numbers as unpacked rows) on CPU as the TE path
computes on GPU. Cost is the sum of squared sequence lengths, never the square of the whole row.
"""
from __future__ import annotations

from megatron.core.transformer.dot_product_attention import DotProductAttention


class PackedDotProductAttention(DotProductAttention):
    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed attention expects qkv_format='thd', got {packed_seq_params.qkv_format!r}")
        cu = packed_seq_params.cu_seqlens_q_padded
        if cu is None:
            cu = packed_seq_params.cu_seqlens_q
        bounds = cu.tolist()
        if bounds[0] != 0 or bounds[-1] != query.shape[0]:
            raise ValueError(f"cu_seqlens {bounds[:3]}...{bounds[-1]} do not cover the {query.shape[0]} packed tokens")
        # Attention.forward squeezed the dummy batch dim for THD: [t, heads, dim]; the parent wants
        # [s, b, heads, dim] and builds its default causal mask when attention_mask is None.
        outs = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end == start:
                continue
            outs.append(super().forward(query[start:end].unsqueeze(1), key[start:end].unsqueeze(1),
                                        value[start:end].unsqueeze(1), None, attn_mask_type=attn_mask_type,
                                        attention_bias=attention_bias))
        import torch

        return torch.cat(outs, dim=0)  # [t, 1, hidden/tp]; Attention.forward reshapes for THD
