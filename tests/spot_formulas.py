"""The SPoT objectives of shared/notes/spot-method.md written out in plain PyTorch: the one independent
transcription that the fused op (ops.pair_loss) and the training loss (losses.SpotLoss) are tested against."""
import torch
import torch.nn.functional as F


def pair_objectives(lp: torch.Tensor, mask: torch.Tensor, ref: torch.Tensor, beta: float, delta, eps: float = 0.0):
    """Rows [chosen..., rejected...] of token log-probs `lp` [2B, L] with `mask` and reference sequence
    log-probs `ref` [2B]: seq = sum of the masked log-probs (masked -inf counts as 0), r = beta (seq - ref),
    then each pairwise objective per pair (dpo with label smoothing eps).
    Returns (terms: objective -> [B] losses, seq [2B], r [2B])."""
    B = lp.shape[0] // 2
    seq = torch.where(mask.bool(), lp, torch.zeros_like(lp)).sum(-1)
    r = beta * (seq - ref)
    rc, rr = r[:B], r[B:]
    return {
        "spot-bco": -F.logsigmoid(rc - delta) - F.logsigmoid(-(rr - delta)),
        "spot-bce": -F.logsigmoid(rc) - F.logsigmoid(-rr),
        "dpo": -(1 - eps) * F.logsigmoid(rc - rr) - eps * F.logsigmoid(-(rc - rr)),
        "reward-sft": -F.logsigmoid(rc),
    }, seq, r
