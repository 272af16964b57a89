"""poolwarden: the PostgreSQL connection layer for async Python services."""

from .errors import (
    ConfigProblem,
    ConfigurationError,
    ConnectionFailed,
    PoolClosed,
    PoolError,
    PoolExhausted,
    PoolState,
    PoolTimeout,
    PoolwardenError,
)
from .pool import Pool, PoolConfig, PooledConnection, PoolStats, ResetPolicy

__all__ = [
    "ConfigProblem",
    "ConfigurationError",
    "ConnectionFailed",
    "Pool",
    "PoolClosed",
    "PoolConfig",
    "PoolError",
    "PoolExhausted",
    "PoolState",
    "PoolStats",
    "PoolTimeout",
    "PooledConnection",
    "PoolwardenError",
    "ResetPolicy",
]
