"""What the lifespan shares with the dependencies and routes of one application.

One :class:`PoolwardenState` per application, kept on ``app.state.poolwarden``: the
``Database``, its health monitor, the metrics sync, and whether the application is shutting
down. Dependencies and routes find it through :func:`state_of`, so they need no globals.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from starlette.requests import HTTPConnection

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from ...database import Database
    from ...health import HealthMonitor
    from ...metrics import MetricsSync, PoolMetrics
    from ...pool import PoolStats

STATE_ATTRIBUTE = "poolwarden"

# The advisor judges counters over an interval; a window shorter than this is mostly noise.
ADVICE_WINDOW_MIN_S = 10.0


class PoolwardenState:
    """The database of one application and its side channels (set up by the lifespan)."""

    def __init__(
        self,
        database: Database,
        monitor: HealthMonitor,
        *,
        metrics_sync: MetricsSync | None = None,
        metrics: PoolMetrics | None = None,
    ) -> None:
        self.database = database
        self.monitor = monitor
        self.metrics_sync = metrics_sync
        self.metrics = metrics
        self.draining = False  # set when shutdown begins: readiness answers 503 from then on
        # Two snapshots for the advisor's window: ``_older`` is at least ADVICE_WINDOW_MIN_S
        # old once set; ``_newer`` becomes ``_older`` when it is that old itself.
        self._older: dict[str, PoolStats] | None = None
        self._newer: tuple[float, dict[str, PoolStats]] | None = None

    def advice_baseline(self) -> dict[str, PoolStats] | None:
        """The stats snapshot to judge the counters against: one taken between one and two
        ``ADVICE_WINDOW_MIN_S`` ago, or ``None`` (judge since the start) until there is one."""
        now = time.monotonic()
        if self._newer is None:
            self._newer = (now, self.database.stats())
        elif now - self._newer[0] >= ADVICE_WINDOW_MIN_S:
            self._older, self._newer = self._newer[1], (now, self.database.stats())
        return self._older

    def __repr__(self) -> str:
        phase = "draining" if self.draining else "serving"
        return f"<PoolwardenState {phase} {self.database!r}>"


def state_of(where: HTTPConnection | Starlette) -> PoolwardenState:
    """The state of the application serving ``where`` (a request or the application).

    Raises ``RuntimeError`` when the poolwarden lifespan is not the application's lifespan
    (or has not started): without it there is no open database to hand out.
    """
    app = where.app if isinstance(where, HTTPConnection) else where
    state = getattr(app.state, STATE_ATTRIBUTE, None)
    if state is None:
        raise RuntimeError(
            "poolwarden is not set up for this application: pass "
            "`lifespan=poolwarden.fastapi.lifespan(...)` to FastAPI(...)"
        )
    if not isinstance(state, PoolwardenState):
        raise TypeError(f"app.state.{STATE_ATTRIBUTE} is not a PoolwardenState")
    return state
