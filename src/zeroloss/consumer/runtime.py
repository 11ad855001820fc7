"""The consumer runtime: :class:`Consumer` — ``handler(msg, tx)`` inside one inbox transaction per
message; acks and offsets only after the work they cover is done.
The details: docs/design.md, "consumer/runtime.py"."""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar, Unpack, overload

import sqlalchemy as sa

from zeroloss import metrics
from zeroloss.brokers.base import DLQ_SUFFIX
from zeroloss.brokers.kafka_client import parse_bootstrap
from zeroloss.consumer.dead_letters import DeadLetterPublisher, ParkingLot
from zeroloss.consumer.handlers import RegisteredHandler
from zeroloss.consumer.handling import Handling
from zeroloss.consumer.kafka_loop import KafkaLoop, consumer_config
from zeroloss.consumer.kafka_txn import KafkaTransactions
from zeroloss.consumer.retry_topics import check_delays
from zeroloss.consumer.settings import ConsumerOptions, ConsumerSettings
from zeroloss.consumer.subscription_loop import SubscriptionLoop
from zeroloss.errors import ConfigError
from zeroloss.http import HealthServer
from zeroloss.inbox import BatchInbox, Inbox, id_problem, open_inbox
from zeroloss.logs import Progress, age
from zeroloss.message import uuid7_time
from zeroloss.received import Received
from zeroloss.registry import SUBSCRIPTION_SCHEMES, open_subscription, scheme_of

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(slots=True)
class ConsumerCounters:
    processed: int = 0
    duplicates: int = 0
    retries: int = 0
    dead_lettered: int = 0
    parked: int = 0  # dead letters the broker refused for good, kept in parked_dir
    store_errors: int = 0
    commits: int = 0
    commit_failures: int = 0
    rebalances: int = 0
    assignments: int = 0


def _created(msg: Received) -> float:
    """When the message was made: the time in its UUIDv7 id, else the record's timestamp."""
    created = uuid7_time(msg.id)
    return created if created is not None else msg.timestamp_ms / 1000


