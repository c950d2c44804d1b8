"""Fused ops of megatron_spot: vocab-parallel token log-probs (from logits, or straight from hidden
states without materialising the logits) and the pairwise SPoT/DPO loss.

One dispatch over three implementations, chosen once at import: the CUDA extension, the CPU
extension (both `megatron_spot._C`, built from csrc/) and the pure-PyTorch reference
(`megatron_spot.ops.reference`, also the tests' oracle). Force one with
MEGATRON_SPOT_OPS_BACKEND=auto|cuda|cpu|reference or `backend=` per call; `active_backend(device)`
says which is used (and the first call logs it once on the "megatron_spot.ops" logger).
"""
from ._backend import BACKENDS, EXT_CUDA, EXT_ERROR, EXT_LOADED, active_backend, available_backends
from .linear_token_logprobs import linear_token_logprobs
from .pair_loss import PairLossOutput, pair_loss
from .reference import PAIR_OBJECTIVES
from .token_logprobs import token_logprobs

__all__ = [
    "BACKENDS",
    "EXT_CUDA",
    "EXT_ERROR",
    "EXT_LOADED",
    "PAIR_OBJECTIVES",
    "PairLossOutput",
    "active_backend",
    "available_backends",
    "linear_token_logprobs",
    "pair_loss",
    "token_logprobs",
]
