"""Objective names and the parser of weighted sums such as "spot-bco:1,sft:0.1"."""
from __future__ import annotations

import math
from typing import Mapping

from megatron_spot.ops import PAIR_OBJECTIVES

#: Every objective SpotLoss knows. The first four are pairwise (fused pair kernel); `sft` is the
#: token-mean negative log-likelihood of the chosen responses.
OBJECTIVES = tuple(PAIR_OBJECTIVES) + ("sft",)

DESCRIPTIONS = {
    "spot-bco": "-log s(r+ - delta) - log s(-(r- - delta)), delta = running mean reward (the SPoT recipe)",
    "spot-bce": "-log s(r+) - log s(-r-)",
    "dpo": "-(1-eps) log s(r+ - r-) - eps log s(r- - r+)  (sigmoid DPO, label smoothing eps)",
    "reward-sft": "-log s(r+)  (positive term only)",
    "sft": "token-mean NLL of the chosen responses",
}


def parse_objective(spec: str | Mapping[str, float]) -> dict[str, float]:
    """Parse "name[:weight][,name[:weight]...]" into {name: weight} (weight defaults to 1).

    Names are case-insensitive and '_' may stand for '-'. Unknown names, duplicates, and weights
    that are not finite numbers raise ValueError naming the valid objectives.
    """
    valid = ", ".join(OBJECTIVES)
    if isinstance(spec, Mapping):
        items = [(str(k), str(v)) for k, v in spec.items()]
    elif isinstance(spec, str):
        items = []
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            name, sep, weight = part.partition(":")
            items.append((name, weight if sep else "1"))
    else:
        raise TypeError(f"objective must be a string like 'spot-bco:1,sft:0.1', got {type(spec).__name__}")
    if not items:
        raise ValueError(f"empty objective {spec!r}; valid objectives: {valid}")
    out: dict[str, float] = {}
    for raw_name, raw_weight in items:
        name = raw_name.strip().lower().replace("_", "-")
        if name not in OBJECTIVES:
            raise ValueError(f"unknown objective {raw_name.strip()!r} in {spec!r}; valid objectives: {valid}")
        if name in out:
            raise ValueError(f"objective {name!r} given twice in {spec!r}")
        try:
            weight = float(raw_weight)
        except ValueError:
            raise ValueError(f"weight {raw_weight.strip()!r} of objective {name!r} is not a number") from None
        if not math.isfinite(weight):
            raise ValueError(f"weight of objective {name!r} must be finite, got {weight}")
        out[name] = weight
    return out


def format_objective(weights: Mapping[str, float]) -> str:
    return ",".join(f"{k}:{v:g}" for k, v in weights.items())
