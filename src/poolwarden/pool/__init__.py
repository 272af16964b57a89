"""The pool core: one fair pool of asyncpg connections per database node."""

from ._checkout import Checkout
from ._driver import PooledConnection
from ._record import CloseReason, ConnState
from .config import PoolConfig, ResetPolicy
from .core import Pool
from .stats import PoolStats

__all__ = [
    "Checkout",
    "CloseReason",
    "ConnState",
    "Pool",
    "PoolConfig",
    "PoolStats",
    "PooledConnection",
    "ResetPolicy",
]
