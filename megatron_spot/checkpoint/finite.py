"""Weights that hold NaN or Inf are refused by the conversions, naming the tensor.

A diverged run (or a damaged download) converts without error into a model that answers nothing
but garbage; the conversion is where it is cheap to notice. The check costs one reduction per
tensor (a float32 sum is NaN or Inf exactly when a NaN or Inf is in it, barring an overflow of
finite values, which only sends it to the exact count below) and allocates nothing large.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from megatron_spot.checkpoint.errors import CheckpointError

_EXACT_BLOCK = 2**24  # elements per block of the exact count (16 MiB of booleans at most)


def non_finite_problem(tensor: torch.Tensor, first_row: int = 0) -> Optional[str]:
    """None when every value of `tensor` is finite, else e.g. '3 NaN and 1 Inf values, the first at
    [12, 5]' (index within the whole tensor: `first_row` is the row `tensor` starts at)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    acc = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    if torch.isfinite(tensor.sum(dtype=acc)):
        return None
    flat = tensor.reshape(-1)
    nans = infs = 0
    first = None
    for start in range(0, flat.numel(), _EXACT_BLOCK):
        block = flat[start:start + _EXACT_BLOCK]
        bad = ~torch.isfinite(block)
        if not bad.any():
            continue
        n_nan = int(torch.isnan(block).sum())
        nans, infs = nans + n_nan, infs + int(bad.sum()) - n_nan
        if first is None:
            first = start + int(bad.nonzero()[0, 0])
    if first is None:  # finite values whose sum overflowed
        return None
    index = list(torch.unravel_index(torch.tensor(first), tuple(tensor.shape))) if tensor.dim() else []
    if index:
        index[0] += first_row
    where = f", the first at {[int(i) for i in index]}" if index else ""
    return f"{nans} NaN and {infs} Inf values{where}"


def refuse_non_finite(name: str, tensor: torch.Tensor, where: str, first_row: int = 0) -> None:
    """Raise a CheckpointError naming tensor `name` of `where` when it holds NaN or Inf."""
    problem = non_finite_problem(tensor, first_row)
    if problem:
        raise CheckpointError(f"{where}: tensor {name} holds {problem}; refusing to convert weights that are not "
                              "finite (a diverged run or a damaged file: convert an earlier checkpoint)")


def refuse_non_finite_tensors(named: Iterable[tuple[str, torch.Tensor]], where: str) -> None:
    """refuse_non_finite over (name, tensor) pairs, e.g. a loaded model's parameters."""
    for name, tensor in named:
        refuse_non_finite(name, tensor.detach(), where)
