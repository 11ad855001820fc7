"""The consumer runtime: ``handler(msg, tx)`` inside one inbox transaction per message; offsets
committed only after the work they cover is done.

Per message: begin a transaction on the inbox, claim ``(group, message id)``, run the handler
with the transaction (its effects go through ``tx``), commit. A claim that already exists is a
duplicate: the handler is skipped and the (empty) transaction commits. Only then is the message's
offset recorded as done. After each ``consume()`` batch the done offsets are committed to Kafka
synchronously, so a commit never covers a message that has neither succeeded nor been
dead-lettered: a partition's done offset only ever moves to ``offset + 1`` of the message that was
just finished, and messages are finished strictly in partition order.

Failures:

* the handler raises → the same message again (order kept) after ``backoff_s``; after
  ``max_attempts`` it goes to ``<topic>.dlq`` and the consumer moves on — only once the dead
  letter's delivery report came back (idempotent producer, acks=all). With ``retry_delays_s``
  (Kafka) the retries go through delay topics ``<topic>.retry.<n>`` instead, so a failing message
  does not hold its partition (and loses its place in its key's order): see
  :mod:`zeroloss.retry_topics`.
* poison — a ``zeroloss-id`` header no inbox can store (not UTF-8, over 255 characters, a NUL:
  :func:`~zeroloss.inbox.id_problem`), an id the inbox refuses (a MessageError from the claim), or
  a handler raising :class:`PoisonMessage` (or any :class:`~zeroloss.errors.MessageError` /
  :class:`~zeroloss.errors.MalformedMessageError`) → dead-lettered at once.
* the handler's transaction ended under it (it caught a deadlock the database answered with a
  rollback: :class:`~zeroloss.errors.TransactionLostError` from the inbox's commit) → the
  handler's failure, as if it had raised; a shared transaction's messages are taken one by one.
* the inbox itself fails (database or Redis down: a retriable StoreError, or a handler's statement
  on a connection that was lost) → nobody's fault: retried without spending attempts, for as long
  as it takes. The partition waits; nothing is committed past it.

Records without a ``zeroloss-id`` header are deduplicated by ``"topic/partition/offset"``.

Rebalancing uses the eager protocol (range/roundrobin; cooperative-sticky is refused). librdkafka
calls the rebalance callbacks only from inside ``consume()``, i.e. between batches, when no message
is in flight: ``on_revoke`` commits what is done, synchronously, and forgets the revoked
partitions' offsets; ``on_assign`` starts them fresh; ``on_lost`` forgets without committing (the
group has moved on; the new owner's inbox claim absorbs any overlap). SIGTERM/SIGINT (handlers
installed by :meth:`Consumer.run` in the main thread) or :meth:`Consumer.stop` let the handler call
in flight finish; a message waiting out a retry backoff is left for redelivery; what is done is
committed and the client closed, leaving the group.

Claims older than ``inbox_retention_s`` (7 days) are purged hourly; a redelivery later than that
would run again, so keep it above the longest possible redelivery delay.

Other brokers (``amqp://``, ``nats://``, ``redis://`` sources) have no offsets: the same handler,
inbox, retry and dead-letter rules run over a :class:`~zeroloss.brokers.subscription.Subscription`
(ack each message after its inbox commit; see that module), and ``config`` holds the
subscription's options (e.g. ``ack_wait_s`` for NATS, ``claim_idle_s`` for Redis, ``prefetch`` for
RabbitMQ). Transactions (``transactional=True``) are Kafka's alone.

With ``inbox=None`` there is no dedup (at-least-once) and ``tx`` is None. With
``transactional=True`` (and no inbox) the handler only produces to Kafka, through ``tx.send``, and
outputs, dead letters and offsets commit in one Kafka transaction per batch: see
:mod:`zeroloss.kafka_txn`.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy.exc import DBAPIError

from zeroloss import metrics
from zeroloss.backoff import backoff_s
from zeroloss.brokers.kafka import _kafka, ensure_topics, parse_bootstrap
from zeroloss.dlq import DLQ_SUFFIX, DeadLetterPublisher, dead_letter
from zeroloss.errors import (
    BrokerError,
    ConfigError,
    MalformedMessageError,
    MessageError,
    StoreError,
    TransactionLostError,
)
from zeroloss.http import HealthServer
from zeroloss.inbox import BatchInbox, Inbox, id_problem, open_inbox, transaction_aborted
from zeroloss.kafka_txn import KafkaTransactions, Outbound, TxnAborted
from zeroloss.message import Message, id_time, validate_topic
from zeroloss.received import Handler, PoisonMessage, Received, from_record, position, record_headers
from zeroloss.registry import scheme_of
from zeroloss.retry_topics import Origin, check_delays, origin, retry_copy, retry_pattern, retry_topic

__all__ = ["Consumer", "ConsumerCounters", "Handler", "PoisonMessage", "Received", "consumer_config"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ConsumerCounters:
    processed: int = 0
    duplicates: int = 0
    retries: int = 0
    dead_lettered: int = 0
    store_errors: int = 0
    commits: int = 0
    commit_failures: int = 0
    rebalances: int = 0
    assignments: int = 0


class TransactionAborted(Exception):
    """A handler left its inbox transaction failed: it counts as the handler's failure."""


