"""An adaptive concurrency limit: how many operations the pool lets run on a node at once.

Pure policy: no I/O, no clock of its own (``now`` is passed in, monotonic seconds). The pool
reads :attr:`AdaptiveLimit.limit` (a plain attribute) as its effective size and reports every
finished operation with :meth:`~AdaptiveLimit.on_sample`.

Algorithm: TCP Vegas, as in Netflix's concurrency-limits. A server has a *no-load latency*
(how long an operation takes when nothing else runs); past the server's knee — its cores, for
a CPU-bound query — more concurrency only makes every operation slower. By Little's law, the
number of operations queued at the server (rather than being worked on) is::

    queue = inflight * (1 - no_load_latency / latency)

The limit grows by one while ``queue < alpha`` and the limit is in use, holds between
``alpha`` and ``beta``, and shrinks when ``queue > beta`` (by more when far above it). With the
defaults (1 and 2) it settles one or two operations above the knee: enough that the server
never idles between operations, few enough that latency stays near its no-load value. For big
limits both thresholds grow to ``tolerance`` (and twice it) times the limit: an error of a few
percent in the no-load latency reads as a few percent of the limit in queue, and without the
slack a pool of 50 on an idle server would stop growing at 20 on noise alone.

Why Vegas rather than Gradient2: Vegas measures the queue in *operations*, which is exactly
what a pool limits, and on a server whose latency is flat up to its cores and grows linearly
after (processor sharing) its estimate is exact, so it lands on the knee instead of drifting.
Gradient2 compares a short-term and a long-term latency average, so it reacts to latency
*change*: under a steady load the long-term average catches up, the gradient returns to 1 and
the limit creeps up by its queue allowance until the next change. Vegas's weakness is a stale
no-load latency, which the probes below fix.

Noise: samples are aggregated over a window (at least ``window_s`` and ``window_samples``
samples) and the window's mean latency is used, so one slow query does not move the limit.

No-load latency: measured by *probes* (as BBR's ProbeRTT), one every ``probe_interval_s``.
A probe lowers the limit to half its value until ``probe_samples`` operations that started
with at most that many in flight have finished (or ``probe_max_s`` passed); the limit then
returns, and the no-load latency moves halfway to the probe's mean (:data:`PROBE_WEIGHT`).
Half, because the settled limit is a step or two above the knee, so half of it is at or below
the knee, while a probe down to one connection would stall the pool behind any long-held
connection. The first probe, at the first sample, goes down to ``min_limit`` since nothing is
known yet. Without probes a limit that starts above the knee never sees the no-load latency,
and one measured on a lighter workload would never go up again. Until a probe has a sample,
the limit holds. The cost: at most ``probe_max_s`` at half the limit every
``probe_interval_s`` (about 1% of a 2-core server's throughput in the simulation).

Overload: :meth:`~AdaptiveLimit.on_drop` (an operation timed out) multiplies the limit by
``drop_ratio``, at most once per window, so that a burst of timeouts is one back-off.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigProblem, ConfigurationError

PROBE_WEIGHT = 0.5
"""Each probe moves the no-load latency this far towards what it measured: a probe is a few
samples, and averaging over the last few probes cuts their noise without lagging much."""


@dataclass(frozen=True, slots=True)
class LimiterConfig:
    """Bounds and tuning of an :class:`AdaptiveLimit`. Durations in seconds. Raises
    :class:`~poolwarden.errors.ConfigurationError` listing every invalid field."""

    initial: int = 4
    min_limit: int = 1
    max_limit: int = 10  # the pool sets it to its max_size
    alpha: float = 1.0  # grow while fewer operations than this are queued at the server
    beta: float = 2.0  # shrink while more than this are
    tolerance: float = 0.1  # alpha is at least this x limit, beta twice that (big limits)
    window_s: float = 0.1  # a window of samples lasts at least this long...
    window_samples: int = 10  # ...and holds at least this many
    probe_interval_s: float = 10.0  # re-measure the no-load latency this often
    probe_samples: int = 50  # samples at low concurrency that make a probe
    probe_max_s: float = 0.5  # a probe ends after this long even with fewer
    drop_ratio: float = 0.75  # the limit is multiplied by this on an overload drop

    def __post_init__(self) -> None:
        out: list[ConfigProblem] = []

        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                out.append(ConfigProblem(f"limiter.{name}", rule, repr(getattr(self, name))))

        need(self.min_limit >= 1, "min_limit", "must be >= 1")
        need(self.max_limit >= self.min_limit, "max_limit", "must be >= min_limit")
        need(self.min_limit <= self.initial <= self.max_limit, "initial",
             "must be within [min_limit, max_limit]")
        need(0.0 <= self.alpha < math.inf, "alpha", "must be a finite number >= 0")
        need(self.alpha < self.beta < math.inf, "beta", "must be finite and > alpha")
        need(0.0 <= self.tolerance < 1.0, "tolerance", "must be in [0, 1)")
        for name in ("window_s", "probe_interval_s", "probe_max_s"):
            need(0.0 < getattr(self, name) < math.inf, name, "must be a finite number > 0 seconds")
        need(self.window_samples >= 1, "window_samples", "must be >= 1")
        need(self.probe_samples >= 1, "probe_samples", "must be >= 1")
        need(0.0 < self.drop_ratio < 1.0, "drop_ratio", "must be in (0, 1)")
        if out:
            raise ConfigurationError(out)


class AdaptiveLimit:
    """A concurrency limit that follows the server's knee. ``limit`` is a plain attribute,
    always within ``[min_limit, max_limit]``; ``on_change(old, new)`` is called on every
    change, including the dip and the return of a probe (see :attr:`probing`).
    """

    __slots__ = (
        "_config", "_count", "_last_drop", "_lat_sum", "_load_sum", "_next_probe",
        "_no_load", "_on_change", "_peak", "_probe_count", "_probe_limit", "_probe_sum",
        "_probe_until", "_resume", "_start", "limit",
    )

    def __init__(
        self, config: LimiterConfig, *, on_change: Callable[[int, int], None] | None = None,
    ) -> None:
        self._config = config
        self._on_change = on_change
        self.limit = config.initial
        self._no_load: float | None = None
        self._next_probe = -math.inf  # the first sample starts a probe
        self._probe_until: float | None = None  # set while probing
        self._probe_limit = config.min_limit
        self._probe_sum = 0.0
        self._probe_count = 0
        self._resume = config.initial  # the limit to return to after a probe
        self._last_drop = -math.inf
        # the window being aggregated: its start, samples, their sums, and the peak in flight
        self._start = 0.0
        self._count = 0
        self._lat_sum = 0.0
        self._load_sum = 0
        self._peak = 0

    @property
    def no_load_latency_s(self) -> float | None:
        """The current estimate of the latency without contention (``None`` before any)."""
        return self._no_load

    @property
    def probing(self) -> bool:
        """Whether the limit is lowered for a probe of the no-load latency (module doc)."""
        return self._probe_until is not None

    def on_sample(self, latency_s: float, inflight: int, now: float) -> None:
        """One finished operation: it held its connection ``latency_s`` and ``inflight``
        operations (itself included) were running when it started. A negative or non-finite
        latency is ignored."""
        if not 0.0 <= latency_s < math.inf:
            return
        if self._probe_until is not None:
            if inflight <= self._probe_limit:
                self._probe_sum += latency_s
                self._probe_count += 1
            if self._probe_count >= self._config.probe_samples or now >= self._probe_until:
                self._end_probe(now)
            return
        if now >= self._next_probe:
            self._start_probe(now)
            return
        if self._count == 0:
            self._start = now
        self._count += 1
        self._lat_sum += latency_s
        self._load_sum += max(inflight, 1)
        self._peak = max(self._peak, inflight)
        config = self._config
        if self._count >= config.window_samples and now - self._start >= config.window_s:
            self._close_window(now)

    def on_drop(self, now: float) -> None:
        """An operation failed from overload (it timed out): multiply the limit by
        ``drop_ratio``. Drops within ``window_s`` of the last one that counted are one event."""
        if now - self._last_drop < self._config.window_s:
            return
        self._last_drop = now
        if self._probe_until is not None:
            self._resume = self._backed_off(self._resume)
        else:
            self._set(self._backed_off(self.limit))
            self._new_window(now)

    # ------------------------------------------------------------------ internals

    def _close_window(self, now: float) -> None:
        count, config = self._count, self._config
        latency = self._lat_sum / count
        load = self._load_sum / count
        used = self._peak + 1 >= self.limit  # tolerates a count that left the caller out
        self._new_window(now)
        if self._no_load is None:
            return  # no probe got a sample yet: hold until one does
        queue = load * (1.0 - self._no_load / latency) if latency > 0.0 else 0.0
        # A few percent of error in the no-load latency is a few percent of the limit in
        # queue: for big limits the thresholds grow with it, so noise is not read as a queue.
        slack = config.tolerance * self.limit
        alpha, beta = max(config.alpha, slack), max(config.beta, 2.0 * slack)
        if queue < alpha and used:
            self._set(self.limit + 1)
        elif queue > beta:
            # One step near the target; a jump far above it, so a limit that starts at a
            # big pool's max_size reaches the knee in a few windows, not dozens.
            self._set(self.limit - max(1, int((queue - beta) // 2)))

    def _start_probe(self, now: float) -> None:
        config = self._config
        self._resume = self.limit
        self._probe_until = now + config.probe_max_s
        self._probe_sum = 0.0
        self._probe_count = 0
        half = max(config.min_limit, self.limit // 2)
        self._probe_limit = config.min_limit if self._no_load is None else half
        self._set(self._probe_limit)

    def _end_probe(self, now: float) -> None:
        if self._probe_count:
            measured = self._probe_sum / self._probe_count
            previous = self._no_load
            self._no_load = measured if previous is None else (
                previous + PROBE_WEIGHT * (measured - previous))
        self._probe_until = None
        self._next_probe = now + self._config.probe_interval_s
        self._new_window(now)
        self._set(self._resume)

    def _backed_off(self, limit: int) -> int:
        return math.floor(limit * self._config.drop_ratio)

    def _new_window(self, now: float) -> None:
        self._start = now
        self._count = 0
        self._lat_sum = 0.0
        self._load_sum = 0
        self._peak = 0

    def _set(self, limit: int) -> None:
        config = self._config
        new = min(max(limit, config.min_limit), config.max_limit)
        old = self.limit
        if new != old:
            self.limit = new
            if self._on_change is not None:
                self._on_change(old, new)

    def __repr__(self) -> str:
        no_load = "?" if self._no_load is None else f"{self._no_load * 1000:.3g}ms"
        probe = " probing" if self._probe_until is not None else ""
        return f"<AdaptiveLimit limit={self.limit} no_load={no_load}{probe}>"
