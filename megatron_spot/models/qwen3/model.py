"""GPTModel whose language-model loss is the fused vocab-parallel log-prob (megatron_spot.ops).

Megatron-Core's own loss path copies bf16 logits to fp32 and keeps softmax temporaries; SPoT only
needs each target token's log-prob. Overriding this one method keeps every other part of GPTModel
(pipeline stages, tied embeddings, checkpoints) as Megatron-Core ships it.
"""
from __future__ import annotations

from megatron.core.models.gpt import GPTModel

from megatron_spot.ops.token_logprobs import IGNORE_INDEX


class Qwen3GPTModel(GPTModel):
    # unpadded vocabulary; padded rows are excluded from the softmax (set by the provider)
    valid_vocab_size: int | None = None
    # IGNORE targets (label == -100) contribute 0; the forward step builds labels that way
    ignore_index: int = IGNORE_INDEX

    def compute_language_model_loss(self, labels, logits):
        """Return per-token NEGATIVE log-probs [b, s] of `labels` (Megatron's loss convention)."""
        from megatron.core import parallel_state as ps

        from megatron_spot.ops import token_logprobs

        targets = labels.transpose(0, 1).contiguous()  # [b, s] -> [s, b], Megatron's logits layout
        logps = token_logprobs(
            logits, targets, tp_group=ps.get_tensor_model_parallel_group(),
            ignore_index=self.ignore_index, valid_vocab_size=self.valid_vocab_size,
            # the output layer's logits are an intermediate nobody reads again: reuse their memory
            inplace_backward=True,
        )
        return (-logps).transpose(0, 1).contiguous()