class _RunAgain(Exception):
    """A handler in a shared transaction raised: roll back, and run the messages before it again."""


class _HandlerFailed(Exception):
    def __init__(self, exc: Exception) -> None:
        super().__init__(str(exc))
        self.exc = exc


def consumer_config(bootstrap: str, group: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The librdkafka consumer settings zeroloss needs, plus the caller's."""
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 1000,
        "partition.assignment.strategy": "range,roundrobin",
        "isolation.level": "read_committed",
        # A consumer often starts before the relay has created its topic. librdkafka then treats
        # the topic as missing until its next full metadata refresh (5 minutes by default): in
        # the chaos suite a group member that joined that way took over nothing when the other
        # was killed. 10 s bounds that wait and costs next to nothing.
        "topic.metadata.refresh.interval.ms": 10_000,
        "logger": logging.getLogger("zeroloss.librdkafka"),
    }
    conf.update(extra or {})
    if str(conf["enable.auto.commit"]).lower() not in ("false", "0"):
        raise ConfigError("enable.auto.commit would commit offsets of unfinished messages; zeroloss needs false")
    if "cooperative" in str(conf["partition.assignment.strategy"]):
        raise ConfigError("cooperative-sticky assignment is not supported; use range or roundrobin")
    return conf


LAG_EVERY_S = 5.0
RUN_BUDGET_S = 2.0  # about how long one shared inbox transaction may stay open




def _created(msg: Received) -> float:
    """When the message was made: the time in its UUIDv7 id, else the record's timestamp."""
    try:
        if len(msg.id) == 36 and uuid.UUID(msg.id).version == 7:
            return id_time(msg.id)
    except ValueError:
        pass
    return msg.timestamp_ms / 1000


def _is_outage(exc: BaseException) -> bool:
    """A failure of the infrastructure rather than of the message: do not spend an attempt."""
    if isinstance(exc, StoreError):
        return exc.retriable
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


