"""Percentiles and the median/min/max summary of repeated measurements (no numpy needed)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

# The multiplication sign and the en dash of the reports, escaped because ruff (RUF001)
# flags the literal characters as ambiguous.
TIMES, DASH = "\u00d7", "\u2013"


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) of ``values``, linearly interpolated; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True, slots=True)
class Spread:
    """The median, min and max of one figure over the repetitions of a point."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Spread | None:
        """The spread of the values that exist; None when no repetition produced one."""
        present = [v for v in values if v is not None]
        if not present:
            return None
        return cls(statistics.median(present), min(present), max(present), len(present))

    def as_dict(self) -> dict[str, float | int]:
        return {"median": self.median, "min": self.low, "max": self.high, "n": self.n}


def paired_ratios(
    values: Sequence[float | None], baseline: Sequence[float | None]
) -> Spread | None:
    """The spread of per-repetition ratios ``value[i] / baseline[i]``.

    Repetitions are interleaved, so pairing repetition ``i`` of a system with repetition ``i``
    of the baseline cancels most of the drift of a shared, noisy machine.
    """
    ratios = [
        v / b
        for v, b in zip(values, baseline, strict=False)
        if v is not None and b  # b != 0
    ]
    return Spread.of(ratios)
