"""Pure-PyTorch implementations of the megatron_spot primitive ops.

Same signatures and semantics as the compiled ops in `torch.ops.megatron_spot` (csrc/), so the
dispatcher can fall back to them, and the tests use them (together with plain
`log_softmax`+`gather` transcriptions) as the oracle. Row chunks bound the temporaries of the
fallback path to about `_CHUNK_ELEMS` elements; these functions trade memory for clarity, the
compiled kernels do not.

Primitive contract (per vocab shard, logits 2-D [n, V_local], targets 1-D int64 [n]):
- `token_logprobs_stats` -> [3, n] (float64 for float64 logits, else float32):
  local max, local sum exp(x - max), target logit (0 where the target is not in this shard).
  Columns >= valid_local are vocabulary padding and are ignored.
- `token_logprobs_grad(_)`: g * (onehot - exp((x - m) - logs)) with m the global max and logs the
  log of the global sum-exp; zero for padding columns and for rows with g == 0; the
  trailing-underscore variant writes into `logits`.
- `pair_loss` -> (losses [4, B], seq_logps [2B], rewards [2B], coef [2B]); rows are B chosen then
  B rejected sequences; coef[i] = d(sum_k w_k loss_k[pair]) / d seq_logps[i].
- `pair_loss_grad` -> grad_token [2B, L] = grad_pair[i mod B] * coef[i] * mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_CHUNK_ELEMS = 1 << 24  # ~64 MiB of fp32 temporaries per chunk

PAIR_OBJECTIVES = ("spot-bco", "spot-bce", "dpo", "reward-sft")  # row order of pair_loss's `losses`


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _target_in_shard(targets, ignore_index: int, vocab_start: int, valid_local: int):
    return (targets != ignore_index) & (targets >= vocab_start) & (targets < vocab_start + valid_local)


def _row_chunks(n: int, width: int):
    rows = max(1, _CHUNK_ELEMS // max(width, 1))
    for r0 in range(0, n, rows):
        yield r0, min(n, r0 + rows)


def token_logprobs_stats(logits, targets, vocab_start: int, valid_local: int, ignore_index: int):
    n = logits.shape[0]
    acc = acc_dtype(logits.dtype)
    out = torch.zeros(3, n, dtype=acc, device=logits.device)
    out[0].fill_(float("-inf"))
    if n == 0 or valid_local == 0:
        return out
    in_shard = _target_in_shard(targets, ignore_index, vocab_start, valid_local)
    local_t = torch.where(in_shard, targets - vocab_start, torch.zeros_like(targets))
    for r0, r1 in _row_chunks(n, valid_local):
        x = logits[r0:r1, :valid_local].to(acc)
        m = x.amax(dim=-1)
        m_safe = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)  # all -inf row: sum 0
        out[0, r0:r1] = m
        out[1, r0:r1] = torch.exp(x - m_safe[:, None]).sum(dim=-1)
        tl = x.gather(1, local_t[r0:r1, None]).squeeze(1)
        out[2, r0:r1] = torch.where(in_shard[r0:r1], tl, torch.zeros_like(tl))
    return out


def _grad_into(logits, out, targets, g, m, logs, vocab_start: int, valid_local: int, ignore_index: int):
    n = logits.shape[0]
    acc = acc_dtype(logits.dtype)
    in_shard = _target_in_shard(targets, ignore_index, vocab_start, valid_local)
    local_t = torch.where(in_shard, targets - vocab_start, torch.zeros_like(targets))
    if valid_local < logits.shape[1]:
        out[:, valid_local:] = 0
    if valid_local == 0:
        return out
    for r0, r1 in _row_chunks(n, valid_local):
        x = logits[r0:r1, :valid_local].to(acc)
        gi = g[r0:r1, None]
        gr = -gi * torch.exp((x - m[r0:r1, None]) - logs[r0:r1, None])
        onehot_g = torch.where(in_shard[r0:r1], g[r0:r1], torch.zeros_like(g[r0:r1]))
        gr.scatter_add_(1, local_t[r0:r1, None], onehot_g[:, None])
        gr = torch.where(gi != 0, gr, torch.zeros_like(gr))  # ignored rows: exact zeros, never NaN
        out[r0:r1, :valid_local] = gr.to(out.dtype)
    return out


def token_logprobs_grad(logits, targets, g, m, logs, vocab_start: int, valid_local: int, ignore_index: int):
    out = torch.empty_like(logits)
    return _grad_into(logits, out, targets, g, m, logs, vocab_start, valid_local, ignore_index)


def token_logprobs_grad_(logits, targets, g, m, logs, vocab_start: int, valid_local: int, ignore_index: int):
    _grad_into(logits, logits, targets, g, m, logs, vocab_start, valid_local, ignore_index)


def pair_objective_terms(rc, rr, delta, label_smoothing: float):
    """Per-pair losses [4, B] and their derivatives w.r.t. r+ and r- (each [4, B])."""
    eps = label_smoothing
    mgn = rc - rr
    losses = torch.stack(
        [
            F.softplus(-(rc - delta)) + F.softplus(rr - delta),
            F.softplus(-rc) + F.softplus(rr),
            (1 - eps) * F.softplus(-mgn) + eps * F.softplus(mgn),
            F.softplus(-rc),
        ]
    )
    dm = -(1 - eps) * torch.sigmoid(-mgn) + eps * torch.sigmoid(mgn)
    d_rc = torch.stack([-torch.sigmoid(-(rc - delta)), -torch.sigmoid(-rc), dm, -torch.sigmoid(-rc)])
    d_rr = torch.stack([torch.sigmoid(rr - delta), torch.sigmoid(rr), -dm, torch.zeros_like(rr)])
    return losses, d_rc, d_rr


def masked_row_sums(token_logps, loss_mask):
    return torch.where(loss_mask != 0, token_logps * loss_mask, torch.zeros_like(token_logps)).sum(dim=-1)


def pair_loss(token_logps, loss_mask, ref_logps, delta, beta: float, label_smoothing: float, weights):
    B = token_logps.shape[0] // 2
    seq = masked_row_sums(token_logps, loss_mask)
    rewards = beta * (seq - ref_logps)
    rc, rr = rewards[:B], rewards[B:]
    d = delta.reshape(()).to(token_logps.dtype)
    losses, d_rc, d_rr = pair_objective_terms(rc, rr, d, label_smoothing)
    w = torch.tensor(list(weights), dtype=token_logps.dtype, device=token_logps.device)[:, None]
    coef = beta * torch.cat([(w * d_rc).sum(0), (w * d_rr).sum(0)])
    return losses, seq, rewards, coef


def pair_loss_grad(grad_pair, coef, loss_mask):
    f = (grad_pair.repeat(2) * coef)[:, None]
    return torch.where(loss_mask != 0, f * loss_mask, torch.zeros_like(loss_mask))
