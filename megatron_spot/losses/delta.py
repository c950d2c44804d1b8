"""The running delta of SPoT-BCO: a count-weighted cumulative mean of per-micro-batch mean rewards."""
from __future__ import annotations

import torch
import torch.distributed as dist


class RunningDelta:
    """delta_t = plain average of every per-micro-batch mean reward seen so far, over all DP ranks.

    Each `update(m)` contributes one value per data-parallel rank (the rank's micro-batch mean of its
    2B rewards): the ranks' values are summed over `dp_group` (one all-reduce of a scalar) and the
    count grows by the DP size, so the state equals the cumulative mean of all per-rank values.
    Starts at 0 with count 0 (the TRL reference starts at count ~1e-24, which is the same after
    the first update). The value is detached, kept in float64 on the rewards' device (no host sync),
    and saved/restored by `state_dict()` / `load_state_dict()`.
    """

    def __init__(self, dp_group=None):
        self.dp_group = dp_group
        self.count = 0
        self._value: torch.Tensor | None = None

    def _dp_size(self) -> int:
        if self.dp_group is None or not dist.is_available() or not dist.is_initialized():
            return 1
        return dist.get_world_size(self.dp_group)

    def value(self, device=None) -> torch.Tensor:
        """Current delta as a 0-dim float64 tensor (0 before the first update)."""
        if self._value is None:
            return torch.zeros((), dtype=torch.float64, device=device)
        return self._value if device is None else self._value.to(device)

    def update(self, batch_mean: torch.Tensor) -> torch.Tensor:
        """Fold this rank's micro-batch mean reward in (all ranks of dp_group must call it); returns delta."""
        m = batch_mean.detach().reshape(()).to(torch.float64).clone()
        n = self._dp_size()
        if n > 1:
            dist.all_reduce(m, op=dist.ReduceOp.SUM, group=self.dp_group)
        prev = self.value(m.device)
        total = self.count + n
        self._value = (prev * self.count + m) / total
        self.count = total
        return self._value

    def state_dict(self) -> dict:
        return {"delta": float(self.value().item()), "count": int(self.count)}

    def load_state_dict(self, sd: dict) -> None:
        self.count = int(sd["count"])
        self._value = torch.tensor(float(sd["delta"]), dtype=torch.float64)
