"""Protection: admission under overload, the adaptive concurrency limit, the circuit breaker
(pure policies, no I/O), and safe retry of transactions."""
