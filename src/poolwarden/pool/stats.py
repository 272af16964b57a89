"""The typed stats snapshot of one pool.

Field names say what they are: ``*_total`` fields are cumulative counters since the pool
was created (they only grow); every other field is the current value at the moment of the
snapshot. Units are in the names (``_ms``, ``_s``). Metrics exporters are adapters over
this snapshot; nothing re-derives these numbers elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .histogram import HistogramSnapshot


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A consistent snapshot of one pool's counts (current) and counters (cumulative)."""

    name: str
    # configuration (current)
    min_size: int
    pool_size: int
    max_overflow: int
    max_size: int
    max_waiting: int
    # current
    connections: int  # open or opening: idle + in_use + opening
    connections_idle: int
    connections_in_use: int  # checked out, or released with its rollback still running
    connections_opening: int
    connections_overflow: int  # connections above pool_size
    requests_waiting: int
    closed: bool
    # cumulative
    acquires_total: int
    acquires_waited_total: int  # acquires that had to queue
    acquire_wait_ms_total: float
    acquire_timeouts_total: int
    acquire_refusals_total: int  # refused at once: queue full
    acquire_cancelled_total: int  # callers cancelled while waiting
    connections_created_total: int
    connection_errors_total: int  # failed connection attempts
    connections_closed_total: Mapping[str, int] = field(default_factory=dict)  # by reason
    pings_total: int = 0
    ping_failures_total: int = 0
    restores_total: int = 0  # releases that needed a rollback / reset round trip
    server_restarts_total: int = 0
    leaks_total: int = 0  # checkouts held longer than leak_threshold
    acquire_shed_total: int = 0  # refused or shed by overload admission
    circuit_refusals_total: int = 0  # refused at once while the circuit breaker was open
    breaker_state: str = "disabled"  # closed | open | half_open | disabled (current)
    concurrency_limit: int = 0  # connections that may be in use at once (current)
    overloaded: bool = False  # admission is in overload mode (current)
    # cumulative duration histograms: "wait" (acquire), "use" (hold), "create", "query"
    histograms: Mapping[str, HistogramSnapshot] = field(default_factory=dict)

    @property
    def breaker_open(self) -> bool:
        """Whether the circuit breaker refuses calls now (open, or half open)."""
        return self.breaker_state in ("open", "half_open")

    @property
    def utilisation(self) -> float:
        """In-use connections as a fraction of the maximum (overflow included)."""
        return self.connections_in_use / self.max_size if self.max_size else 0.0

    @property
    def acquire_wait_ms_mean(self) -> float:
        """Mean wait of the acquires that had to queue (0 when none did)."""
        waited = self.acquires_waited_total
        return self.acquire_wait_ms_total / waited if waited else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["connections_closed_total"] = dict(self.connections_closed_total)
        out["histograms"] = {
            kind: {"bounds_s": list(h.bounds_s), "counts": list(h.counts), "sum_s": h.sum_s}
            for kind, h in self.histograms.items()
        }
        return out
