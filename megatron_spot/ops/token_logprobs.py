"""Per-token log-probs of the targets from vocab-parallel logits, without full-vocab temporaries."""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import _backend
from .reference import acc_dtype

_LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# targets with this value are not scored (log-prob 0, no gradient); PyTorch cross_entropy's default
IGNORE_INDEX = -100


def _tp_info(tp_group) -> tuple[int, int]:
    if tp_group is None:
        return 1, 0
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("token_logprobs: tp_group given but torch.distributed is not initialised")
    return dist.get_world_size(tp_group), dist.get_rank(tp_group)


def _validate(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("token_logprobs: logits and targets must be tensors")
    if logits.dim() < 1:
        raise ValueError("token_logprobs: logits must have a vocabulary dimension [..., V/tp]")
    if logits.dtype not in _LOGITS_DTYPES:
        raise TypeError(f"token_logprobs: logits must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"token_logprobs: targets must be an integer tensor (token ids), got {targets.dtype}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"token_logprobs: targets shape {tuple(targets.shape)} must equal logits shape without the vocab dim "
            f"{tuple(logits.shape[:-1])} (logits {tuple(logits.shape)})"
        )
    if targets.device != logits.device:
        raise ValueError(f"token_logprobs: targets are on {targets.device} but logits are on {logits.device}")
    if not logits.is_contiguous():
        raise ValueError(
            f"token_logprobs: logits must be contiguous (shape {tuple(logits.shape)}, strides {logits.stride()}); "
            "a hidden copy would defeat the memory savings, call .contiguous() yourself if intended"
        )


def combine_vocab_parallel_stats(m_local, s_local, tgt, tp_group, tp_size: int):
    """Global (max, sum-exp relative to it, target logit) per token from each vocab shard's local ones.

    Two all-reduces for any number of tokens: MAX of the local maxima, then one SUM of the stacked
    [sum-exp rescaled to the global max; target logit (0 on shards not holding the target)].
    """
    if tp_size == 1:
        return m_local, s_local, tgt
    m = m_local.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
    empty = torch.isinf(m_local) & (m_local < 0)  # shard with no valid column (or all -inf)
    scale = torch.exp(torch.where(empty, m, m_local) - m)
    both = torch.stack([torch.where(empty, torch.zeros_like(s_local), s_local * scale), tgt])
    dist.all_reduce(both, op=dist.ReduceOp.SUM, group=tp_group)
    return m, both[0], both[1]


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, impl, tp_group, tp_size, vocab_start, valid_local, valid_vocab, ignore_index,
                inplace_backward):
        V_local = logits.shape[-1]
        x = logits.view(-1, V_local)
        t = targets.reshape(-1).to(torch.int64).contiguous()
        stats = impl.token_logprobs_stats(x, t, vocab_start, valid_local, ignore_index)
        m, s, tgt = combine_vocab_parallel_stats(stats[0], stats[1], stats[2], tp_group, tp_size)
        valid = (t != ignore_index) & (t >= 0) & (t < valid_vocab)
        logs = torch.log(s)
        logp = torch.where(valid, (tgt - m) - logs, torch.zeros_like(logs))
        ctx.save_for_backward(x, t, m, logs, valid)
        ctx.impl = impl
        ctx.args = (vocab_start, valid_local, ignore_index)
        ctx.inplace = inplace_backward
        ctx.logits_shape = logits.shape
        return logp.view(targets.shape)

    @staticmethod
    def backward(ctx, grad_out):
        x, t, m, logs, valid = ctx.saved_tensors
        g = grad_out.reshape(-1).to(logs.dtype)
        g = torch.where(valid, g, torch.zeros_like(g)).contiguous()
        m, logs = m.contiguous(), logs.contiguous()
        vocab_start, valid_local, ignore_index = ctx.args
        if ctx.inplace:
            ctx.impl.token_logprobs_grad_(x, t, g, m, logs, vocab_start, valid_local, ignore_index)
            torch.autograd.graph.increment_version(x)
            grad = x.detach().view(ctx.logits_shape)
        else:
            grad = ctx.impl.token_logprobs_grad(x, t, g, m, logs, vocab_start, valid_local, ignore_index)
            grad = grad.view(ctx.logits_shape)
        return grad, None, None, None, None, None, None, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    tp_group=None,
    ignore_index: int = IGNORE_INDEX,
    valid_vocab_size: int | None = None,
    inplace_backward: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Log-probability of each target token under softmax(logits) over the full (TP-sharded) vocabulary.

    Args:
        logits: [..., V/tp] vocab-parallel logits (Megatron layout [s, b, V/tp]), float32/bfloat16/
            float16/float64, contiguous. Rank r of `tp_group` holds columns [r*V_local, (r+1)*V_local).
        targets: [...] integer token ids, same device (a non-contiguous or int32 tensor is copied).
        tp_group: tensor-parallel process group the vocabulary is split over; None = unsplit vocabulary.
            Costs two all-reduces: MAX of the per-token max, then one SUM of [sum-exp; target logit].
        ignore_index: targets equal to it (and targets outside [0, valid_vocab_size)) get log-prob 0
            and zero gradient.
        valid_vocab_size: global vocabulary size without padding; columns >= it are excluded from the
            softmax (default: all V_local * tp columns).
        inplace_backward: write the logits' gradient into the logits' own storage during backward
            (saves one logits-sized buffer). The logits' values are destroyed: they must not be used
            after backward (autograd raises if another saved reference to them is unpacked later).
        backend: 'auto' | 'cuda' | 'cpu' | 'reference' for this call (default: MEGATRON_SPOT_OPS_BACKEND).

    Returns:
        float32 tensor shaped like `targets` (float64 for float64 logits), differentiable w.r.t. logits.
    """
    _validate(logits, targets)
    name, impl = _backend.impl_for(logits.device, backend)
    tp_size, tp_rank = _tp_info(tp_group)
    V_local = logits.shape[-1]
    global_V = V_local * tp_size
    if valid_vocab_size is None:
        valid_vocab_size = global_V
    valid_vocab_size = int(valid_vocab_size)
    if not 0 < valid_vocab_size <= global_V:
        raise ValueError(
            f"token_logprobs: valid_vocab_size={valid_vocab_size} must lie in [1, {global_V}] "
            f"(V_local={V_local} x tp={tp_size})"
        )
    vocab_start = tp_rank * V_local
    valid_local = max(0, min(V_local, valid_vocab_size - vocab_start))
    return _TokenLogprobs.apply(
        logits, targets, impl, tp_group, tp_size, vocab_start, valid_local, valid_vocab_size, int(ignore_index),
        bool(inplace_backward),
    )


__all__ = ["token_logprobs", "acc_dtype"]
