"""GPTModel whose language-model loss is the fused vocab-parallel log-prob (megatron_spot.ops).

Megatron-Core's own loss path copies bf16 logits to fp32 and keeps softmax temporaries; SPoT only
needs each target token's log-prob. Two modes, both returning per-token NEGATIVE log-probs [b, s]
(Megatron's loss convention) so training and reference scoring are unchanged:

- `fused_linear_loss = True` (the default, `model.fused_linear_loss` in the config): on the last
  pipeline stage the final hidden states and the output weight (the tied embedding's copy when
  embeddings are shared) go to `ops.linear_token_logprobs`, which runs the output GEMM chunk by
  chunk and never holds the [s, b, V/tp] logits. This goes through GPTModel.forward's own
  `output_processor` hook, so pipeline stages, VPP, tied embeddings, recompute, DDP/distributed
  optimizer and checkpoints stay exactly as Megatron-Core ships them.
- `False`: today's path: Megatron's output layer builds the logits, then `ops.token_logprobs`
  (overriding `compute_language_model_loss`) with its in-place backward.

Calls without labels (logits for evaluation / tests) always take Megatron's output layer.
"""
from __future__ import annotations

from megatron.core.models.gpt import GPTModel

from megatron_spot.ops.token_logprobs import IGNORE_INDEX


class SpotGPTModel(GPTModel):
    # unpadded vocabulary; padded rows are excluded from the softmax (set by the provider)
    valid_vocab_size: int | None = None
    # IGNORE targets (label == -100) contribute 0; the forward step builds labels that way
    ignore_index: int = IGNORE_INDEX
    # loss head without materialised logits (set by the provider from model.fused_linear_loss)
    fused_linear_loss: bool = True

    def _tp_group(self):
        group = getattr(self, "tp_group", None)
        if group is None:
            from megatron.core import parallel_state as ps

            group = ps.get_tensor_model_parallel_group()
        return group

    def _fused_head_applies(self) -> bool:
        """Configurations whose output layer does more than `hidden @ weight.T` keep Megatron's path."""
        c = self.config
        return (self.fused_linear_loss and not getattr(c, "use_mup", False)
                and not getattr(c, "defer_embedding_wgrad_compute", False) and not getattr(c, "mtp_num_layers", None))

    def forward(self, *args, **kwargs):
        # GPTModel.forward(input_ids, position_ids, attention_mask, decoder_input, labels, ...)
        labels = kwargs.get("labels", args[4] if len(args) > 4 else None)
        if (labels is not None and self.post_process and kwargs.get("output_processor") is None
                and self._fused_head_applies()):
            kwargs["output_processor"] = self._fused_linear_loss_output
        return super().forward(*args, **kwargs)

    def _fused_linear_loss_output(self, hidden_states, output_layer, output_weight, labels, **_unused):
        """GPTModel's `output_processor`: the loss head on the last stage (hidden_states [s, b, H])."""
        from megatron_spot.ops import linear_token_logprobs

        weight = output_layer.weight if output_weight is None else output_weight
        targets = labels.transpose(0, 1).contiguous()  # [b, s] -> [s, b], Megatron's activation layout
        logps = linear_token_logprobs(
            hidden_states, weight, targets, tp_group=self._tp_group(), ignore_index=self.ignore_index,
            valid_vocab_size=self.valid_vocab_size,
            # with sequence parallel the hidden states arrive split along s; the op gathers them the
            # way ColumnParallelLinear does (and reduce-scatters their gradient)
            sequence_parallel=bool(getattr(output_layer, "sequence_parallel", False)),
        )
        return (-logps).transpose(0, 1).contiguous()

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
