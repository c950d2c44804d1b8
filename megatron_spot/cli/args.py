"""argparse types every tool shares, so a number out of range is refused while the flags are parsed,
before any work starts, with argparse's one line naming the flag (exit 2, BAD_INPUT):

    p.add_argument("--steps", type=positive_int, ...)
    ->  error: argument --steps: must be an integer > 0, got '0'
"""
from __future__ import annotations

import argparse
import math


def _number(text: str, kind, what: str):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def _checked(kind, what: str, ok):
    def parse(text: str):
        value = _number(text, kind, what)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _checked(int, "an integer > 0", lambda v: v > 0)
non_negative_int = _checked(int, "an integer >= 0", lambda v: v >= 0)
positive_float = _checked(float, "a number > 0", lambda v: v > 0)
non_negative_float = _checked(float, "a number >= 0", lambda v: v >= 0)
unit_fraction = _checked(float, "a number in (0, 1]", lambda v: 0 < v <= 1)


def step_range(text: str) -> tuple[int, int]:
    """'A:B' -> (A, B), the steps A, A+1, ..., B-1 (0 <= A < B: never empty)."""
    start, sep, end = text.partition(":")
    try:
        a, b = int(start), int(end)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be A:B (steps A to B-1, e.g. 0:2), got {text!r}") from None
    if not sep or a < 0 or b <= a:
        raise argparse.ArgumentTypeError(f"must be A:B with 0 <= A < B (steps A to B-1, e.g. 0:2), got {text!r}")
    return a, b


def positive_int_list(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4], each > 0."""
    items = [t.strip() for t in text.split(",")]
    try:
        values = [int(t) for t in items]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"must be integers > 0, comma separated (e.g. 1,2), got {text!r}")
    return values
