"""The performance bar of issue 3, checked against one run's figures.

Each check compares medians (or paired per-round ratios) of the same run; a check whose
figures are missing (a system skipped, a point not in the profile) says so instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

from .plan import FIFO, IDEAL, OURS
from .results import Results, Series
from .stats import DASH, TIMES

PEERS = ("asyncpg", "asyncpg-noreset", "sqlalchemy", "psycopg")
OVERLOAD_CAPACITY = 1000.0  # pool 10 / 10 ms per request, nominally
CAPACITY = "capacity C=10 P=10"  # measured: 10 tasks owning a connection each, no pool
A64, B1, B10, B64, B256 = "a C=64 P=10", "b C=1 P=10", "b C=10 P=10", "b C=64 P=10", "b C=256 P=10"
BARE, IDEAL10 = "limit C=1 P=1", "limit C=10 P=10"
SQLA_BARE = ("limit C=1 P=1", "sqlalchemy-bare")  # (point, participant)
SQLA_IDEAL10 = ("limit C=10 P=10", "sqlalchemy-ideal")
OVERLOADS = ("c C=100 P=10", "c C=500 P=10")  # 10x and 50x overload
D10, D64 = "d C=10 P=10", "d C=64 P=10"
PAIRED10, PAIRED64 = "paired C=10 P=10", "paired C=64 P=10"  # ours and the ideal, paired


@dataclass(frozen=True, slots=True)
class Check:
    criterion: str
    measured: str
    target: str
    ok: bool | None  # None: not measured in this run


def _missing(criterion: str, target: str, why: str = "not measured") -> Check:
    return Check(criterion, why, target, None)


def _at_least(
    criterion: str, value: float | None, bound: float, target: str, fmt: str = TIMES + "{:.2f}"
) -> Check:
    if value is None:
        return _missing(criterion, target)
    return Check(criterion, fmt.format(value), target, value >= bound)


def _at_most(criterion: str, value: float | None, bound: float, target: str, fmt: str) -> Check:
    if value is None:
        return _missing(criterion, target)
    return Check(criterion, fmt.format(value), target, value <= bound)


def _ratio(results: Results, a: Series | None, b: Series | None) -> float | None:
    spread = results.ratio(a, b)
    return spread.median if spread else None


def checks(results: Results) -> list[Check]:
    """Every criterion of the bar, in the issue's order."""
    get = results.get
    out: list[Check] = []

    ours_a, peers_a = get(A64, OURS), [s for p in PEERS if (s := get(A64, p))]
    best_peer = max((s.median("throughput") or 0.0 for s in peers_a), default=0.0)
    ours_a_tp = ours_a.median("throughput") if ours_a else None
    out.append(
        _at_least(
            "a. acquire+release C=64: poolwarden / best peer",
            ours_a_tp / best_peer if ours_a_tp and best_peer else None,
            1.5,
            f"≥ {TIMES}1.5",
        )
    )
    out.append(
        _at_least(
            "b. SELECT 1 C=1: poolwarden / bare connection",
            _ratio(results, get(B1, OURS), get(BARE, "bare")),
            0.9,
            f"≥ {TIMES}0.90",
        )
    )
    for key, paired, bound in ((B10, PAIRED10, 0.9), (B64, PAIRED64, 0.85)):
        label = f"b. SELECT 1 {key[2:]}: poolwarden / no-pool ideal P=10"
        out.append(_at_least(
            f"{label} (paired: one loop, slices in turn)",
            _ratio(results, get(paired, OURS), get(paired, IDEAL)),
            bound,
            f"≥ {TIMES}{bound:.2f}",
        ))
        fifo = _ratio(results, get(paired, FIFO), get(paired, IDEAL))
        out.append(Check(
            f"b. SELECT 1 {key[2:]}: bare-bones FIFO pool / no-pool ideal P=10 (paired; what "
            "a pool costs at the least)",
            DASH if fifo is None else f"{TIMES}{fifo:.2f}", "(context)", None,
        ))
        # Not the criterion: the same ratio from separate windows of the interleaved rounds.
        apart = _ratio(results, get(key, OURS), get(IDEAL10, IDEAL))
        out.append(Check(
            f"{label} (separate windows, drift included)",
            DASH if apart is None else f"{TIMES}{apart:.2f}", "(context)", None,
        ))
    for key in (B64, B256):
        series = get(key, OURS)
        tail = None
        if series is not None:
            tail_spread = results.ratio(series, series, "p99_ms", "p50_ms")
            tail = tail_spread.median if tail_spread else None
        out.append(
            _at_most(
                f"b. SELECT 1 {key[2:]}: poolwarden p99 / p50 (fair queue)",
                tail,
                2.0,
                "≤ 2",
                "{:.2f}",
            )
        )
    for key, limit in ((B1, SQLA_BARE), (B64, SQLA_IDEAL10)):
        bare_sqla = get(key, "sqlalchemy")
        out.append(_at_least(
            f"b. SELECT 1 {key[2:]}: poolwarden SQLAlchemy / SQLAlchemy",
            _ratio(results, get(key, "poolwarden-sqla"), bare_sqla),
            1.2,
            f"≥ {TIMES}1.2",
        ))
        # Not a criterion: how far any pool under SQLAlchemy could go (no checkout at all).
        ceiling = _ratio(results, get(limit[0], limit[1]), bare_sqla)
        out.append(Check(
            f"b. SELECT 1 {key[2:]}: SQLAlchemy with no pool at all / SQLAlchemy "
            "(the ceiling of the line above)",
            DASH if ceiling is None else f"{TIMES}{ceiling:.2f}", "(context)", None,
        ))
    for overload, name in product(OVERLOADS, (OURS, "poolwarden-shed", "poolwarden-admit")):
        series = get(overload, name)
        label = f"c. overload {overload[2:].split()[0]}, {name}"
        if series is None:
            out.append(_missing(f"{label}: goodput", "≥ 970/s"))
            continue
        goodput = series.median("throughput")
        out.append(
            _at_least(
                f"{label}: goodput",
                goodput,
                0.97 * OVERLOAD_CAPACITY,
                "≥ 970/s (97% of 1000/s)",
                "{:.0f}/s",
            )
        )
        out.append(
            _at_least(
                f"{label}: goodput / measured capacity",
                _ratio(results, series, get(CAPACITY, IDEAL)),
                0.97,
                f"≥ {TIMES}0.97",
            )
        )
        out.append(
            _at_most(
                f"{label}: p50 of served", series.median("p50_ms"), 50.0, "≤ 50 ms", "{:.1f} ms"
            )
        )
        late = series.spread("late_acquires")
        out.append(
            _at_most(
                f"{label}: served after the budget (worst round)",
                late.high if late else None,
                0,
                "0",
                "{:.0f}",
            )
        )
        shed = series.spread("shed_p99_ms")
        if shed is None:
            out.append(_missing(f"{label}: p99 time-to-refusal", "≤ 5 ms", "nothing was shed"))
        else:
            out.append(
                _at_most(f"{label}: p99 time-to-refusal", shed.median, 5.0, "≤ 5 ms", "{:.1f} ms")
            )
    for key in (D10, D64):
        on, off = get(key, "poolwarden-obs-on"), get(key, "poolwarden-obs-off")
        out.append(
            _at_least(
                f"d. SELECT 1 {key[2:]}: all observability on / off",
                _ratio(results, on, off),
                0.97,
                f"≥ {TIMES}0.97 (costs ≤ 3%)",
            )
        )
        cpu = results.ratio(on, off, "cpu_us_per_op")
        on_cpu, off_cpu = (s.median("cpu_us_per_op") if s else None for s in (on, off))
        out.append(Check(
            f"d. SELECT 1 {key[2:]}: client CPU per op, on / off (context: steadier than "
            "throughput here)",
            DASH if cpu is None or on_cpu is None or off_cpu is None else
            f"{TIMES}{cpu.median:.3f} ({on_cpu - off_cpu:+.2f} µs of {off_cpu:.1f})",
            "(context)", None,
        ))
    return out
