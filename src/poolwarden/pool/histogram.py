"""Fixed-bucket histograms of durations, cheap enough to leave on.

Why fixed buckets (not HDR): one ``bisect`` over 18 floats and one list increment per
observation (about 0.2 µs), constant memory, and exactly the shape Prometheus and
OpenTelemetry export — counts from several worker processes add up bucket by bucket, which
HDR sketches in pure Python cannot do as cheaply. The bounds cover 100 µs (an idle acquire
with a wait) to 60 s (a stuck request) on a 1-2.5-5 ladder: quantiles read from them are
within one bucket, which is what an operator needs to tell 2 ms from 200 ms.

A :class:`Histogram` is cumulative (counts only grow), satisfies
:class:`poolwarden.metrics.HistogramSnapshot` itself, and :meth:`Histogram.snapshot` gives a
frozen copy for a stats snapshot.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

#: upper bounds in seconds (inclusive, as Prometheus' ``le``); one more bucket holds the rest
DURATION_BOUNDS_S: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """A frozen copy of a histogram: per-bucket (not cumulative) counts, ``len(bounds_s)+1``."""

    bounds_s: tuple[float, ...]
    counts: tuple[int, ...]
    sum_s: float

    @property
    def count(self) -> int:
        return sum(self.counts)

    @property
    def mean_s(self) -> float:
        n = self.count
        return self.sum_s / n if n else 0.0

    def quantile(self, q: float) -> float:
        """An estimate of the ``q`` quantile (0 < q <= 1), interpolated inside its bucket;
        0.0 when empty; observations above the last bound read as that bound."""
        return _quantile(self.bounds_s, self.counts, q)

    def since(self, earlier: HistogramSnapshot | None) -> HistogramSnapshot:
        """The observations made after ``earlier`` (a snapshot of the same histogram)."""
        if earlier is None:
            return self
        counts = tuple(a - b for a, b in zip(self.counts, earlier.counts, strict=True))
        return HistogramSnapshot(self.bounds_s, counts, self.sum_s - earlier.sum_s)


class Histogram:
    """A mutable cumulative histogram of durations in seconds."""

    __slots__ = ("bounds_s", "bucket_counts", "sum_s")

    def __init__(self, bounds_s: Sequence[float] = DURATION_BOUNDS_S) -> None:
        bounds = tuple(float(b) for b in bounds_s)
        if not bounds or any(b <= a for a, b in itertools.pairwise(bounds)):
            raise ValueError("histogram bounds must be non-empty and strictly increasing")
        self.bounds_s = bounds
        # per-bucket counts (not cumulative); only observe() adds to them, and the hot
        # paths that write it out: the pool's acquire and release, the statement section
        self.bucket_counts = [0] * (len(bounds) + 1)
        self.sum_s = 0.0

    def observe(self, seconds: float) -> None:
        self.bucket_counts[bisect_left(self.bounds_s, seconds)] += 1
        self.sum_s += seconds

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple(self.bucket_counts)

    @property
    def count(self) -> int:
        return sum(self.bucket_counts)

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(self.bounds_s, tuple(self.bucket_counts), self.sum_s)

    def __repr__(self) -> str:
        return f"<Histogram n={self.count} sum={self.sum_s:.6g}s>"


def _quantile(bounds: Sequence[float], counts: Sequence[int], q: float) -> float:
    if not 0.0 < q <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {q!r}")
    total = sum(counts)
    if total == 0:
        return 0.0
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i >= len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i else 0.0
            return lower + (bounds[i] - lower) * ((rank - seen) / n)
        seen += n
    return bounds[-1]
