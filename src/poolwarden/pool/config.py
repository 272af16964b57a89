"""The configuration of one pool (one database node), validated once and then sealed.

``PoolConfig`` is what the pool core needs and nothing more; :mod:`poolwarden.settings`
builds it from the environment. It is a frozen dataclass: a pool's configuration changes
only through :meth:`poolwarden.pool.Pool.resize`, never by mutation.
"""

from __future__ import annotations

import enum
import math
import ssl as _ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .._secrets import dsn_target, mask_dsn
from ..errors import ConfigProblem, ConfigurationError
from ..protect.admission import AdmissionConfig
from ..protect.breaker import BreakerConfig
from ..protect.limiter import LimiterConfig

InitHook = Callable[[Any], Awaitable[None]]
"""``async def init(conn: asyncpg.Connection) -> None``: runs once on every new connection
(register type codecs, prepare statements). A failure discards the connection."""


class ResetPolicy(enum.StrEnum):
    """What the pool does to a connection when it is released.

    ``TRANSACTION`` (default; safe and fast): an open or failed transaction is rolled back,
    a query still running is cancelled, and a connection whose state cannot be restored is
    closed rather than handed on. Session state set *outside* a transaction (``SET`` without
    ``LOCAL``, ``LISTEN``, session advisory locks, temporary tables, ``PREPARE``) is kept:
    mark such a use with ``pool.connection(reset=True)`` to get the full reset for it.

    ``ALWAYS``: the full reset after every use (rollback, then ``RESET ALL``, ``UNLISTEN *``,
    ``CLOSE ALL``, advisory unlock all) — asyncpg's own pool behaviour; one extra round trip
    per release.
    """

    TRANSACTION = "transaction"
    ALWAYS = "always"


@dataclass(frozen=True, slots=True, repr=False)
class PoolConfig:
    """Configuration of one pool. Durations are in seconds; ``None`` means "not set"."""

    dsn: str
    name: str = "primary"
    min_size: int = 1
    pool_size: int = 10
    max_overflow: int = 5
    max_waiting: int = 1000
    acquire_timeout: float = 5.0
    max_lifetime: float = 1800.0
    lifetime_jitter: float = 0.05
    idle_timeout: float = 300.0
    pre_ping: bool = True
    ping_after_idle: float = 0.5
    connect_timeout: float = 5.0
    command_timeout: float = 30.0
    release_timeout: float = 5.0
    statement_timeout: float | None = None
    lock_timeout: float | None = None
    idle_in_transaction_timeout: float | None = None
    application_name: str = "poolwarden"
    timezone: str = "UTC"
    ssl: _ssl.SSLContext | str | None = None
    statement_cache_size: int = 100
    reset: ResetPolicy = ResetPolicy.TRANSACTION
    reconnect_initial_delay: float = 0.1
    reconnect_max_delay: float = 10.0
    max_concurrent_connects: int = 2
    maintenance_interval: float = 1.0
    server_settings: Mapping[str, str] = field(default_factory=dict)
    init: InitHook | None = None
    # observability
    query_stats: bool = True  # time every statement (query-time histogram); ~1 µs each
    slow_query_threshold: float | None = 1.0  # log statements slower than this (seconds)
    log_query_params: bool = False  # put parameters in slow-query logs (off: secrets)
    leak_threshold: float | None = None  # warn (with the acquiring stack) when held longer
    echo_pool: bool = False  # log every pool event at INFO (DB_ECHO_POOL)
    # protection (None: off)
    admission: AdmissionConfig | None = None  # refuse at once what would wait too long
    # per node; it counts connection attempts: losing many connections at once (a restart)
    # is one event, and the reconnect attempts that follow tell whether the node is down
    breaker: BreakerConfig | None = field(default_factory=lambda: BreakerConfig(open_s=0.5))
    limiter: LimiterConfig | None = None  # adaptive concurrency limit (max = max_size)

    def __post_init__(self) -> None:
        problems = list(_problems(self))
        if problems:
            raise ConfigurationError(problems)

    @property
    def max_size(self) -> int:
        """The most connections this pool may hold at once: ``pool_size + max_overflow``."""
        return self.pool_size + self.max_overflow

    def all_server_settings(self) -> dict[str, str]:
        """The ``server_settings`` sent in every connection's startup packet (no round trip)."""
        out = {"timezone": self.timezone, "application_name": self.application_name}
        for key, seconds in (
            ("statement_timeout", self.statement_timeout),
            ("lock_timeout", self.lock_timeout),
            ("idle_in_transaction_session_timeout", self.idle_in_transaction_timeout),
        ):
            if seconds is not None:
                out[key] = str(int(seconds * 1000))
        out.update(self.server_settings)
        return out

    def __repr__(self) -> str:
        return (
            f"PoolConfig(name={self.name!r}, target={dsn_target(self.dsn)!r}, "
            f"min_size={self.min_size}, pool_size={self.pool_size}, "
            f"max_overflow={self.max_overflow}, max_waiting={self.max_waiting}, "
            f"acquire_timeout={self.acquire_timeout}, reset={self.reset.value!r})"
        )

    __str__ = __repr__

    @property
    def masked_dsn(self) -> str:
        return mask_dsn(self.dsn)


def _problems(c: PoolConfig) -> list[ConfigProblem]:
    """Every rule ``c`` breaks; the variable names are the pool's field names. A value of
    the wrong type (``None`` for a duration, ``"10"`` for a size) breaks its rule too."""
    out: list[ConfigProblem] = []

    def need(ok: bool, variable: str, rule: str, value: object) -> None:
        if not ok:
            out.append(ConfigProblem(variable, rule, repr(value)))

    def at_least(name: str, low: int) -> None:
        value = getattr(c, name)
        need(_integer(value) and value >= low, name, f"must be an integer >= {low}", value)

    def seconds(name: str, rule: str, ok: Callable[[float], bool], *, unset: bool) -> None:
        value = getattr(c, name)
        need((unset and value is None) or (_number(value) and ok(value)), name, rule, value)

    need(isinstance(c.dsn, str) and bool(c.dsn), "dsn", "must not be empty", "")
    for name, low in (("min_size", 0), ("pool_size", 1), ("max_overflow", 0),
                      ("max_waiting", 0), ("statement_cache_size", 0),
                      ("max_concurrent_connects", 1)):
        at_least(name, low)
    for name in ("acquire_timeout", "connect_timeout", "command_timeout", "release_timeout",
                 "max_lifetime", "idle_timeout", "reconnect_initial_delay",
                 "reconnect_max_delay", "maintenance_interval"):
        seconds(name, "must be > 0 seconds", _positive, unset=False)
    seconds("ping_after_idle", "must be >= 0 seconds", _not_negative, unset=False)
    seconds("lifetime_jitter", "must be in [0, 1)", lambda v: 0 <= v < 1, unset=False)
    for name in ("statement_timeout", "lock_timeout", "idle_in_transaction_timeout"):
        seconds(name, "must be >= 0 seconds or unset", _not_negative, unset=True)
    for name in ("slow_query_threshold", "leak_threshold"):
        seconds(name, "must be > 0 seconds or unset", _positive, unset=True)
    if out:  # the rules between fields need each one valid on its own
        return out
    need(c.min_size <= c.pool_size, "min_size", "must be <= pool_size", c.min_size)
    need(c.reconnect_max_delay >= c.reconnect_initial_delay, "reconnect_max_delay",
         "must be >= reconnect_initial_delay", c.reconnect_max_delay)
    return out


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return not math.isnan(value)


def _positive(value: float) -> bool:
    return value > 0


def _not_negative(value: float) -> bool:
    return value >= 0
