"""Searches for where a monotone condition stops holding: the noise multiplier that meets a
target epsilon, the steps a budget allows, an audit's epsilon bound, the largest batch."""

from __future__ import annotations

import math
from collections.abc import Callable


def bracket(below: Callable[[float], bool], limit: float = math.inf) -> tuple[float, float] | None:
    """(low, high) with `below(high)` false, doubling `high` from 1 (low: the last value where
    `below` held, or 0); None once `high` passes `limit`."""
    low, high = 0.0, 1.0
    while below(high):
        low, high = high, 2.0 * high
        if high > limit:
            return None
    return low, high


def narrow(
    below: Callable[[float], bool], low: float, high: float, done: Callable[[float, float], bool]
) -> tuple[float, float]:
    """Halve [low, high], where `below` holds at low and not at high, until `done(low, high)`."""
    while not done(low, high):
        middle = (low + high) / 2.0
        low, high = (middle, high) if below(middle) else (low, middle)
    return low, high


def last_fitting(fits: Callable[[int], bool], low: int, high: int) -> int:
    """The largest whole number in [low, high) where `fits` holds, given that it holds at
    `low`, not at `high`, and nowhere above a number where it fails."""
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low
