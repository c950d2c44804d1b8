"""The SPoT objective family on top of megatron_spot.ops (see SpotLoss)."""
from .delta import RunningDelta
from .objectives import DESCRIPTIONS, OBJECTIVES, parse_objective
from .spot_loss import SpotLoss, sequence_logps

__all__ = ["DESCRIPTIONS", "OBJECTIVES", "RunningDelta", "SpotLoss", "parse_objective", "sequence_logps"]
