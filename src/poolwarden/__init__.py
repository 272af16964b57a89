"""poolwarden: the PostgreSQL connection layer for async Python services."""

from .database import Database
from .deadline import deadline, no_deadline, remaining
from .errors import (
    CircuitOpen,
    CommitOutcomeUnknown,
    ConfigProblem,
    ConfigurationError,
    ConnectionFailed,
    DeadlineExceeded,
    PoolClosed,
    PoolError,
    PoolExhausted,
    PoolState,
    PoolTimeout,
    PoolwardenError,
    StatementTimeout,
)
from .pool import Pool, PoolConfig, PooledConnection, PoolStats, ResetPolicy

__all__ = [
    "CircuitOpen",
    "CommitOutcomeUnknown",
    "ConfigProblem",
    "ConfigurationError",
    "ConnectionFailed",
    "Database",
    "DeadlineExceeded",
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
    "StatementTimeout",
    "deadline",
    "no_deadline",
    "remaining",
]
