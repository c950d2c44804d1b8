"""SpotLoss: the SPoT objective family (spot-bco, spot-bce, dpo, reward-sft, sft and weighted sums)."""
from __future__ import annotations

import torch

from megatron_spot import ops
from megatron_spot.ops.reference import masked_row_sums

from .delta import RunningDelta
from .objectives import OBJECTIVES, format_objective, parse_objective


def sequence_logps(token_logps: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Masked per-sequence sums of response-token log-probs: [2B, L] -> [2B] (no length normalisation).

    Masked-out positions contribute 0 even when their log-prob is -inf. Differentiable.
    """
    if token_logps.shape != loss_mask.shape:
        raise ValueError(f"sequence_logps: shapes differ: {tuple(token_logps.shape)} vs {tuple(loss_mask.shape)}")
    return masked_row_sums(token_logps, loss_mask.to(token_logps.dtype))


class SpotLoss:
    """Loss of one micro-batch of preference pairs.

    objective: "spot-bco" (default), "spot-bce", "dpo", "reward-sft", "sft" or a weighted sum such as
        "spot-bco:1,sft:0.1". beta scales the implicit reward r = beta * (log pi - log pi_ref).
        label_smoothing is the DPO eps. dp_group: data-parallel group the spot-bco delta is averaged
        over (None: this rank only).

    Call with token_logps [2B, L] (rows: B chosen then B rejected; fp32 with grad), loss_mask [2B, L]
    and ref_logps [2B]; returns (loss, metrics). loss = mean over the B pairs of the weighted pairwise
    objectives + w_sft * token-mean NLL over all chosen response tokens of the micro-batch.
    With spot-bco in the objective and update_delta=True (training), the running delta is updated
    with this micro-batch's mean reward *before* it is used (as in TRL); pass update_delta=False for
    evaluation so that eval batches do not move it (TRL does move it; this backend does not).
    """

    def __init__(self, objective: str = "spot-bco", beta: float = 0.1, label_smoothing: float = 0.0, dp_group=None):
        self.weights = parse_objective(objective)
        self.objective = format_objective(self.weights)
        self.beta = float(beta)
        self.label_smoothing = float(label_smoothing)
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
        self.pair_weights = {k: self.weights.get(k, 0.0) for k in ops.PAIR_OBJECTIVES}
        self.uses_delta = self.weights.get("spot-bco", 0.0) != 0.0
        self.delta = RunningDelta(dp_group)

    def __repr__(self) -> str:
        return f"SpotLoss(objective={self.objective!r}, beta={self.beta}, label_smoothing={self.label_smoothing})"

    def _check(self, token_logps, loss_mask, ref_logps):
        if token_logps.dim() != 2 or token_logps.shape[0] == 0 or token_logps.shape[0] % 2:
            raise ValueError(
                f"SpotLoss: token_logps must be [2B, L] (B chosen rows then B rejected rows), got "
                f"{tuple(token_logps.shape)}"
            )
        if tuple(loss_mask.shape) != tuple(token_logps.shape):
            raise ValueError(f"SpotLoss: loss_mask {tuple(loss_mask.shape)} != token_logps {tuple(token_logps.shape)}")
        if tuple(ref_logps.shape) != (token_logps.shape[0],):
            raise ValueError(f"SpotLoss: ref_logps must be [{token_logps.shape[0]}], got {tuple(ref_logps.shape)}")

    def __call__(self, token_logps, loss_mask, ref_logps, *, update_delta=True):
        self._check(token_logps, loss_mask, ref_logps)
        if not token_logps.dtype.is_floating_point:
            raise TypeError(f"SpotLoss: token_logps must be floating point, got {token_logps.dtype}")
        lp = token_logps if token_logps.dtype in (torch.float32, torch.float64) else token_logps.float()
        mask = loss_mask.to(lp.dtype)
        return self._loss(lp, mask, ref_logps.detach().to(lp.dtype), mask[: lp.shape[0] // 2].sum(), update_delta)

    def sequence_loss(self, seq_logps, ref_logps, chosen_tokens, *, update_delta=True):
        """The same loss from per-sequence log-prob sums [2B] (B chosen, then B rejected), as packed
        micro-batches produce them; `chosen_tokens` (scored chosen tokens) normalises the sft term."""
        if seq_logps.dim() != 1 or seq_logps.numel() == 0 or seq_logps.numel() % 2:
            raise ValueError(f"SpotLoss.sequence_loss: seq_logps must be [2B], got {tuple(seq_logps.shape)}")
        if tuple(ref_logps.shape) != tuple(seq_logps.shape):
            raise ValueError(f"SpotLoss.sequence_loss: ref_logps {tuple(ref_logps.shape)} != {tuple(seq_logps.shape)}")
        lp = seq_logps if seq_logps.dtype in (torch.float32, torch.float64) else seq_logps.float()
        # a sequence sum is a row of one "token": the fused pair op then sees exactly the same sums
        lp = lp[:, None]
        mask = torch.ones_like(lp)
        n_chosen = torch.as_tensor(float(chosen_tokens), dtype=lp.dtype, device=lp.device)
        return self._loss(lp, mask, ref_logps.detach().to(lp.dtype), n_chosen, update_delta)

    def _loss(self, lp, mask, ref, n_chosen_tokens, update_delta):
        B = lp.shape[0] // 2

        if self.uses_delta and update_delta:
            with torch.no_grad():
                batch_mean = (self.beta * (masked_row_sums(lp.detach(), mask) - ref)).mean()
            self.delta.update(batch_mean)
        delta = self.delta.value(lp.device)

        out = ops.pair_loss(
            lp, mask, ref, beta=self.beta, delta=delta, weights=self.pair_weights,
            label_smoothing=self.label_smoothing,
        )
        loss = out.loss.mean()
        metrics: dict[str, torch.Tensor] = {}
        for k, name in enumerate(ops.PAIR_OBJECTIVES):
            if name in self.weights:
                metrics[f"loss/{name}"] = out.losses[k].mean()
        w_sft = self.weights.get("sft")
        if w_sft is not None:
            sft = -masked_row_sums(lp[:B], mask[:B]).sum() / n_chosen_tokens.clamp(min=1.0)
            loss = loss + w_sft * sft
            metrics["loss/sft"] = sft.detach()

        rc, rr = out.rewards[:B], out.rewards[B:]
        metrics.update(
            {
                "rewards/chosen": rc.mean(),
                "rewards/rejected": rr.mean(),
                "rewards/margin": (rc - rr).mean(),
                "rewards/accuracy": (rc > rr).to(lp.dtype).mean(),
                "delta": delta.detach().to(lp.dtype),
                "logps/chosen": out.seq_logps[:B].mean(),
                "logps/rejected": out.seq_logps[B:].mean(),
                "loss": loss.detach(),
            }
        )
        return loss, {k: v.detach() for k, v in metrics.items()}

    def state_dict(self) -> dict:
        return {"objective": self.objective, "beta": self.beta, "delta": self.delta.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.delta.load_state_dict(sd["delta"])


__all__ = ["OBJECTIVES", "SpotLoss", "sequence_logps"]
