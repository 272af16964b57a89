"""Protection: admission under overload, the adaptive concurrency limit and the circuit
breaker (pure policies, no I/O, re-exported here), and safe retry of transactions
(:mod:`.retry`, :mod:`.transactions`; :mod:`.sa_transactions` for SQLAlchemy sessions —
imported from their modules: they need the pool core, which imports these policies)."""

from .admission import Admission, AdmissionConfig
from .breaker import BreakerConfig, BreakerState, CircuitBreaker
from .limiter import AdaptiveLimit, LimiterConfig

__all__ = [
    "AdaptiveLimit",
    "Admission",
    "AdmissionConfig",
    "BreakerConfig",
    "BreakerState",
    "CircuitBreaker",
    "LimiterConfig",
]
