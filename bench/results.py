"""The raw records of a run and their summary: per-round values, medians, paired ratios."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from .stats import Spread, paired_ratios

BASELINE = "asyncpg"  # every figure is also given as a ratio to this system at the same point
NUMERIC = (
    "throughput",
    "p50_ms",
    "p99_ms",
    "wait_p99_ms",
    "cpu_us_per_op",
    "errors",
    "timeouts",
    "refusals",
    "timeouts_per_s",
    "refusals_per_s",
    "shed_p99_ms",
    "late_acquires",
    "late_finishes",
    "latency_avg_ms",
)


@dataclass(slots=True)
class Series:
    """One participant at one point: its figures, one value per round (None: no value)."""

    point: dict[str, Any]
    participant: str
    values: dict[str, list[float | None]] = field(default_factory=dict)
    first_error: str | None = None

    def spread(self, metric: str) -> Spread | None:
        return Spread.of(self.values.get(metric, []))

    def median(self, metric: str) -> float | None:
        spread = self.spread(metric)
        return spread.median if spread else None


class Results:
    """All records of a run, indexed by point key and participant."""

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds
        self.records: list[dict[str, Any]] = []
        self._series: dict[str, dict[str, Series]] = defaultdict(dict)

    def add(self, round_no: int, point: Any, participant: str, figures: dict[str, Any]) -> None:
        self.records.append(
            {
                "round": round_no,
                "point": point.as_dict(),
                "key": point.key,
                "participant": participant,
                "figures": figures,
            }
        )
        series = self._series[point.key].get(participant)
        if series is None:
            series = Series(point.as_dict(), participant)
            self._series[point.key][participant] = series
        for metric in NUMERIC:
            column = series.values.setdefault(metric, [None] * self.rounds)
            value = figures.get(metric)
            column[round_no] = float(value) if isinstance(value, int | float) else None
        error = figures.get("first_error") or figures.get("error")
        if error and series.first_error is None:
            series.first_error = str(error)

    def get(self, key: str, participant: str) -> Series | None:
        return self._series.get(key, {}).get(participant)

    def at(self, key: str) -> dict[str, Series]:
        return self._series.get(key, {})

    def point_keys(self) -> list[str]:
        return list(self._series)

    def ratio(
        self,
        a: Series | None,
        b: Series | None,
        metric: str = "throughput",
        metric_b: str | None = None,
    ) -> Spread | None:
        """Paired per-round ratio of ``a``'s metric to ``b``'s."""
        if a is None or b is None:
            return None
        return paired_ratios(a.values.get(metric, []), b.values.get(metric_b or metric, []))

    def summary(self) -> list[dict[str, Any]]:
        """Every series with median/min/max per metric and paired ratios to the baseline."""
        out = []
        for key, by_participant in self._series.items():
            baseline = by_participant.get(BASELINE)
            for name, series in by_participant.items():
                figures = {m: s.as_dict() for m in NUMERIC if (s := series.spread(m))}
                ratios = {}
                if baseline is not None:
                    for metric in figures:
                        if (r := self.ratio(series, baseline, metric)) is not None:
                            ratios[metric] = r.as_dict()
                out.append(
                    {
                        "key": key,
                        "point": series.point,
                        "participant": name,
                        "figures": figures,
                        f"vs_{BASELINE}": ratios,
                        "first_error": series.first_error,
                    }
                )
        return out