class Consumer:
    def __init__(
        self,
        source: str,
        group: str,
        topics: Iterable[str],
        inbox: str | sa.Engine | Inbox | None,
        settings: ConsumerSettings | None = None,
        **options: Unpack[ConsumerOptions],
    ) -> None:
        # The keyword arguments (the README's form) override the settings' fields of those names.
        s = self.settings = (settings or ConsumerSettings()).with_options(options)
        self.url = source
        kafka = scheme_of(source) == "kafka"
        self.topics = list(topics)
        if not self.topics:
            raise ConfigError("a consumer needs at least one topic")
        if (why := id_problem(group)) is not None:  # else every claim would fail: all dead-lettered
            raise ConfigError(f"the group name {group!r:.80} {why}")
        if s.max_attempts < 1:
            raise ConfigError(f"max_attempts must be at least 1, got {s.max_attempts}")
        if s.transaction_batch < 1:
            raise ConfigError(f"transaction_batch must be at least 1, got {s.transaction_batch}")
        self.group = group
        if kafka:
            self.conf = consumer_config(parse_bootstrap(source), group, s.config)
        else:  # RabbitMQ, NATS, Redis, RocketMQ: `config` holds the subscription's options
            if scheme_of(source) not in SUBSCRIPTION_SCHEMES:
                raise ConfigError(f"cannot consume from {source!r}: use kafka://, {', '.join(SUBSCRIPTION_SCHEMES)}")
            if s.transactional:
                raise ConfigError("transactional=True is for Kafka sources only")
            if s.retry_delays_s:
                raise ConfigError(
                    "retry_delays_s (retry topics) is for Kafka sources only; other brokers "
                    "retry in place (RabbitMQ, NATS, Redis and RocketMQ redeliver by themselves)"
                )
            self.conf = dict(s.config or {})
        # a URL or the app's Engine: an inbox of our own (an Engine stays the app's to dispose)
        self._owns_inbox = isinstance(inbox, (str, sa.Engine))
        self.inbox: Inbox | None = open_inbox(inbox) if isinstance(inbox, (str, sa.Engine)) else inbox
        # Non-blocking retries: one delay topic per entry (<topic>.retry.1 …), read by this consumer too.
        self.retry_delays_s = check_delays(s.retry_delays_s)
        self.inbox_retention_s = s.inbox_retention_s  # keep it above the longest redelivery delay
        self.purge_every_s = s.purge_every_s
        self._next_purge = 0.0
        txn: KafkaTransactions | None = None
        if s.transactional:
            if self.inbox is not None:
                raise ConfigError("transactional=True is for handlers that only produce to Kafka: pass inbox=None")
            txn = KafkaTransactions(
                source, s.transactional_id or f"zeroloss-{group}-{uuid.uuid4().hex[:12]}", config=s.dlq_config
            )
        self._stop = threading.Event()
        self._registered: RegisteredHandler | None = None
        self.counters = ConsumerCounters()
        self.progress_every_s = s.progress_every_s  # a progress line this often while working (None: never)
        self._progress = Progress(s.progress_every_s)
        self._quiet = False  # the last progress line said "nothing to do": say it once
        self.handling = Handling(
            group=group,
            inbox=self.inbox,
            txn=txn,
            max_attempts=s.max_attempts,
            backoff_base_s=s.backoff_base_s,
            max_backoff_s=s.max_backoff_s,
            # Up to this many messages share one inbox transaction and one bulk claim: one commit (one
            # fsync) per run instead of per message. Inboxes that cannot (Redis): 1.
            transaction_batch=s.transaction_batch if isinstance(self.inbox, BatchInbox) else 1,
            stop=self._stop,
            finished=self._finished,
            count_store_error=self._count_store_error,
            # made on first use; it must outlive the process: a volume, not a container's scratch space
            parking=ParkingLot(s.parked_dir),
        )
        self._loop_impl: KafkaLoop | SubscriptionLoop
        self._dlq: DeadLetterPublisher | None
        if kafka:
            self._dlq = DeadLetterPublisher(source, config=s.dlq_config)  # makes nothing until used
            self._loop_impl = KafkaLoop(
                self.handling,
                source,
                self.conf,
                self.topics,
                retry_delays_s=self.retry_delays_s,
                batch_size=s.batch_size,
                poll_s=s.poll_s,
                dlq_suffix=s.dlq_suffix,
                dlq=self._dlq,
                housekeeping=self._housekeeping,
                counters=self.counters,
            )
        else:
            self._dlq = None
            self._loop_impl = SubscriptionLoop(
                self.handling,
                lambda: open_subscription(self.url, self.group, self.topics, **self.conf),
                batch_size=s.batch_size,
                poll_s=s.poll_s,
                dlq_suffix=s.dlq_suffix or DLQ_SUFFIX,
                housekeeping=self._housekeeping,
                counters=self.counters,
            )
        # /metrics, /healthz, and /readyz (ready once the group gave this consumer its partitions).
        self.health: HealthServer | None = None
        if s.metrics_port is not None:
            self.health = HealthServer(s.metrics_port, ready=self._readiness).start()

    @property
    def max_attempts(self) -> int:
        return self.handling.max_attempts

    @property
    def transaction_batch(self) -> int:
        return self.handling.transaction_batch

    def _count_store_error(self) -> None:
        self.counters.store_errors += 1

    def _finished(self, topic: str, outcome: str, msg: Received | None = None, started: float | None = None) -> None:
        """Count a message's outcome here and in Prometheus (one vocabulary for both); for a
        handled ``msg``, how long its handling took since ``started`` and how old it is."""
        field_name = {
            "processed": "processed",
            "duplicate": "duplicates",
            "retry": "retries",
            "dead_lettered": "dead_lettered",
            "parked": "parked",
        }[outcome]
        setattr(self.counters, field_name, getattr(self.counters, field_name) + 1)
        seconds = None if started is None else time.monotonic() - started
        age = None if msg is None or outcome != "processed" else time.time() - _created(msg)
        metrics.consumer_processed(self.group, topic, outcome, seconds, age)

    @overload
    def handler(self, fn: F, /) -> F: ...
    @overload
    def handler(
        self, fn: None = None, /, *, model: type[Any] | None = None, batch: bool = False
    ) -> Callable[[F], F]: ...
    def handler(
        self, fn: Callable[..., Any] | None = None, /, *, model: type[Any] | None = None, batch: bool = False
    ) -> Any:
        """Decorator: register the function called for every message, as ``fn(msg, tx)``; with
        ``model=Order`` as ``fn(order, tx)``, the value decoded into an ``Order`` (a pydantic model,
        a dataclass, …; one that is not is dead-lettered at once); with ``batch=True`` as
        ``fn(msgs, tx)`` for up to ``transaction_batch`` messages sharing one inbox transaction;
        ``async def`` works too (:mod:`.handlers`)."""

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            if self.handling.handler is not None:
                raise ConfigError("this consumer already has a handler")
            self._registered = RegisteredHandler(fn, model, batch)
            self.handling.handler = self._registered
            self.handling.handle_many = self._registered.call_many if batch else None
            return fn

        return register if fn is None else register(fn)

    # -- running ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Finish the message in flight, commit, leave the group (safe from any thread, and from
        a signal handler). A stopped consumer stays stopped: ``run*`` return at once."""
        self._stop.set()

    @property
    def assigned(self) -> set[tuple[str, int]]:
        loop = self._loop_impl
        return set(loop.assignment) if isinstance(loop, KafkaLoop) else set()

    def run(self) -> None:
        """Consume until :meth:`stop` or SIGTERM/SIGINT (handlers installed in the main thread only)."""
        restore = self._install_signal_handlers()
        try:
            self._loop(lambda: False)
        finally:
            restore()

    def run_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        self._loop(lambda: time.monotonic() >= deadline)

    def run_until_idle(self, idle_s: float = 2.0, timeout_s: float | None = None) -> None:
        """Consume until this consumer has had its assignment and then no message arrived for
        ``idle_s``; never returns before the first assignment. TimeoutError after ``timeout_s``."""
        start = time.monotonic()
        loop = self._loop_impl

        def finished() -> bool:
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                raise TimeoutError(f"consumer not idle within {timeout_s}s (assigned: {loop.assigned})")
            return loop.assigned and not loop.waiting and time.monotonic() - loop.last_activity >= idle_s

        self._loop(finished)

    def _readiness(self) -> tuple[bool, str]:
        if self._stop.is_set():
            return False, "stopping"
        return (True, "assigned") if self._loop_impl.assigned else (False, "waiting for a partition assignment")

    def close(self) -> None:
        """Release the dead-letter producer, the metrics server and an inbox this consumer opened
        from a URL."""
        if self.health is not None:
            self.health.close()
            self.health = None
        if self._dlq is not None:
            self._dlq.close()
        if self._owns_inbox and self.inbox is not None:
            self.inbox.close()
        if self._registered is not None:
            self._registered.close()

    def _install_signal_handlers(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        sigs = (signal.SIGTERM, signal.SIGINT)
        old = {s: signal.getsignal(s) for s in sigs}
        for s in sigs:
            signal.signal(s, lambda *_: self.stop())

        def restore() -> None:
            for s, h in old.items():
                signal.signal(s, h)

        return restore

    def describe(self) -> str:
        """Source, group, topics, inbox and settings in one line, passwords masked (the start line)."""
        from zeroloss.registry import safe_url

        inbox = self.inbox
        if inbox is None:
            where = "no inbox (at-least-once)" if self.handling.txn is None else "Kafka transactions"
        else:
            engine = getattr(inbox, "engine", None)
            url = engine.url.render_as_string(hide_password=True) if engine is not None else type(inbox).__name__
            where = f"inbox {url}"
        p = self.progress_every_s
        return (
            f"{safe_url(self.url)} group {self.group} topics {', '.join(self.topics)}; {where} (max attempts "
            f"{self.max_attempts}, retries {'in place' if not self.retry_delays_s else 'via retry topics'}, "
            f"progress every {'never' if p is None else f'{p:g}s'})"
        )

    def _loop(self, finished: Callable[[], bool]) -> None:
        if self.handling.handler is None:
            raise ConfigError("register a handler with @consumer.handler before running")
        if self._registered is not None:
            self._registered.check_can_run()
        log.info("consumer started: %s", self.describe())
        self._progress = Progress(self.progress_every_s)
        start = (
            self.counters.processed,
            self.counters.duplicates,
            self.counters.dead_lettered,
            self.counters.parked,
            self.counters.retries,
        )
        try:
            self._loop_impl.run(finished)
        finally:
            c = self.counters
            processed, duplicates, dead, parked, retries = (
                now - then
                for now, then in zip(
                    (c.processed, c.duplicates, c.dead_lettered, c.parked, c.retries), start, strict=True
                )
            )
            log.info(
                "consumer %s stopped after %s: %d processed, %d duplicates skipped, %d dead-lettered, "
                "%d parked, %d retries",
                self.group,
                age(self._progress.elapsed()),
                processed,
                duplicates,
                dead,
                parked,
                retries,
            )

    def _housekeeping(self) -> None:
        """Between batches: inbox retention, and the progress line when it is due."""
        self._purge()
        if not self._progress.due():
            return
        c = self.counters
        rate = self._progress.rate(c.processed + c.duplicates)
        lag = getattr(self._loop_impl, "lag", None)
        if rate == 0 and not lag:
            if self._quiet:
                return  # idle: said once, not every interval
            self._quiet = True
        else:
            self._quiet = False
        log.info(
            "consumer %s progress: %d processed (%.1f/s), %d duplicates skipped, %d retries, %d dead-lettered, "
            "%d parked; lag %s",
            self.group,
            c.processed,
            rate,
            c.duplicates,
            c.retries,
            c.dead_lettered,
            c.parked,
            "unknown" if lag is None else lag,
        )

    def _purge(self) -> None:
        if self.inbox is None or self.inbox_retention_s is None or time.monotonic() < self._next_purge:
            return
        self._next_purge = time.monotonic() + self.purge_every_s
        try:
            if n := self.inbox.purge(self.inbox_retention_s):
                log.info("inbox: forgot %d claims older than %.0fs", n, self.inbox_retention_s)
        except Exception as exc:  # retention is housekeeping: never stop consuming for it
            log.warning("inbox purge failed: %s", exc)
