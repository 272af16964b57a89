"""The markdown report of a run (the JSON holds the same figures and every raw record)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .bar import Check
from .limits import PGBENCH_SCRIPTS
from .plan import BARE, FIFO, IDEAL, SQLALCHEMY_BARE, SQLALCHEMY_IDEAL
from .results import BASELINE, Results, Series
from .stats import DASH, TIMES, Spread
from .workloads import WORKLOADS

LIMIT_LABELS = {
    BARE: "limit: bare asyncpg connection",
    IDEAL: "limit: no-pool ideal (P tasks, own connection each)",
    FIFO: "reference: bare-bones fair FIFO pool (deque of futures, direct handoff)",
    SQLALCHEMY_BARE: "limit: bare SQLAlchemy connection",
    SQLALCHEMY_IDEAL: "limit: SQLAlchemy no-pool ideal (P tasks, own AsyncConnection each)",
}


def _num(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"


def _ratio(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _cell(spread: Spread | None, *, ratio: bool = False) -> str:
    if spread is None:
        return DASH
    fmt = _ratio if ratio else _num
    text = f"{TIMES if ratio else ''}{fmt(spread.median)}"
    if spread.n > 1 and spread.low != spread.high:
        text += f" ({fmt(spread.low)}{DASH}{fmt(spread.high)})"
    return text


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


class Report:
    def __init__(
        self, results: Results, labels: dict[str, str], meta: dict[str, Any], checks: list[Check]
    ) -> None:
        self.r = results
        self.labels = {**labels, **LIMIT_LABELS, **{s.key: s.label for s in PGBENCH_SCRIPTS}}
        self.meta = meta
        self.checks = checks
        self.systems = [k for k in labels if k not in meta["skipped"]]

    def label(self, key: str) -> str:
        return self.labels.get(key, key)

    def render(self) -> str:
        out = self._head() + self._summary() + self._bar()
        out += self._closed_loop("a") + self._closed_loop("b") + self._overload()
        out += self._closed_loop("d") + self._closed_loop("paired")
        out += self._pgbench() + self._systems()
        return "\n".join(out) + "\n"

    def _head(self) -> list[str]:
        m, env, server = self.meta, self.meta["machine"], self.meta["server"]
        pk = env["packages"]
        return [
            f"# poolwarden benchmark — {m['started']}",
            "",
            f"Command: `{m['command']}`",
            "",
            f"- profile: **{m['profile']}**, {self.r.rounds} interleaved rounds; "
            f"timing {m['timing']}",
            f"- server: PostgreSQL {server.get('server_version')} ({m['target']}), "
            f"max_connections={server.get('max_connections')}, fsync={server.get('fsync')}",
            f"- machine: {env['nproc']} {TIMES} {env['cpu_model']}, {env['platform']}, "
            f"load average at start {', '.join(f'{x:.2f}' for x in env['loadavg_at_start'])}",
            f"- python {env['python']}; "
            + ", ".join(f"{k} {v}" for k, v in pk.items() if v is not None)
            + f"; git {env['git_commit']}{' (dirty)' if env['git_dirty'] else ''}",
            f"- elapsed: {m.get('elapsed_s', 0):.0f} s",
            "",
            f"Each cell: median over the rounds (min{DASH}max). `{TIMES}asyncpg`: the median of "
            "the per-round "
            f"ratios to **{self.label(BASELINE)}** (default) at the same point. Client and server "
            "share this machine.",
            "",
        ]

    def _get(self, key: str, who: str) -> Series | None:
        return self.r.get(key, who)

    def _with_ratio(self, key: str, who: str, metric: str = "throughput") -> str:
        series = self._get(key, who)
        if series is None:
            return DASH
        text = _num(series.median(metric) or 0.0)
        ratio = self.r.ratio(series, self._get(key, BASELINE), metric)
        if ratio is not None and who != BASELINE:
            text += f" {TIMES}{ratio.median:.2f}"
        return text

    def _summary(self) -> list[str]:
        rows = []
        for title, key in (
            ("a. acquire+release, C=64 (ops/s)", "a C=64 P=10"),
            ("b. SELECT 1, C=1 (q/s)", "b C=1 P=10"),
            ("b. SELECT 1, C=10, P=10 (q/s)", "b C=10 P=10"),
            ("b. SELECT 1, C=64, P=10 (q/s)", "b C=64 P=10"),
        ):
            rows.append([title, *(self._with_ratio(key, s) for s in self.systems)])
        overload = []
        for system in self.systems:
            series = self._get("c C=500 P=10", system)
            if series is None:
                overload.append(DASH)
                continue
            overload.append(
                f"{self._with_ratio('c C=500 P=10', system)}, "
                f"{_num(series.median('p50_ms') or 0.0)} ms"
            )
        rows.append(["c. overload goodput (of 1000/s), p50 served", *overload])
        limits = []
        for key, who, what in (
            ("limit C=1 P=1", BARE, "bare connection C=1"),
            ("limit C=10 P=10", IDEAL, "no-pool ideal P=10"),
            ("limit C=20 P=20", IDEAL, "no-pool ideal P=20"),
            ("limit C=1 P=1", SQLALCHEMY_BARE, "bare SQLAlchemy connection C=1"),
            ("limit C=10 P=10", SQLALCHEMY_IDEAL, "SQLAlchemy no-pool ideal P=10"),
            ("capacity C=10 P=10", IDEAL, "workload c capacity (P=10 owned, pg_sleep(0.01))"),
            ("pgbench C=64 P=0", "select1", "pgbench SELECT 1 c=64"),
            ("pgbench C=64 P=0", "select-only", "pgbench -S c=64"),
        ):
            if (series := self._get(key, who)) is not None:
                limits.append(f"{what} {_cell(series.spread('throughput'))} q/s")
        return [
            "## Summary",
            "",
            *_table(["", *(self.label(s) for s in self.systems)], rows),
            "",
            "Limits: " + ("; ".join(limits) if limits else "not measured") + ".",
            "",
        ]

    def _bar(self) -> list[str]:
        verdict = {True: "pass", False: "**miss**", None: DASH}
        rows = [[c.criterion, c.measured, c.target, verdict[c.ok]] for c in self.checks]
        return [
            "## The bar (issue 3)",
            "",
            *_table(["criterion", "measured", "target", "verdict"], rows),
            "",
        ]

    def _keys(self, workload: str) -> list[str]:
        return [k for k in self.r.point_keys() if k.split(" ", 1)[0] == workload]

    def _row(self, key: str, who: str, *, ideal: Series | None) -> list[str]:
        series = self._get(key, who)
        if series is None:
            return []
        base = self._get(key, BASELINE)
        row = [
            self.label(who),
            _cell(series.spread("throughput")),
            _cell(self.r.ratio(series, base), ratio=True),
        ]
        if ideal is not None:
            row.append(_cell(self.r.ratio(series, ideal), ratio=True))
        row += [_cell(series.spread(m))
                for m in ("p50_ms", "p99_ms", "wait_p99_ms", "cpu_us_per_op")]
        row.append(_num(sum(v or 0 for v in series.values.get("errors", []))))
        return row

    def _closed_loop(self, workload: str) -> list[str]:
        out = [f"## {workload}. {WORKLOADS[workload]}", ""]
        header = ["system", "ops/s", f"{TIMES}asyncpg"]
        if workload in ("b", "paired"):
            header.append(f"{TIMES}ideal P")
        header += ["p50 ms", "p99 ms", "p99 acquire wait ms", "client CPU µs/op", "errors"]
        for key in self._keys(workload):
            point = self.r.at(key)
            any_series = next(iter(point.values()))
            c, p = any_series.point["concurrency"], any_series.point["pool_size"]
            ideal = (self._get(f"limit C={p} P={p}", IDEAL) if workload == "b"
                     else self._get(key, IDEAL) if workload == "paired" else None)
            rows = [row for who in point if (row := self._row(key, who, ideal=ideal))]
            if workload == "b":
                limits = [self._get(f"limit C={p} P={p}", SQLALCHEMY_IDEAL), ideal]
                if c == 1:
                    limits = [self._get("limit C=1 P=1", who) for who in (SQLALCHEMY_BARE, BARE)]
                    limits.append(ideal)
                rows += [self._limit_row(limit, key, ideal) for limit in limits if limit]
            out += [f"### C={c}, pool {p}", "", *_table(header, rows), ""]
        return out

    def _limit_row(self, limit: Series, key: str, ideal: Series | None) -> list[str]:
        base = self._get(key, BASELINE)
        return [
            self.label(limit.participant) + f" (C={limit.point['concurrency']})",
            _cell(limit.spread("throughput")),
            _cell(self.r.ratio(limit, base), ratio=True),
            _cell(self.r.ratio(limit, ideal), ratio=True),
            _cell(limit.spread("p50_ms")),
            _cell(limit.spread("p99_ms")),
            DASH,
            _cell(limit.spread("cpu_us_per_op")),
            _num(sum(v or 0 for v in limit.values.get("errors", []))),
        ]

    def _overload(self) -> list[str]:
        out = [
            f"## c. {WORKLOADS['c']}",
            "",
            f"100 and 500 callers (10{TIMES} and 50{TIMES} the 10 that fill the pool) "
            "in a closed loop, "
            "pool 10 (capacity nominally 1000/s; measured: the 'capacity' limit, ten tasks "
            "each owning a connection); a caller whose request "
            f"is shed (refused or timed out) pauses for the Retry-After it was given, else "
            f"{self.meta['timing']['shed_pause_s']} s, before its next one. "
            "After-budget counts are per round.",
            "",
        ]
        header = [
            "system",
            "callers",
            "goodput/s",
            f"{TIMES}asyncpg",
            "timeouts/s",
            "refusals/s",
            "p50 served ms",
            "p99 served ms",
            "p99 time-to-refusal ms",
            "acquired after budget",
            "finished after budget",
            "errors",
        ]
        rows = []
        for key in self._keys("c"):
            for who, series in self.r.at(key).items():
                rows.append(
                    [
                        self.label(who),
                        key.split()[1].removeprefix("C="),
                        _cell(series.spread("throughput")),
                        _cell(self.r.ratio(series, self._get(key, BASELINE)), ratio=True),
                        *(
                            _cell(series.spread(m))
                            for m in (
                                "timeouts_per_s",
                                "refusals_per_s",
                                "p50_ms",
                                "p99_ms",
                                "shed_p99_ms",
                                "late_acquires",
                                "late_finishes",
                                "errors",
                            )
                        ),
                    ]
                )
        capacity = self._get("capacity C=10 P=10", IDEAL)
        if capacity is not None:
            rows.append(["capacity: 10 tasks owning a connection each (no pool)", "10",
                         _cell(capacity.spread("throughput")),
                         *([DASH] * (len(header) - 3))])
        out += [*_table(header, rows), ""]
        return out

    def _pgbench(self) -> list[str]:
        rows = []
        for key in self._keys("pgbench"):
            for who, series in self.r.at(key).items():
                rows.append(
                    [
                        self.label(who),
                        str(series.point["concurrency"]),
                        _cell(series.spread("throughput")),
                        _cell(series.spread("latency_avg_ms")),
                        series.first_error or "",
                    ]
                )
        if not rows:
            return ["## pgbench", "", "Not run.", ""]
        return [
            "## pgbench (the server's limit)",
            "",
            *_table(["script", "clients", "q/s", "latency avg ms", "error"], rows),
            "",
        ]

    def _systems(self) -> list[str]:
        out = ["## Systems", ""]
        out += [f"- **{self.label(k)}** (`{k}`): {note}" for k, note in self.meta["notes"].items()]
        out += [
            f"- skipped **{self.label(k)}** (`{k}`): {why}"
            for k, why in self.meta["skipped"].items()
        ]
        errors = [
            (key, who, s.first_error)
            for key in self.r.point_keys()
            for who, s in self.r.at(key).items()
            if s.first_error
        ]
        if errors:
            out += ["", "Errors (first of each series):", ""]
            out += [f"- {key} / {who}: `{err}`" for key, who, err in errors]
        return [*out, ""]
