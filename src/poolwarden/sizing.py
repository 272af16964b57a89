"""Pool sizing rules as pure functions: each returns its numbers and the arithmetic behind them.

Three classic rules and one function that combines them:

- :func:`cores_rule` — ``(cores x 2) + effective spindles``: how many connections a PostgreSQL
  server can keep *actively working* at once, across every client it has (not per pool).
- :func:`littles_law` — connections busy on average = arrival rate x time each one is held;
  divided by a utilisation target so that requests rarely queue, plus a burst allowance.
- :func:`per_worker_split` — a server's connection budget shared out over worker processes,
  each of which has its own pool.
- :func:`recommend` — per-worker ``pool_size``/``max_overflow``/``min_size`` from all three.

A server's connection budget — ``max_connections - reserved - other_connections`` — is computed
by :func:`service_budget` and its counts checked by :func:`budget_problems`, here only:
:class:`ServerBudget` and :func:`recommend` use them and refuse a budget below 1, while
:func:`poolwarden.server_view.budget_check` uses them and *reports* an over-committed server.

Every result is a frozen dataclass whose ``explanation`` shows the arithmetic in plain words, so
that ``poolwarden size`` and the advisor can print it as is. Arithmetic is exact
(:class:`fractions.Fraction` over the numbers as written), so ``100/s x 0.07 s ÷ 0.7`` is 10
connections, not 11 by a floating-point hair. Bad inputs raise :class:`SizingError` naming every
bad argument at once; a budget too small for the workers is an answer (``ok=False``), not an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from .errors import ConfigProblem, ConfigurationError

DEFAULT_UTILISATION_TARGET = 0.7
"""Keep connections busy at most 70% of the time on average: in a queue served by c
connections, waits grow steeply as utilisation passes ~75-80%, so 70% leaves room for the
randomness of arrivals without making the pool needlessly large."""

DEFAULT_BURST_FACTOR = 1.5
"""Short peaks of about 1.5x the mean rate are ordinary for request/response services; the
overflow is sized to absorb them at the same utilisation target."""

DEFAULT_RESERVED = 3
"""PostgreSQL's default ``superuser_reserved_connections`` (plus ``reserved_connections``, 0 by
default since 16): slots an application role can never use."""

DEFAULT_HEADROOM = 5
"""Slots kept free for people and tools during an incident: a psql session, a migration, a
monitoring agent. When the application has taken every slot, nobody can get in to look."""

POOL_SHARE = Fraction(2, 3)
"""When only a ceiling is known, two thirds of it is kept as ``pool_size`` (connections that
stay open) and the rest is overflow: opened for a burst and closed when a release finds no
waiter. Matches the 10 + 5 default."""


class SizingError(ConfigurationError):
    """An input to a sizing rule is invalid. ``problems`` names every bad argument at once.

    A :class:`~poolwarden.errors.ConfigurationError` (and so a ``ValueError``) because a sizing
    input is configuration one step removed — the CLI reads both from the same flags and
    reports them the same way — but its own type, so callers can tell "your numbers are wrong"
    from "your settings are wrong".
    """

    def __init__(self, problems: list[ConfigProblem]) -> None:
        super().__init__(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        count = len(self.problems)
        self.args = (f"{count} invalid sizing input{'s' if count != 1 else ''}:\n{lines}",)


@dataclass(frozen=True, slots=True)
class CoresRule:
    """``connections``: how many *active* connections the server serves well, all clients."""

    cores: int
    spindles: int
    connections: int
    explanation: str


@dataclass(frozen=True, slots=True)
class LittlesLaw:
    """Connections for a load: ``busy`` on average, ``connections`` at target, ``peak`` in bursts.

    Guarantees ``connections x utilisation_target ≥ busy`` and ``peak ≥ connections ≥ 1``.
    """

    rate_per_s: float
    query_time_s: float
    utilisation_target: float
    burst_factor: float
    busy: float  # rate x time: connections in use on average (L = λW)
    connections: int  # ceil(busy / target), at least 1
    peak: int  # ceil(busy x burst / target), at least ``connections``
    explanation: str


@dataclass(frozen=True, slots=True)
class WorkerSplit:
    """A connection budget shared over worker processes.

    When ``ok``: ``workers x (pool_size + max_overflow) ≤ budget - reserve`` and
    ``pool_size ≥ 1``. When not ``ok`` (the budget cannot give each worker one connection),
    every size is 0 and ``explanation`` says what to do instead.
    """

    ok: bool
    budget: int
    workers: int
    reserve: int
    usable: int  # budget - reserve
    per_worker: int  # the most connections one worker may hold: usable // workers
    pool_size: int
    max_overflow: int
    explanation: str

    @property
    def total(self) -> int:
        """Connections all workers may hold together at their peak."""
        return self.workers * (self.pool_size + self.max_overflow)


@dataclass(frozen=True, slots=True)
class ServerBudget:
    """What a PostgreSQL server can give one service, and how many processes share it.

    ``budget`` = :func:`service_budget` (slots this service may draw on); ``usable`` =
    ``budget - headroom`` (what its pools should be sized to). Raises :class:`SizingError` naming
    every count :func:`budget_problems` refuses, a negative ``headroom``, or a budget below 1.
    """

    max_connections: int
    reserved: int = DEFAULT_RESERVED
    other_connections: int = 0  # other services, cron jobs, replicas' tools, monitoring
    headroom: int = DEFAULT_HEADROOM
    processes: int = 1  # processes of this service, each with its own pool

    def __post_init__(self) -> None:
        problems = budget_problems(self.max_connections, self.reserved, self.other_connections,
                                   processes=self.processes)
        _count(problems, "headroom", self.headroom, 0)
        _require_room(problems, self.max_connections, self.reserved, self.other_connections)
        _raise(problems)

    @property
    def budget(self) -> int:
        return service_budget(self.max_connections, self.reserved, self.other_connections)

    @property
    def usable(self) -> int:
        return self.budget - self.headroom


@dataclass(frozen=True, slots=True)
class Recommendation:
    """Per-worker pool settings from :func:`recommend`, with every reason behind them.

    When ``ok``: ``workers x max_size ≤ usable`` and ``1 ≤ pool_size``,
    ``0 ≤ min_size ≤ pool_size``. ``server_limited``: the load needs more concurrently active
    connections than the server's cores can serve well. ``budget_limited``: the pool was cut to
    fit the connection budget, below what the load asked for.
    """

    ok: bool
    workers: int
    pool_size: int
    max_overflow: int
    min_size: int
    usable: int
    server_limited: bool
    budget_limited: bool
    cores: CoresRule
    load: LittlesLaw | None
    split: WorkerSplit
    reasons: tuple[str, ...]

    @property
    def max_size(self) -> int:
        return self.pool_size + self.max_overflow

    @property
    def total(self) -> int:
        """Connections all workers may hold together at their peak."""
        return self.workers * self.max_size

    @property
    def explanation(self) -> str:
        return "\n".join(self.reasons)


def cores_rule(cores: int, spindles: int = 0) -> CoresRule:
    """``(cores x 2) + effective spindles`` (PostgreSQL wiki; HikariCP "About Pool Sizing").

    ``spindles`` is the *effective* spindle count: 0 when the working set is cached or on SSD,
    up to the number of disks when queries wait on them. The result bounds the server-wide active
    connections — every pool of every process and every other client together.
    Raises :class:`SizingError` for ``cores < 1`` or ``spindles < 0``.
    """
    problems: list[ConfigProblem] = []
    _count(problems, "cores", cores, 1)
    _count(problems, "spindles", spindles, 0)
    _raise(problems)
    connections = cores * 2 + spindles
    return CoresRule(cores, spindles, connections, (
        f"Cores rule: ({cores} cores x 2) + {spindles} effective spindles = {connections} "
        f"connections actively working at once, for the whole server (every process and every "
        f"other client together), not per pool; more active than that only queue inside it."))


def littles_law(
    rate_per_s: float,
    query_time_s: float,
    utilisation_target: float = DEFAULT_UTILISATION_TARGET,
    burst_factor: float = DEFAULT_BURST_FACTOR,
) -> LittlesLaw:
    """Connections needed for ``rate_per_s`` uses of a connection, each holding it ``query_time_s``.

    ``query_time_s`` is the time a connection is *held* per use (query plus whatever the code
    does while holding it), not just the server time. Raises :class:`SizingError` unless
    ``rate_per_s ≥ 0``, ``query_time_s > 0``, ``0 < utilisation_target ≤ 1`` and
    ``burst_factor ≥ 1`` (all finite).
    """
    problems: list[ConfigProblem] = []
    _real(problems, "rate_per_s", rate_per_s, low=0)
    _real(problems, "query_time_s", query_time_s, low=0, low_open=True)
    _real(problems, "utilisation_target", utilisation_target, low=0, low_open=True, high=1)
    _real(problems, "burst_factor", burst_factor, low=1)
    _raise(problems)
    return _little(_exact(rate_per_s), _exact(query_time_s), _exact(utilisation_target),
                   _exact(burst_factor), scope="")


def service_budget(max_connections: int, reserved: int, other_connections: int) -> int:
    """The slots one service may draw on: ``max_connections - reserved - other_connections``.

    Zero or negative when reserved slots and other clients already take them all (an
    over-committed server): the arithmetic does not judge. :class:`ServerBudget` refuses such a
    budget; :func:`poolwarden.server_view.budget_check` reports it. Check the counts first with
    :func:`budget_problems`.
    """
    return max_connections - reserved - other_connections


def budget_problems(
    max_connections: int,
    reserved: int,
    other_connections: int,
    *,
    processes: int | None = None,
    pool_max_size: int | None = None,
) -> list[ConfigProblem]:
    """Every invalid count of a connection budget, one :class:`ConfigProblem` each (empty: valid).

    Each count must be a whole number: ``max_connections ≥ 1``, ``reserved ≥ 0``,
    ``other_connections ≥ 0`` and, when given, ``processes ≥ 1`` (processes sharing the budget)
    and ``pool_max_size ≥ 0`` (each one's pool at its maximum). Whether anything is left once
    they are subtracted is not checked here: that is the caller's decision (see
    :func:`service_budget`).
    """
    problems: list[ConfigProblem] = []
    _count(problems, "max_connections", max_connections, 1)
    _count(problems, "reserved", reserved, 0)
    _count(problems, "other_connections", other_connections, 0)
    if processes is not None:
        _count(problems, "processes", processes, 1)
    if pool_max_size is not None:
        _count(problems, "pool_max_size", pool_max_size, 0)
    return problems


def per_worker_split(budget: int, workers: int, reserve: int = DEFAULT_HEADROOM) -> WorkerSplit:
    """Share ``budget`` server connections over ``workers`` processes, ``reserve`` held back.

    ``budget`` is what this service may use (``max_connections`` minus reserved slots minus
    other clients; :attr:`ServerBudget.budget`). Each worker gets ``(budget - reserve) //
    workers`` as its ceiling (``pool_size + max_overflow``), two thirds of it as ``pool_size``.
    The ceiling is a limit, not a target: :func:`recommend` sizes below it from the load.
    Returns ``ok=False`` when that ceiling would be below 1. Raises :class:`SizingError` for
    ``budget < 1``, ``workers < 1`` or ``reserve < 0``.
    """
    problems: list[ConfigProblem] = []
    _count(problems, "budget", budget, 1)
    _count(problems, "workers", workers, 1)
    _count(problems, "reserve", reserve, 0)
    _raise(problems)
    usable = budget - reserve
    per = max(0, usable) // workers
    head = f"{budget} connections - {reserve} reserve = {usable} usable"
    if per < 1:
        return WorkerSplit(False, budget, workers, reserve, usable, 0, 0, 0, (
            f"{head}, fewer than one for each of {workers} workers. Run fewer workers, raise "
            f"max_connections, or put PgBouncer (transaction mode) in front so that the "
            f"workers share server connections."))
    pool_size = max(1, math.floor(per * POOL_SHARE))
    overflow = per - pool_size
    left = usable - per * workers
    spare = f"; {left} left unassigned" if left else ""
    return WorkerSplit(True, budget, workers, reserve, usable, per, pool_size, overflow, (
        f"{head}; ÷ {workers} workers = {per} per worker at most{spare} "
        f"(pool_size {pool_size} + max_overflow {overflow}; "
        f"{workers} x {per} = {per * workers} ≤ {usable})."))


def recommend(
    *,
    cores: int,
    workers: int,
    max_connections: int,
    rate_per_s: float | None = None,
    query_time_s: float | None = None,
    spindles: int = 0,
    reserved: int = DEFAULT_RESERVED,
    other_connections: int = 0,
    headroom: int = DEFAULT_HEADROOM,
    utilisation_target: float = DEFAULT_UTILISATION_TARGET,
    burst_factor: float = DEFAULT_BURST_FACTOR,
) -> Recommendation:
    """Per-worker ``pool_size``, ``max_overflow`` and ``min_size`` for a service, with reasons.

    ``rate_per_s`` is the whole service's rate (spread evenly over ``workers``) and
    ``query_time_s`` the time each use holds a connection; give both or neither. With them,
    Little's law sizes each worker's pool and overflow, and ``min_size`` keeps the average busy
    count warm; without them each worker gets its share of the cores rule. Either way the
    sizes are cut to fit the budget (``max_connections - reserved - other_connections -
    headroom``), never beyond it. Returns ``ok=False`` when the budget cannot give every worker
    one connection. Raises :class:`SizingError` naming every invalid input.
    """
    _raise(_recommend_problems(
        cores=cores, workers=workers, max_connections=max_connections, rate_per_s=rate_per_s,
        query_time_s=query_time_s, spindles=spindles, reserved=reserved,
        other_connections=other_connections, headroom=headroom,
        utilisation_target=utilisation_target, burst_factor=burst_factor))

    server = cores_rule(cores, spindles)
    budget = service_budget(max_connections, reserved, other_connections)
    split = per_worker_split(budget, workers, headroom)
    target, burst = _exact(utilisation_target), _exact(burst_factor)
    reasons = [server.explanation,
               f"Budget: max_connections {max_connections} - {reserved} reserved - "
               f"{other_connections} other clients = {budget}; {split.explanation}"]
    load: LittlesLaw | None = None
    server_limited = False
    if rate_per_s is not None and query_time_s is not None:
        rate, held = _exact(rate_per_s), _exact(query_time_s)
        load = _little(rate / workers, held, target, burst, scope=" per worker")
        reasons.append(load.explanation)
        busy_total = rate * held
        server_limited = busy_total > server.connections
        if server_limited:
            reasons.append(
                f"Warning: the load keeps {_fmt(busy_total)} connections busy on average, more "
                f"than the {server.connections} the server's cores serve well: the database is "
                f"the bottleneck. More connections will not help; make the queries (or the time "
                f"connections are held) shorter, move reads to replicas, or grow the server.")
        want_pool, want_max = load.connections, load.peak
        warm = min(want_pool, math.ceil(rate * held / workers))
    else:
        share = max(1, server.connections // workers)
        want_pool = share
        want_max = max(share, math.ceil(share * burst))
        warm = 1
        reasons.append(f"No load given: each of {workers} workers takes its share of the cores "
                       f"rule, {server.connections} ÷ {workers} → {share} (at least 1), with "
                       f"overflow to {want_max} for bursts of {_fmt(burst)}x.")
    if not split.ok:
        return Recommendation(False, workers, 0, 0, 0, split.usable, server_limited, False,
                              server, load, split, (*reasons, "Not sized: see the budget."))
    ceiling = split.per_worker
    pool_size = min(want_pool, ceiling)
    max_size = min(want_max, ceiling)
    budget_limited = want_max > ceiling
    if budget_limited:
        carried = ""
        if load is not None:
            per_s = Fraction(pool_size * workers) * target / _exact(load.query_time_s)
            carried = f"; at the target utilisation that carries about {_fmt(per_s)}/s"
        reasons.append(
            f"Cut to the budget: the load asks for {want_pool} + {want_max - want_pool} per "
            f"worker but the budget allows {ceiling}{carried}. Raise max_connections, run fewer "
            f"workers, or share connections through PgBouncer.")
    min_size = min(warm, pool_size)
    reasons.append(
        f"Per worker: DB_POOL_SIZE={pool_size}, DB_MAX_OVERFLOW={max_size - pool_size}, "
        f"DB_POOL_MIN_SIZE={min_size}; all {workers} workers at peak: {workers} x {max_size} = "
        f"{workers * max_size} of {split.usable} usable connections.")
    return Recommendation(True, workers, pool_size, max_size - pool_size, min_size,
                          split.usable, server_limited, budget_limited, server, load, split,
                          tuple(reasons))


# -- helpers -------------------------------------------------------------------------------


def _recommend_problems(
    *, cores: int, workers: int, max_connections: int, rate_per_s: float | None,
    query_time_s: float | None, spindles: int, reserved: int, other_connections: int,
    headroom: int, utilisation_target: float, burst_factor: float,
) -> list[ConfigProblem]:
    problems = budget_problems(max_connections, reserved, other_connections)
    _count(problems, "cores", cores, 1)
    _count(problems, "workers", workers, 1)
    _count(problems, "spindles", spindles, 0)
    _count(problems, "headroom", headroom, 0)
    _real(problems, "utilisation_target", utilisation_target, low=0, low_open=True, high=1)
    _real(problems, "burst_factor", burst_factor, low=1)
    if (rate_per_s is None) != (query_time_s is None):
        missing = "query_time_s" if query_time_s is None else "rate_per_s"
        problems.append(ConfigProblem(missing, "must be given with the other of "
                                      "rate_per_s/query_time_s, or neither"))
    if rate_per_s is not None:
        _real(problems, "rate_per_s", rate_per_s, low=0)
    if query_time_s is not None:
        _real(problems, "query_time_s", query_time_s, low=0, low_open=True)
    _require_room(problems, max_connections, reserved, other_connections)
    return problems


def _require_room(problems: list[ConfigProblem], max_connections: int, reserved: int,
                  other_connections: int) -> None:
    """Add a problem when the budget is below 1 — only when nothing else is wrong, since the
    budget of invalid counts means nothing."""
    if not problems and service_budget(max_connections, reserved, other_connections) < 1:
        taken = reserved + other_connections
        problems.append(ConfigProblem(
            "max_connections",
            f"must exceed reserved + other_connections ({reserved} + {other_connections} = "
            f"{taken}), or nothing is left for this service",
            repr(max_connections)))


def _little(rate: Fraction, held: Fraction, target: Fraction, burst: Fraction, *,
            scope: str) -> LittlesLaw:
    busy = rate * held
    connections = max(1, math.ceil(busy / target))
    peak = max(connections, math.ceil(busy * burst / target))
    floor_note = " (at least 1)" if busy == 0 else ""
    text = (
        f"Little's law{scope}: {_fmt(rate)}/s x {_fmt(held)} s = {_fmt(busy)} connections busy "
        f"on average; at a {_fmt(target * 100)}% utilisation target that is {_fmt(busy)} ÷ "
        f"{_fmt(target)} = {_fmt(busy / target)} → {connections} connections{floor_note}; a "
        f"burst of {_fmt(burst)}x the rate needs {_fmt(busy)} x {_fmt(burst)} ÷ {_fmt(target)} "
        f"= {_fmt(busy * burst / target)} → {peak} at peak.")
    return LittlesLaw(float(rate), float(held), float(target), float(burst), float(busy),
                      connections, peak, text)


def _exact(value: float) -> Fraction:
    """The number as written: ``repr`` of a float is its shortest round-tripping decimal."""
    return Fraction(repr(float(value))) if isinstance(value, float) else Fraction(value)


def _fmt(value: Fraction | float) -> str:
    if isinstance(value, Fraction) and value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.4g}"


def _count(problems: list[ConfigProblem], name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(ConfigProblem(name, "must be a whole number", repr(value)))
    elif value < low:
        problems.append(ConfigProblem(name, f"must be >= {low}", repr(value)))


def _real(problems: list[ConfigProblem], name: str, value: object, *, low: float,
          low_open: bool = False, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        problems.append(ConfigProblem(name, "must be a number", repr(value)))
    elif not math.isfinite(value):
        problems.append(ConfigProblem(name, "must be finite", repr(value)))
    elif value < low or (low_open and value == low):
        problems.append(ConfigProblem(name, f"must be {'>' if low_open else '>='} {low:g}",
                                      repr(value)))
    elif high is not None and value > high:
        problems.append(ConfigProblem(name, f"must be <= {high:g}", repr(value)))


def _raise(problems: list[ConfigProblem]) -> None:
    if problems:
        raise SizingError(problems)
