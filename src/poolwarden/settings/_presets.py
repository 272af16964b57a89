"""Where a setting's value comes from when it is not given: the named presets (``DB_PRESET``)
and, below them, :class:`~poolwarden.pool.config.PoolConfig`'s own defaults."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from ..pool.config import PoolConfig

PresetName = Literal["development", "small_api", "high_traffic", "background_worker"]

_POOL_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(PoolConfig)}
# settings field -> PoolConfig field; the setting's default is the PoolConfig default.
TO_POOL: dict[str, str] = {
    "pool_size": "pool_size", "max_overflow": "max_overflow", "pool_min_size": "min_size",
    "pool_max_waiting": "max_waiting", "pool_timeout": "acquire_timeout",
    "pool_recycle": "max_lifetime", "pool_idle_timeout": "idle_timeout",
    "pool_pre_ping": "pre_ping", "pool_ping_after_idle": "ping_after_idle",
    "pool_reset": "reset", "statement_timeout": "statement_timeout",
    "lock_timeout": "lock_timeout", "idle_in_transaction_timeout": "idle_in_transaction_timeout",
    "connect_timeout": "connect_timeout", "command_timeout": "command_timeout",
    "application_name": "application_name", "statement_cache_size": "statement_cache_size",
    "echo_pool": "echo_pool", "slow_query_threshold": "slow_query_threshold",
    "leak_threshold": "leak_threshold", "log_query_params": "log_query_params",
}
# settings field -> its default, for the fields that map onto PoolConfig.
POOL_DEFAULTS: dict[str, Any] = {name: _POOL_DEFAULTS[pool] for name, pool in TO_POOL.items()}

PRESETS: Mapping[str, Mapping[str, Any]] = {
    # Local work: few connections, SQL echoed, fail fast so mistakes show at once.
    "development": {
        "pool_size": 5, "max_overflow": 5, "pool_min_size": 0, "pool_timeout": 3.0,
        "pool_max_waiting": 100, "connect_timeout": 3.0, "command_timeout": 15.0,
        "statement_timeout": 10.0, "lock_timeout": 5.0, "echo": True,
        "slow_query_threshold": 0.5,
    },
    # A modest web service: small pool, bounded statements, no idle-in-transaction leaks.
    "small_api": {
        "pool_size": 5, "max_overflow": 5, "pool_min_size": 1, "pool_timeout": 5.0,
        "pool_max_waiting": 200, "command_timeout": 15.0, "statement_timeout": 10.0,
        "lock_timeout": 5.0, "idle_in_transaction_timeout": 30.0, "slow_query_threshold": 0.5,
        "pool_admission": True,
    },
    # Many requests: warm bigger pool, short bounded queue, fail fast (503) rather than pile up.
    "high_traffic": {
        "pool_size": 20, "max_overflow": 10, "pool_min_size": 10, "pool_timeout": 1.0,
        "pool_max_waiting": 100, "command_timeout": 10.0, "statement_timeout": 5.0,
        "lock_timeout": 2.0, "idle_in_transaction_timeout": 15.0, "slow_query_threshold": 0.25,
        "pool_admission": True, "pool_adaptive_limit": True,
    },
    # Batch jobs: few connections, patient acquire, long statements.
    "background_worker": {
        "pool_size": 2, "max_overflow": 2, "pool_min_size": 0, "pool_timeout": 60.0,
        "pool_idle_timeout": 60.0, "command_timeout": 660.0, "statement_timeout": 600.0,
        "lock_timeout": 30.0, "idle_in_transaction_timeout": 300.0, "slow_query_threshold": 30.0,
    },
}
