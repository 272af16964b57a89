"""Readiness rules: whether this process may take traffic that needs the database, judged
from the last health report (:mod:`poolwarden.health`) and the pools' breakers now.

Pure: no I/O, no clock. A node is not ready when its last check failed, or its circuit
breaker refuses calls — open, or half open (then the pool lets only its probe calls through,
so traffic sent there would mostly be refused). The whole is not ready when there is no
report, the report is stale, or a required node is not ready.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import CircuitOpen

if TYPE_CHECKING:
    from .health import HealthReport, NodeHealth
    from .pool import PoolStats

__all__ = ["CIRCUIT_OPEN_TYPE", "NodeReadiness", "NotReadyReason", "Readiness",
           "judge_readiness"]


class NotReadyReason(enum.StrEnum):
    """Why readiness says no, for the process and for each node."""

    NO_REPORT = "no_report"  # no check has completed yet
    STALE = "stale"  # the last report is older than the freshness limit (monitor stuck, stopped)
    CIRCUIT_OPEN = "circuit_open"  # the node's breaker refuses calls (open or half open)
    CHECK_FAILED = "check_failed"  # the node's last check failed: its error_type says how


CIRCUIT_OPEN_TYPE = CircuitOpen.__name__  # NodeHealth.error_type of a check the breaker refused


@dataclass(frozen=True, slots=True)
class NodeReadiness:
    """One node's part of a :class:`Readiness` answer."""

    health: NodeHealth  # the node's last check
    required: bool  # whether the answer depends on this node
    reason: NotReadyReason | None  # why this node is not ready; None when it is
    breaker_state: str  # now if known, else at the check: closed | open | half_open | disabled
    # When circuit_open: seconds until the breaker lets a probe through — the hint the pool
    # gave the check less the report's age (so at most that), 0.0 once the breaker lets
    # calls through again; None when not known (it opened after the last check) or ready.
    retry_after_s: float | None

    @property
    def node(self) -> str:
        return self.health.node

    @property
    def ready(self) -> bool:
        return self.reason is None


@dataclass(frozen=True, slots=True)
class Readiness:
    """A readiness answer. ``reason`` is ``None`` when ready; else ``no_report``, ``stale``,
    or the reason of the first required node that is not ready. ``nodes`` holds every
    checked node's part (required or not); ``age_s`` is the report's age."""

    reason: NotReadyReason | None
    nodes: tuple[NodeReadiness, ...] = ()
    age_s: float | None = None

    @property
    def ready(self) -> bool:
        return self.reason is None

    @property
    def retry_after_s(self) -> float | None:
        """The longest breaker hint among the required nodes whose breaker refuses; ``None``
        when there is none."""
        hints = [n.retry_after_s for n in self.nodes
                 if n.required and n.reason is NotReadyReason.CIRCUIT_OPEN
                 and n.retry_after_s is not None]
        return max(hints) if hints else None


def judge_readiness(
    report: HealthReport | None,
    *,
    age_s: float | None,
    max_age_s: float,
    live: Mapping[str, PoolStats] | None = None,
) -> Readiness:
    """Readiness from the last ``report`` (``age_s`` old) and the pools' ``live`` stats by
    node name (the breaker state now; a node missing there is judged by the stats taken
    with its check). Pure: no I/O, no clock.

    Ready when the report is at most ``max_age_s`` old and every required node's check was
    ok and its breaker does not refuse calls now. A node's breaker that is open or half open
    makes it ``circuit_open`` — whatever its last check said — as does a check the breaker
    refused; any other failed check makes it ``check_failed``.
    """
    if report is None or age_s is None:
        return Readiness(NotReadyReason.NO_REPORT)
    live = live or {}
    everything = not report.required
    nodes = tuple(
        _judge_node(n, live.get(n.node), age_s, required=everything or n.node in report.required)
        for n in report.nodes
    )
    reason: NotReadyReason | None
    if age_s > max_age_s:
        reason = NotReadyReason.STALE
    elif not any(n.required for n in nodes):
        reason = NotReadyReason.NO_REPORT  # no required node was checked
    else:
        reason = next((n.reason for n in nodes if n.required and n.reason is not None), None)
    return Readiness(reason, nodes, age_s)


def _judge_node(
    health: NodeHealth, live: PoolStats | None, age_s: float, *, required: bool
) -> NodeReadiness:
    stats = live if live is not None else health.stats
    reason: NotReadyReason | None = None
    retry_after_s: float | None = None
    if stats.breaker_open or health.error_type == CIRCUIT_OPEN_TYPE:
        reason = NotReadyReason.CIRCUIT_OPEN
        if not stats.breaker_open:
            retry_after_s = 0.0  # refused at the check, closed since: the next check tells
        elif health.retry_after_s is not None:
            retry_after_s = max(0.0, health.retry_after_s - age_s)
    elif not health.ok:
        reason = NotReadyReason.CHECK_FAILED
    return NodeReadiness(health, required, reason, stats.breaker_state, retry_after_s)