class Consumer:
    def __init__(
        self,
        source: str,
        group: str,
        topics: Iterable[str],
        inbox: str | Inbox | None,
        *,
        config: dict[str, Any] | None = None,
        max_attempts: int = 5,
        backoff_base_s: float = 0.2,
        max_backoff_s: float = 30.0,
        batch_size: int = 500,
        poll_s: float = 0.2,
        dlq_suffix: str = DLQ_SUFFIX,
        dlq_config: dict[str, Any] | None = None,
        transactional: bool = False,
        transactional_id: str | None = None,
        inbox_retention_s: float | None = 7 * 86400.0,
        purge_every_s: float = 3600.0,
        metrics_port: int | None = None,
        retry_delays_s: Sequence[float] = (),
        transaction_batch: int = 100,
    ) -> None:
        self.url = source
        self._kafka_mode = scheme_of(source) == "kafka"
        self._ck: Any = _kafka() if self._kafka_mode else None
        self.topics = list(topics)
        if not self.topics:
            raise ConfigError("a consumer needs at least one topic")
        if (why := id_problem(group)) is not None:  # else every claim would fail: all dead-lettered
            raise ConfigError(f"the group name {group!r:.80} {why}")
        if max_attempts < 1:
            raise ConfigError(f"max_attempts must be at least 1, got {max_attempts}")
        self.group = group
        if self._kafka_mode:
            self.conf = consumer_config(parse_bootstrap(source), group, config)
        else:  # RabbitMQ, NATS, Redis: `config` holds the subscription's options
            from zeroloss.brokers.subscription import SUBSCRIPTION_SCHEMES

            if scheme_of(source) not in SUBSCRIPTION_SCHEMES:
                raise ConfigError(f"cannot consume from {source!r}: use kafka://, {', '.join(SUBSCRIPTION_SCHEMES)}")
            if transactional:
                raise ConfigError("transactional=True is for Kafka sources only")
            if retry_delays_s:
                raise ConfigError("retry_delays_s (retry topics) is for Kafka sources only; other brokers "
                                  "retry in place (RabbitMQ, NATS and Redis redeliver by themselves)")
            self.conf = dict(config or {})
        self.inbox: Inbox | None = open_inbox(inbox) if isinstance(inbox, str) else inbox
        self._owns_inbox = isinstance(inbox, str)
        if transaction_batch < 1:
            raise ConfigError(f"transaction_batch must be at least 1, got {transaction_batch}")
        # Up to this many messages share one inbox transaction and one bulk claim: one commit (one
        # fsync) per run instead of per message. Inboxes that cannot (Redis): 1.
        self.transaction_batch = transaction_batch if isinstance(self.inbox, BatchInbox) else 1
        self.max_attempts = max_attempts
        # Non-blocking retries: one delay topic per entry (<topic>.retry.1 …), read by this consumer too.
        self.retry_delays_s = check_delays(retry_delays_s)
        self._retry_topics = [
            retry_topic(t, n) for t in self.topics for n in range(1, len(self.retry_delays_s) + 1)
        ]
        self._subscribed = self.topics + [retry_pattern(t) for t in self.topics if self.retry_delays_s]
        self._paused: dict[tuple[str, int], float] = {}  # retry partition → when its head copy is due
        self._retry_topics_ready = False
        self.backoff_base_s = backoff_base_s
        self.max_backoff_s = max_backoff_s
        self.batch_size = batch_size
        self.poll_s = poll_s
        self.dlq_suffix = dlq_suffix
        self.inbox_retention_s = inbox_retention_s  # keep it above the longest redelivery delay
        self.purge_every_s = purge_every_s
        self._next_purge = 0.0
        self._dlq = DeadLetterPublisher(source, config=dlq_config)  # Kafka only; makes nothing until used
        self._txn: KafkaTransactions | None = None
        if transactional:
            if self.inbox is not None:
                raise ConfigError("transactional=True is for handlers that only produce to Kafka: pass inbox=None")
            tid = transactional_id or f"zeroloss-{group}-{uuid.uuid4().hex[:12]}"
            self._txn = KafkaTransactions(source, tid, config=dlq_config)
        self._handler: Handler | None = None
        self._client: Any = None
        self._stop = threading.Event()
        self._done: dict[tuple[str, int], int] = {}  # (topic, partition) → next offset to commit
        self._assignment: set[tuple[str, int]] = set()
        self._assigned = False  # has the current client received its first assignment?
        self._last_activity = 0.0
        self._next_lag = 0.0
        self._handler_s = 0.0  # moving average of one handler call, for the shared transactions' size
        self.counters = ConsumerCounters()
        # /metrics, /healthz, and /readyz (ready once the group gave this consumer its partitions).
        self.health: HealthServer | None = None
        if metrics_port is not None:
            self.health = HealthServer(metrics_port, ready=self._readiness).start()

    def _finished(self, topic: str, outcome: str, msg: Received | None = None, started: float | None = None) -> None:
        """Count a message's outcome here and in Prometheus (one vocabulary for both); for a
        handled ``msg``, how long its handling took since ``started`` and how old it is."""
        field_name = {"processed": "processed", "duplicate": "duplicates", "retry": "retries",
                      "dead_lettered": "dead_lettered"}[outcome]
        setattr(self.counters, field_name, getattr(self.counters, field_name) + 1)
        seconds = None if started is None else time.monotonic() - started
        age = None if msg is None or outcome != "processed" else time.time() - _created(msg)
        metrics.consumer_processed(self.group, topic, outcome, seconds, age)

    def _report_lag(self) -> None:
        """Lag per owned partition from the high watermark of the last fetch (no broker round
        trip; Tansu answers a live watermark query wrongly, its fetch responses rightly)."""
        if time.monotonic() < self._next_lag or self._client is None or not self._assignment:
            return
        self._next_lag = time.monotonic() + LAG_EVERY_S
        tps = [self._ck.TopicPartition(t, p) for t, p in sorted(self._assignment)]
        try:
            for tp in self._client.position(tps):
                _, high = self._client.get_watermark_offsets(tp, cached=True)
                # a seek (a paused retry partition) leaves no position: count from what is done
                at = tp.offset if tp.offset >= 0 else self._done.get((tp.topic, tp.partition), -1)
                if high >= 0 and at >= 0:
                    metrics.consumer_lag(self.group, tp.topic, tp.partition, high - at)
        except self._ck.KafkaException as exc:  # metrics never stop consuming
            log.debug("consumer lag unavailable: %s", exc)

    def handler(self, fn: Handler) -> Handler:
        """Decorator: register the function called as ``fn(msg, tx)`` for every message."""
        if self._handler is not None:
            raise ConfigError("this consumer already has a handler")
        self._handler = fn
        return fn

    # -- running ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Finish the message in flight, commit, leave the group (safe from any thread, and from
        a signal handler). A stopped consumer stays stopped: ``run*`` return at once."""
        self._stop.set()

    @property
    def assigned(self) -> set[tuple[str, int]]:
        return set(self._assignment)

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

        def finished() -> bool:
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                raise TimeoutError(f"consumer not idle within {timeout_s}s (assigned: {self._assigned})")
            # a copy waiting on a retry topic is work still to do, however quiet the topics are
            return self._assigned and not self._paused and time.monotonic() - self._last_activity >= idle_s

        self._loop(finished)

    def _readiness(self) -> tuple[bool, str]:
        if self._stop.is_set():
            return False, "stopping"
        return (True, "assigned") if self._assigned else (False, "waiting for a partition assignment")

    def close(self) -> None:
        """Release the dead-letter producer, the metrics server and an inbox this consumer opened
        from a URL."""
        if self.health is not None:
            self.health.close()
            self.health = None
        self._dlq.close()
        if self._owns_inbox and self.inbox is not None:
            self.inbox.close()

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

    def _loop(self, finished: Callable[[], bool]) -> None:
        if self._handler is None:
            raise ConfigError("register a handler with @consumer.handler before running")
        if not self._kafka_mode:
            from zeroloss.brokers import subscription

            subscription.run(
                self, lambda: subscription.open_subscription(self.url, self.group, self.topics, **self.conf), finished
            )
            log.info("consumer %s stopped: %s", self.group, self.counters)
            return
        self._open()
        try:
            while not self._stop.is_set() and not finished():
                self._resume_due()
                self._report_lag()
                batch = self._fetch()
                try:
                    self._records(batch)
                    committed = self._commit()
                except TxnAborted:  # a produce into the transaction failed: it was aborted
                    self._done.clear()
                    committed = False
                if not committed:
                    self._rewind()
                if batch:  # idle time counts from the end of the last batch's work
                    self._last_activity = time.monotonic()
                self._purge()
        finally:
            self._shutdown()

    def _fetch(self) -> list[Any]:
        """Wake at the first message, then take what is already queued. consume() alone waits
        until its batch is full or its timeout passes: at low rates every message would wait up
        to ``poll_s``."""
        first = self._client.poll(self.poll_s)
        if first is None:
            return []
        return [first, *self._client.consume(self.batch_size - 1, 0)] if self.batch_size > 1 else [first]

    def _purge(self) -> None:
        if self.inbox is None or self.inbox_retention_s is None or time.monotonic() < self._next_purge:
            return
        self._next_purge = time.monotonic() + self.purge_every_s
        try:
            if n := self.inbox.purge(self.inbox_retention_s):
                log.info("inbox: forgot %d claims older than %.0fs", n, self.inbox_retention_s)
        except Exception as exc:  # retention is housekeeping: never stop consuming for it
            log.warning("inbox purge failed: %s", exc)

    def _open(self) -> None:
        self._done.clear()
        self._assignment.clear()
        self._paused.clear()
        self._assigned = False
        if self.retry_delays_s and not self._retry_topics_ready:
            self._create_retry_topics()
        self._client = self._ck.Consumer(self.conf)
        self._client.subscribe(
            self._subscribed, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )

    def _create_retry_topics(self) -> None:
        """Create the delay topics up front, like the originals' partition counts: a consumer
        subscribed to a topic that does not exist would only see it after a metadata refresh."""
        try:
            for t in self.topics:
                retries = [x for x in self._retry_topics if x.startswith(t + ".retry.")]
                if created := ensure_topics(self.url, retries, like=t):
                    log.info("consumer %s created retry topics %s", self.group, created)
            self._retry_topics_ready = True
        except BrokerError as exc:  # the first copy's publish creates them if the broker auto-creates
            log.warning("consumer %s: %s", self.group, exc)

    def _shutdown(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            self._commit(client)
        finally:
            client.close()  # leaves the group; on_revoke runs (and finds nothing left to commit)
            self._dlq.close()
            if self._txn is not None:
                self._txn.close()
            log.info("consumer %s stopped: %s", self.group, self.counters)

    # -- rebalancing and commits --------------------------------------------------------------

    def _on_assign(self, client: Any, partitions: list[Any]) -> None:
        for tp in partitions:
            self._done.pop((tp.topic, tp.partition), None)
        self._assignment = {(tp.topic, tp.partition) for tp in partitions}
        self._assigned = True
        self.counters.assignments += 1
        self._last_activity = time.monotonic()
        log.info("consumer %s assigned %s", self.group, sorted(self._assignment))

    def _on_revoke(self, client: Any, partitions: list[Any]) -> None:
        self.counters.rebalances += 1
        self._commit(client)  # nothing is in flight: callbacks only run inside consume()/close()
        self._forget(partitions, client)

    def _on_lost(self, client: Any, partitions: list[Any]) -> None:
        self.counters.rebalances += 1
        log.warning("consumer %s lost %d partitions (session expired); their done offsets are dropped",
                    self.group, len(partitions))
        self._forget(partitions, client)

    def _forget(self, partitions: list[Any], client: Any) -> None:
        paused = [tp for tp in partitions if self._paused.pop((tp.topic, tp.partition), None) is not None]
        if paused:  # librdkafka keeps a partition's pause across assignments: undo ours while we own it
            client.resume(paused)
        for tp in partitions:
            self._done.pop((tp.topic, tp.partition), None)
            self._assignment.discard((tp.topic, tp.partition))
            metrics.consumer_lag_forget(self.group, tp.topic, tp.partition)

    def _resume_due(self) -> None:
        now = time.time()
        due = [tp for tp, at in self._paused.items() if at <= now]
        if due:
            for tp in due:
                del self._paused[tp]
            self._client.resume([self._ck.TopicPartition(t, p) for t, p in due])

    def _wait_for_due(self, rec: Any, tp: tuple[str, int], due_s: float) -> None:
        """Leave a retry copy that is not yet due where it is: pause its partition and rewind to
        it, so it is fetched again once resumed (the records after it are due later still)."""
        self._paused[tp] = due_s
        part = self._ck.TopicPartition(tp[0], tp[1], rec.offset())
        self._client.pause([part])
        self._client.seek(part)

    def _commit(self, client: Any = None) -> bool:
        """Commit the done offsets synchronously; on failure keep them for the next try (a
        revoke or loss drops them; committing a finished message late is always safe). In
        transactional mode commit the transaction; False if it was aborted (caller rewinds)."""
        client = client or self._client
        if client is None or not (self._done or (self._txn is not None and self._txn.open)):
            return True
        offsets = [self._ck.TopicPartition(t, p, o) for (t, p), o in self._done.items()]
        if self._txn is not None:
            self._done.clear()
            try:
                self._txn.commit(offsets, client.consumer_group_metadata())
            except TxnAborted:
                return False
            self.counters.commits += 1
            return True
        try:
            result = client.commit(offsets=offsets, asynchronous=False)
        except self._ck.KafkaException as exc:
            self.counters.commit_failures += 1
            log.warning("offset commit failed (%s); will try again", exc.args[0])
            return True
        for tp in result or offsets:
            key = (tp.topic, tp.partition)
            if tp.error is None:
                if self._done.get(key) == tp.offset:
                    del self._done[key]
            else:
                self.counters.commit_failures += 1
                log.warning("offset commit for %s/%d failed: %s", tp.topic, tp.partition, tp.error)
        self.counters.commits += 1
        return True

    def _rewind(self) -> None:
        """After an aborted transaction: back to the committed offset of every assigned partition."""
        ck, tps = self._ck, [self._ck.TopicPartition(t, p) for t, p in sorted(self._assignment)]
        try:
            for tp in self._client.committed(tps, timeout=30) if tps else []:
                offset = tp.offset if tp.offset >= 0 else ck.OFFSET_BEGINNING
                self._client.seek(ck.TopicPartition(tp.topic, tp.partition, offset))
        except ck.KafkaException as exc:  # leave the group; a restart resumes at the committed offsets
            raise BrokerError(f"cannot rewind after an aborted transaction: {exc}") from exc

    # -- one message ---------------------------------------------------------------------------

    def _records(self, batch: list[Any]) -> None:
        """Handle a consume() batch in order: runs of plain messages share one inbox transaction
        (:meth:`_together`); anything else — a failure, poison, a retry copy not yet due, a
        broker error, a commit that failed — goes one at a time through :meth:`_record`."""
        i = 0
        while i < len(batch) and not self._stop.is_set():
            if self.transaction_batch > 1:
                j, failure, committed, careful = self._together(batch, i)
                if not committed:  # none of batch[i:j] happened: each again on its own
                    for rec in batch[i:j]:
                        if self._stop.is_set() or not self._record(rec):
                            return
                    i = j
                    continue
                i = j
                if i >= len(batch) or not careful:  # a full run ended: the next one starts here
                    continue
            else:
                failure = None
            if not self._record(batch[i], failure):
                return
            i += 1

    def _run_limit(self) -> int:
        """Messages per shared transaction: ``transaction_batch``, fewer when handlers are slow,
        so a transaction stays open about RUN_BUDGET_S at most — not long enough to meet the
        inbox's idle-in-transaction timeout or to hold its row locks for long."""
        if self._handler_s <= 0:
            return self.transaction_batch
        return max(1, min(self.transaction_batch, int(RUN_BUDGET_S / self._handler_s)))

    def _plain_run(self, batch: list[Any], start: int) -> tuple[list[tuple[int, Any, Received]], int, bool]:
        """The messages from ``start`` on that can share a transaction — (index, record, message),
        at most :meth:`_run_limit` — the index where the run stops (the first record that needs
        care: a broker error, an undecodable id, a retry copy; or the end of the batch), and
        whether it stopped because it was full. Records of partitions this consumer no longer
        reads are passed over, as :meth:`_record` does."""
        run: list[tuple[int, Any, Received]] = []
        stages = len(self.retry_delays_s)
        limit = self._run_limit()
        j = start
        while j < len(batch) and len(run) < limit:
            rec = batch[j]
            if rec.error() is not None:
                break
            tp = (rec.topic(), rec.partition())
            if tp not in self._assignment or tp in self._paused:
                j += 1
                continue
            if stages:
                at = origin(rec.topic(), rec.partition(), rec.offset(), record_headers(rec), stages)
                if at.attempts or at.not_before_ms:
                    break
            try:
                run.append((j, rec, from_record(rec)))
            except MessageError:
                break
            j += 1
        return run, j, len(run) >= limit

    def _together(self, batch: list[Any], start: int) -> tuple[int, Exception | None, bool, bool]:
        """Run the plain messages from ``start`` on in one inbox transaction
        (:meth:`_shared_transaction`). Returns (index of the first record not done, the exception
        its handler raised if that is why, True, whether that record needs the one-at-a-time
        path — not so when the run merely filled up). If the transaction itself failed: the end
        of the range it covered and False — none of it happened, take each again on its own."""
        run, stop, full = self._plain_run(batch, start)
        if not run:
            return stop, None, True, not full
        result = self._shared_transaction([m for _, _, m in run])
        if result is None:
            return run[-1][0] + 1, None, False, True
        outcomes, failure = result
        for (_, rec, msg), (was_fresh, began) in zip(run, outcomes, strict=False):
            self._done[(rec.topic(), rec.partition())] = rec.offset() + 1
            self._finished(msg.topic, "processed" if was_fresh else "duplicate", msg, began)
            if not was_fresh:
                log.debug("message %s: duplicate, skipped", msg.id)
        if failure is not None:
            return run[len(outcomes)][0], failure, True, True
        return stop, None, True, not full

    def _shared_transaction(self, msgs: list[Received]) -> tuple[list[tuple[bool, float]], Exception | None] | None:
        """One inbox transaction for ``msgs``: one bulk claim, the handlers of the fresh ones, one
        commit. Returns, for the messages that committed (a prefix of ``msgs``), (fresh, when its
        handling began), and the exception of the message after them if its handler raised. A
        handler that raises rolls the whole transaction back; the messages before it run again in
        a new one (their effects were undone with it) and the failed one counts that run as its
        first attempt. None if the transaction itself failed (the database went away, the commit
        failed): none of it happened. Shared by the Kafka and the subscription paths."""
        assert isinstance(self.inbox, BatchInbox)
        failure: Exception | None = None
        outcomes: list[tuple[bool, float]] = []
        while msgs:
            started = time.monotonic()
            outcomes = []
            try:
                with self.inbox.transaction() as tx:
                    fresh = self.inbox.claim_many(tx, self.group, [m.id for m in msgs])
                    for n, msg in enumerate(msgs):
                        if msg.id not in fresh:
                            outcomes.append((False, started))
                            continue
                        fresh.discard(msg.id)  # the same id twice in one run: the second is a duplicate
                        began = time.monotonic()
                        try:
                            self._call(msg, tx)
                        except _HandlerFailed as failed:
                            if _is_outage(failed.exc):
                                raise
                            failure, msgs = failed.exc, msgs[:n]
                            raise _RunAgain() from None
                        outcomes.append((True, began))
                        self._handler_s = 0.9 * self._handler_s + 0.1 * (time.monotonic() - began)
            except _RunAgain:
                continue
            except TxnAborted:
                raise
            except TransactionLostError as exc:  # a handler caught a deadlock: which one? each alone says
                log.warning("consumer %s: a transaction of %d messages was lost under its handlers (%s); "
                            "taking them one by one", self.group, len(msgs), exc)
                return None
            except Exception as exc:  # StoreError, a lost connection: nothing in the run happened
                self.counters.store_errors += 1
                log.warning("consumer %s: a transaction of %d messages failed (%s); taking them one by one",
                            self.group, len(msgs), exc)
                return None
            break
        return (outcomes if msgs else []), failure

    def _record(self, rec: Any, failure: Exception | None = None) -> bool:
        """Handle one record from consume(); False when the batch must stop here (stopping).
        ``failure``: its handler already raised this once, in a shared transaction."""
        err = rec.error()
        if err is not None:
            if err.fatal():
                raise BrokerError(f"fatal Kafka consumer error: {err.name()}: {err.str()}", retriable=False)
            log.warning("consumer %s: %s", self.group, err.str())
            return True
        tp = (rec.topic(), rec.partition())
        if tp not in self._assignment or tp in self._paused:  # revoked (its new owner has it), or rewound
            return True
        at = origin(rec.topic(), rec.partition(), rec.offset(), record_headers(rec), len(self.retry_delays_s))
        if at.group not in (None, self.group):  # another group's retry copy: theirs to handle
            self._done[tp] = rec.offset() + 1
            return True
        if at.not_before_ms > time.time() * 1000:
            self._wait_for_due(rec, tp, at.not_before_ms / 1000)
            return True
        if not self._handle(rec, at, failure):
            return False
        self._done[tp] = rec.offset() + 1
        return True

    def _handle(self, rec: Any, at: Origin, failure: Exception | None = None) -> bool:
        """Process one record to the end: True once it succeeded, was a duplicate, was passed
        on to a retry topic or was dead-lettered; False if stopping interrupted a backoff (it
        will be redelivered)."""
        try:
            msg = from_record(rec)
        except MessageError as exc:
            return self._dead_letter(rec, position(rec), exc, at.attempts, at.first_failure or time.time(), at)
        attempts, outages = at.attempts, 0
        first_failure = at.first_failure
        while True:
            error: Exception
            if failure is not None:  # the first attempt already ran, in a shared transaction
                error, faulty, failure = failure, True, None
            else:
                started = time.monotonic()
                try:
                    fresh = self._attempt(replace(msg, attempts=attempts + 1))
                except TxnAborted:
                    raise
                except _HandlerFailed as failed:
                    error, faulty = failed.exc, not _is_outage(failed.exc)
                except MessageError as exc:  # the inbox refused the id itself
                    return self._dead_letter(rec, msg.id, exc, attempts, first_failure or time.time(), at)
                except Exception as exc:  # the inbox failed (StoreError, or anything unexpected from it)
                    error, faulty = exc, False
                else:
                    self._finished(msg.topic, "processed" if fresh else "duplicate", msg, started)
                    if not fresh:
                        log.debug("message %s: duplicate, skipped", msg.id)
                    return True
            if faulty:
                attempts += 1
                first_failure = first_failure or time.time()
                poison = isinstance(error, (MessageError, MalformedMessageError))
                if not poison and self.retry_delays_s and at.stage < len(self.retry_delays_s):
                    return self._retry_later(rec, msg, error, attempts, first_failure, at)
                if poison or self.retry_delays_s or attempts >= self.max_attempts:
                    return self._dead_letter(rec, msg.id, error, attempts, first_failure, at)
                self._finished(msg.topic, "retry")
                delay = backoff_s(attempts, self.backoff_base_s, self.max_backoff_s)
                log.warning("message %s failed (attempt %d of %d): %r; again in %.2fs",
                            msg.id, attempts, self.max_attempts, error, delay)
            else:  # nobody's fault: no attempt spent
                outages += 1
                self.counters.store_errors += 1
                delay = backoff_s(outages, self.backoff_base_s, self.max_backoff_s)
                log.error("message %s: the inbox's store failed (%s); again in %.1fs", msg.id, error, delay)
            if not self._commit():  # what is done is kept, whatever the backoff ends in
                self._rewind()
                return False
            if self._stop.wait(delay):
                log.info("stopping: message %s left for redelivery", msg.id)
                return False

    def _attempt(self, msg: Received) -> bool:
        """One try in one transaction; True if the handler ran, False for a duplicate."""
        if self._txn is not None:
            out = Outbound(msg.id, msg.timestamp_ms)
            self._call(msg, out)
            self._txn.add(out.messages)
            return True
        if self.inbox is None:
            self._call(msg, None)
            return True
        try:
            with self.inbox.transaction() as tx:
                if not self.inbox.claim(tx, self.group, msg.id):
                    return False
                self._call(msg, tx)
        except TransactionLostError as exc:  # the handler caught the error that ended it
            raise _HandlerFailed(exc) from exc
        return True

    def _call(self, msg: Received, tx: Any) -> None:
        assert self._handler is not None
        try:
            self._handler(msg, tx)
        except Exception as exc:
            raise _HandlerFailed(exc) from exc
        if transaction_aborted(tx):
            raise _HandlerFailed(TransactionAborted(
                "the handler returned after a database error it caught: its transaction is aborted and "
                "would commit nothing; let the error propagate, or wrap the statement in tx.begin_nested()"))

    def _send(self, out: Message, *, raise_rejected: bool = False) -> str | None:
        """Hand a dead letter or retry copy to the broker before its source offset may be committed:
        into the batch's transaction, or published and acknowledged (None: stopping interrupted it)."""
        if self._txn is not None:
            self._txn.add([out])  # commits with the batch's offsets, or is redone after an abort
            return out.topic
        return self._dlq.deliver(out, self._stop, self.backoff_base_s, self.max_backoff_s,
                                 raise_rejected=raise_rejected)

    def _retry_later(self, rec: Any, msg: Received, error: Exception, attempts: int, first_failure: float,
                     at: Origin) -> bool:
        delay = self.retry_delays_s[at.stage]
        copy = retry_copy(message_id=msg.id, key=rec.key(), value=rec.value(), headers=record_headers(rec), at=at,
                          group=self.group, attempts=attempts, first_failure=first_failure, error=error,
                          delay_s=delay, now=time.time())
        try:
            validate_topic(copy.topic)  # e.g. too long: the original's name left no room for ".retry.N"
            if self._send(copy, raise_rejected=True) is None:
                return False
        except (MessageError, BrokerError) as exc:  # refused for good (too long a name, too large)
            log.error("message %s: the broker refused its retry copy (%s); dead-lettering it", msg.id, exc)
            return self._dead_letter(rec, msg.id, error, attempts, first_failure, at)
        self._finished(rec.topic(), "retry")
        log.warning("message %s failed (attempt %d of %d): %r; to %s, due in %.2fs",
                    msg.id, attempts, len(self.retry_delays_s) + 1, error, copy.topic, delay)
        return True

    def _dead_letter(self, rec: Any, mid: str, exc: BaseException, attempts: int, first_failure: float,
                     at: Origin) -> bool:
        """Dead-letter the record under its original topic, partition and offset (a retry copy's
        origin); True once delivered, False if stopping interrupted the wait."""
        letter = dead_letter(
            message_id=mid, topic=at.topic, partition=at.partition, offset=at.offset, key=rec.key(),
            value=rec.value(), headers=record_headers(rec), error=exc, attempts=attempts, first_failure=first_failure,
            suffix=self.dlq_suffix,
        )
        where = self._send(letter)
        if where is None:
            return False
        self._finished(rec.topic(), "dead_lettered")
        log.error("message %s dead-lettered to %s after %d attempts: %s: %s",
                  mid, where, attempts, type(exc).__name__, exc)
        return True
