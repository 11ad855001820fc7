"""The relay's settings (:class:`RelaySettings`, what ``zeroloss relay``'s options set) and its
counters (:class:`RelayCounters`, totals since it started)."""

from __future__ import annotations

from dataclasses import dataclass

NOT_STARTED = "not started yet"
KAFKA_BATCH_SIZE = 2000
"""``zeroloss relay``'s batch for Kafka: 2000 drained a PostgreSQL backlog 1.26x faster than 500
(bench/results/notes.md, 2026-12-01); the other brokers keep RelaySettings' 500."""


@dataclass(frozen=True, slots=True)
class RelaySettings:
    batch_size: int = 500
    max_attempts: int = 10
    lease_s: float = 120.0
    idle_wait_s: float = 0.2
    backoff_base_s: float = 0.5
    max_backoff_s: float = 60.0
    recover_every_s: float = 5.0
    success_retention_s: float | None = 7 * 86400.0
    stats_every_s: float | None = None
    """Refresh the outbox gauges of :mod:`zeroloss.metrics` from ``store.stats()`` this often
    (None: never; ``zeroloss relay --metrics-port`` sets 5 s)."""
    progress_every_s: float | None = 10.0
    """Log a progress line this often (None: never); an idle relay with no backlog says nothing."""


@dataclass(slots=True)
class RelayCounters:
    claimed: int = 0
    delivered: int = 0
    retried: int = 0
    failed: int = 0
    held: int = 0
    undecided: int = 0
    broker_errors: int = 0
    store_errors: int = 0
