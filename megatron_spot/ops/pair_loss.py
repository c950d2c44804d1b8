"""The fused pairwise part of the SPoT/DPO losses: per-sequence masked sums, rewards, per-pair
objectives and their gradient coefficients in one kernel (a second one for the backward)."""
from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import torch

from . import _backend
from .reference import PAIR_OBJECTIVES


class PairLossOutput(NamedTuple):
    loss: torch.Tensor  # [B] weighted per-pair loss, differentiable w.r.t. token_logps
    losses: torch.Tensor  # [4, B] unweighted per-pair terms, rows in PAIR_OBJECTIVES order (detached)
    seq_logps: torch.Tensor  # [2B] masked sequence sums of the policy log-probs (detached)
    rewards: torch.Tensor  # [2B] beta * (seq_logps - ref_logps) (detached)
    coef: torch.Tensor  # [2B] d loss[pair] / d seq_logps (detached)


def _weights(weights) -> tuple[float, ...]:
    if weights is None:
        return (1.0, 0.0, 0.0, 0.0)
    if isinstance(weights, Mapping):
        unknown = set(weights) - set(PAIR_OBJECTIVES)
        if unknown:
            raise ValueError(f"pair_loss: unknown objectives {sorted(unknown)}; valid: {', '.join(PAIR_OBJECTIVES)}")
        return tuple(float(weights.get(k, 0.0)) for k in PAIR_OBJECTIVES)
    w = tuple(float(x) for x in weights)
    if len(w) != len(PAIR_OBJECTIVES):
        raise ValueError(f"pair_loss: weights needs {len(PAIR_OBJECTIVES)} entries ({', '.join(PAIR_OBJECTIVES)})")
    return w


class _PairLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token_logps, loss_mask, ref_logps, delta, beta, label_smoothing, weights, impl):
        losses, seq, rewards, coef = impl.pair_loss(
            token_logps, loss_mask, ref_logps, delta, beta, label_smoothing, list(weights)
        )
        total = None
        for k, w in enumerate(weights):
            if w != 0.0:
                term = losses[k] * w
                total = term if total is None else total + term
        if total is None:
            total = torch.zeros_like(losses[0])
        ctx.save_for_backward(coef, loss_mask)
        ctx.impl = impl
        ctx.mark_non_differentiable(losses, seq, rewards, coef)
        return total, losses, seq, rewards, coef

    @staticmethod
    def backward(ctx, g_total, *_unused):
        coef, loss_mask = ctx.saved_tensors
        if g_total is None:
            return (None,) * 8
        grad = ctx.impl.pair_loss_grad(g_total.to(coef.dtype).contiguous(), coef, loss_mask)
        return grad, None, None, None, None, None, None, None


def pair_loss(
    token_logps: torch.Tensor,
    loss_mask: torch.Tensor,
    ref_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    delta: float | torch.Tensor = 0.0,
    weights: Mapping[str, float] | Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    backend: str | None = None,
) -> PairLossOutput:
    """Fused pairwise objectives of one micro-batch.

    token_logps [2B, L] (float32/float64, rows: B chosen then B rejected sequences), loss_mask [2B, L]
    (1 on response tokens; bool or float), ref_logps [2B] reference sequence log-probs. `delta` is the
    spot-bco offset (float or 1-element tensor; detached). `weights` maps objective names in
    PAIR_OBJECTIVES to weights (default: spot-bco only). Returns PairLossOutput; only `.loss` carries
    gradient. Non-contiguous inputs are copied (they are small).
    """
    if token_logps.dim() != 2 or token_logps.shape[0] % 2 != 0 or token_logps.shape[0] == 0:
        raise ValueError(
            f"pair_loss: token_logps must be [2B, L] with B >= 1 (B chosen rows then B rejected), got "
            f"{tuple(token_logps.shape)}"
        )
    if token_logps.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"pair_loss: token_logps must be float32 or float64, got {token_logps.dtype}")
    if tuple(loss_mask.shape) != tuple(token_logps.shape):
        raise ValueError(
            f"pair_loss: loss_mask shape {tuple(loss_mask.shape)} must equal token_logps shape "
            f"{tuple(token_logps.shape)}"
        )
    if tuple(ref_logps.shape) != (token_logps.shape[0],):
        raise ValueError(f"pair_loss: ref_logps must be [{token_logps.shape[0]}], got {tuple(ref_logps.shape)}")
    for name, t in (("loss_mask", loss_mask), ("ref_logps", ref_logps)):
        if t.device != token_logps.device:
            raise ValueError(f"pair_loss: {name} is on {t.device} but token_logps is on {token_logps.device}")
        if t.dtype.is_complex:
            raise TypeError(f"pair_loss: {name} must be real, got {t.dtype}")
    dt = token_logps.dtype
    name, impl = _backend.impl_for(token_logps.device, backend)
    if not isinstance(delta, torch.Tensor):
        delta = torch.tensor(float(delta), dtype=dt, device=token_logps.device)
    delta = delta.detach().to(device=token_logps.device, dtype=dt).reshape(1)
    return PairLossOutput(
        *_PairLoss.apply(
            token_logps.contiguous(),
            loss_mask.to(dt).contiguous(),
            ref_logps.detach().to(dt).contiguous(),
            delta,
            float(beta),
            float(label_smoothing),
            _weights(weights),
            impl,
        )
    )
