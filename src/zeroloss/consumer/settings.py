"""How a :class:`~zeroloss.consumer.Consumer` runs: :class:`ConsumerSettings`, the counterpart of
:class:`~zeroloss.relay.RelaySettings`, and :class:`ConsumerOptions`, the same fields as keyword
arguments (``Consumer(..., max_attempts=3)``), which override the settings' field of that name."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

from zeroloss.brokers.base import DLQ_SUFFIX


@dataclass(frozen=True, slots=True)
class ConsumerSettings:
    config: dict[str, Any] | None = None
    """Kafka: librdkafka consumer settings over zeroloss's; other brokers: the subscription's options."""
    max_attempts: int = 5
    """Handler attempts per message before its dead letter."""
    backoff_base_s: float = 0.2
    max_backoff_s: float = 30.0
    batch_size: int = 500
    poll_s: float = 0.2
    dlq_suffix: str = DLQ_SUFFIX
    dlq_config: dict[str, Any] | None = None
    """Kafka: producer settings of the dead-letter (and transactional) producer."""
    transactional: bool = False
    """Kafka, no inbox: outputs, dead letters and offsets commit in one Kafka transaction per batch."""
    transactional_id: str | None = None
    inbox_retention_s: float | None = 7 * 86400.0
    """Claims older than this are purged; keep it above the longest possible redelivery delay."""
    purge_every_s: float = 3600.0
    metrics_port: int | None = None
    """Serve /metrics, /healthz and /readyz on this port (None: no server)."""
    retry_delays_s: Sequence[float] = ()
    """Kafka: non-blocking retries on ``<topic>.retry.<n>``, one delay per entry."""
    transaction_batch: int = 500
    """Up to this many messages share one inbox transaction (SQL inboxes). As many as a Kafka
    fetch brings (``batch_size``): each transaction's begin, savepoint check and commit cost as
    much for 1 message as for 500, and at 100 they were a sixth of the consumer's time
    (bench/results/notes.md, 2026-12-01); a slow per-message handler's runs shrink anyway."""
    parked_dir: str | os.PathLike[str] = "zeroloss-parked"
    """Where dead letters the broker refused for good are kept: a volume, not scratch space."""
    progress_every_s: float | None = 10.0
    """Log a progress line this often while working (None: never)."""

    def with_options(self, options: ConsumerOptions) -> ConsumerSettings:
        """These settings with the fields named in ``options`` replaced."""
        return dataclasses.replace(self, **options) if options else self


class ConsumerOptions(TypedDict, total=False):
    """:class:`ConsumerSettings`' fields as ``Consumer`` keyword arguments (the form the README uses)."""

    config: dict[str, Any] | None
    max_attempts: int
    backoff_base_s: float
    max_backoff_s: float
    batch_size: int
    poll_s: float
    dlq_suffix: str
    dlq_config: dict[str, Any] | None
    transactional: bool
    transactional_id: str | None
    inbox_retention_s: float | None
    purge_every_s: float
    metrics_port: int | None
    retry_delays_s: Sequence[float]
    transaction_batch: int
    parked_dir: str | os.PathLike[str]
    progress_every_s: float | None
