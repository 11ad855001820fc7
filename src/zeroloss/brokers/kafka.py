"""Kafka adapter, publishing side (confluent-kafka / librdkafka): idempotent, transactional, acks=all;
one broker transaction per batch, and a message is DELIVERED only after ``commit_transaction``
returned. Without a transactional id a batch goes in per-key waves. Also Kafka's TopicAdmin.
The client library, its settings and error names are :mod:`zeroloss.brokers.kafka_client`.
(Over 400 lines: the transactional producer and its error handling, whose cases only make sense
read together.) The error classes, waves and declaring: docs/design.md, "brokers/kafka.py"."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

from zeroloss.brokers._batch import HELD_REASON, waves
from zeroloss.brokers.base import Declared, Outcome, Status, TopicSpec, with_dead_letters
from zeroloss.brokers.kafka_client import (
    ADMIN_CONFIG_ERRORS,
    BROKER_WIDE_ERRORS,
    LIBRDKAFKA_LOG,
    PERMANENT_ERRORS,
    SIZE_ERRORS,
    TRANSACTION_LOG,
    UNANSWERED,
    RepeatFilter,
    admin_module,
    ensure_topics,
    kafka_module,
    parse_bootstrap,
    producer_config,
)
from zeroloss.errors import BrokerError, ConfigError
from zeroloss.message import ID_HEADER, Message

log = logging.getLogger(__name__)

# Re-exported: they lived here before kafka_client.py, and applications may import them from here.
__all__ = [
    "ADMIN_CONFIG_ERRORS",
    "BROKER_WIDE_ERRORS",
    "LIBRDKAFKA_LOG",
    "PERMANENT_ERRORS",
    "TRANSACTION_LOG",
    "KafkaBroker",
    "RepeatFilter",
    "admin_module",
    "ensure_topics",
    "kafka_module",
    "parse_bootstrap",
    "producer_config",
]


class KafkaBroker:
    """Publishes batches to Kafka, one transaction per batch (or idempotent-only when
    ``transactional_id`` is None)."""

    def __init__(
        self,
        url: str,
        *,
        transactional_id: str | None = None,
        timeout_s: float = 30.0,
        config: dict[str, Any] | None = None,
    ) -> None:
        self._ck = kafka_module()
        self.bootstrap = parse_bootstrap(url)
        self.transactional_id = transactional_id
        self.timeout_s = timeout_s
        self._conf = producer_config(self.bootstrap, transactional_id, timeout_s, config)
        self._producer: Any = None
        self._interrupted = threading.Event()
        self.producers_created = 0  # how often we had to (re)create the client; tests read it

    # -- producer lifecycle -------------------------------------------------------------

    def prepare(self) -> None:
        """Make the producer now rather than at the first publish. With a transactional id this
        fences a crashed predecessor's open transaction at once: until then ``read_committed``
        consumers cannot read past it, and a broker that ignores ``transaction.timeout.ms`` (Tansu)
        never aborts it by itself. BrokerError if the broker cannot be reached."""
        self._ensure_producer()

    def interrupt(self) -> None:
        self._interrupted.set()

    def _check_interrupted(self) -> None:
        if self._interrupted.is_set():
            raise BrokerError(f"Kafka at {self.bootstrap}: interrupted, the relay is stopping")

    def _slices(self) -> Iterator[float]:
        """Up to ``timeout_s`` in slices of at most 0.5 s, so a blocking client call can be left
        between two of them when :meth:`interrupt` is called; BrokerError then."""
        deadline = time.monotonic() + self.timeout_s
        while (left := deadline - time.monotonic()) > 0:
            self._check_interrupted()
            yield min(0.5, left)

    def _ensure_producer(self, topics: Sequence[str] = ()) -> Any:
        if self._producer is not None:
            return self._producer
        self._check_interrupted()
        producer = self._ck.Producer(self._conf)
        if self.transactional_id:
            try:
                self._init_transactions(producer)
            except BrokerError:
                self._discard(producer)
                raise
            except self._ck.KafkaException as exc:
                # CONCURRENT_TRANSACTIONS here usually means the coordinator cannot finish the
                # previous transaction: say what starves it (the batch's partitions or its own log).
                why = self._why_stuck(producer, {*topics, TRANSACTION_LOG})
                self._discard(producer)
                raise BrokerError(f"cannot initialise Kafka transactions at {self.bootstrap}: {exc}{why}") from exc
        self._producer = producer
        self.producers_created += 1
        return producer

    def _init_transactions(self, producer: Any) -> None:
        """``init_transactions`` in slices: librdkafka allows calling it again after a timeout."""
        last: Any = None
        for wait in self._slices():
            try:
                producer.init_transactions(wait)
                return
            except self._ck.KafkaException as exc:
                # A slice that ends while librdkafka retries (a timeout, or COORDINATOR_LOAD_IN_
                # PROGRESS right after a broker start) is retriable: call again until the deadline.
                if not exc.args[0].retriable():
                    raise
                last = exc
        self._check_interrupted()
        raise (
            last
            if last is not None
            else self._ck.KafkaException(
                self._ck.KafkaError(self._ck.KafkaError._TIMED_OUT, "init_transactions timed out")
            )
        )

    def _discard(self, producer: Any) -> None:
        """Throw a producer away without waiting for what it still holds: those messages are
        reported back to the relay as not delivered and will be sent again."""
        try:
            producer.purge(in_queue=True, in_flight=True, blocking=False)
            producer.flush(0)
        except Exception:  # a broken client may refuse even this; it is being dropped anyway
            log.debug("purge of a discarded producer failed", exc_info=True)

    def _reset(self, why: str) -> None:
        log.warning("recreating the Kafka producer: %s", why)
        if self._producer is not None:
            self._discard(self._producer)
        self._producer = None

    def close(self) -> None:
        if self._producer is not None:
            if self.transactional_id:
                self._discard(self._producer)
            else:
                self._producer.flush(self.timeout_s)
            self._producer = None

    # -- declaring (TopicAdmin) ---------------------------------------------------------

    def _admin(self) -> Any:
        return admin_module().AdminClient(
            {
                "bootstrap.servers": self.bootstrap,
                "socket.timeout.ms": int(self.timeout_s * 1000),
                "logger": logging.getLogger("zeroloss.librdkafka"),
            }
        )

    def _admin_error(self, exc: Exception, doing: str) -> Exception:
        err = exc.args[0] if exc.args and hasattr(exc.args[0], "name") else None
        if err is not None and err.name() in ADMIN_CONFIG_ERRORS:
            return ConfigError(f"Kafka at {self.bootstrap} refused to {doing}: {err.name()}: {err.str()}")
        why = f"{err.name()}: {err.str()}" if err is not None else f"{type(exc).__name__}: {exc}"
        if err is not None and err.name() in UNANSWERED:  # librdkafka's words name its wait, not the cause
            why += (
                f"; no Kafka broker answered at {self.bootstrap} within {self.timeout_s:g} s: check that it "
                "runs and that this host can reach it (the URL's host and port), then try again"
            )
        return BrokerError(f"Kafka at {self.bootstrap}: cannot {doing}: {why}")

    def declare(self, topics: Sequence[str], spec: TopicSpec | None = None) -> list[Declared]:
        spec = spec or TopicSpec()
        names = with_dead_letters(topics)
        admin = self._admin()
        if spec.replication_factor is not None:  # a broker may accept more and hold fewer copies
            try:
                brokers = len(admin.list_topics(timeout=self.timeout_s).brokers)
            except self._ck.KafkaException as exc:
                raise self._admin_error(exc, "list brokers") from exc
            if spec.replication_factor > brokers:
                raise ConfigError(
                    f"--replication-factor {spec.replication_factor} is more than the Kafka cluster at "
                    f"{self.bootstrap} can hold: it has {brokers} live broker(s), one copy each"
                )
        new_topic = admin_module().NewTopic
        new = [new_topic(t, spec.partitions or -1, spec.replication_factor or -1) for t in names]
        futures = admin.create_topics(new, request_timeout=self.timeout_s, operation_timeout=self.timeout_s)
        created: set[str] = set()
        for t in names:
            try:
                futures[t].result(self.timeout_s + 5)
                created.add(t)
            except self._ck.KafkaException as exc:
                if exc.args[0].code() != self._ck.KafkaError.TOPIC_ALREADY_EXISTS:
                    raise self._admin_error(exc, f"create topic {t!r}") from exc
        # A topic just created reaches every broker's metadata a moment later: until then it
        # would be reported with 0 partitions. Wait (bounded) until each one shows its partitions.
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                md = admin.list_topics(timeout=self.timeout_s)
            except self._ck.KafkaException as exc:
                raise self._admin_error(exc, "list topics") from exc
            if all(t in md.topics and md.topics[t].partitions for t in names) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        out = []
        for t in names:
            parts = md.topics[t].partitions if t in md.topics else {}
            rf = len(parts[min(parts)].replicas) if parts else 0
            out.append(
                Declared(
                    "topic",
                    t,
                    "created" if t in created else "exists",
                    f"{len(parts)} partitions, replication factor {rf}",
                )
            )
        if spec.group:
            out.append(
                Declared(
                    "consumer group",
                    spec.group,
                    "nothing needed",
                    "Kafka makes it when its first consumer joins; it starts at the earliest offset",
                )
            )
        return out

    def delete(self, topics: Sequence[str]) -> None:
        names = with_dead_letters(topics)
        admin = self._admin()  # held until the results are in: a collected client fails its futures
        futures = admin.delete_topics(names, request_timeout=self.timeout_s, operation_timeout=self.timeout_s)
        for t in names:
            try:
                futures[t].result(self.timeout_s + 5)
            except self._ck.KafkaException as exc:
                if exc.args[0].code() != self._ck.KafkaError.UNKNOWN_TOPIC_OR_PART:
                    raise self._admin_error(exc, f"delete topic {t!r}") from exc

    # -- publishing ---------------------------------------------------------------------

    def publish(self, messages: Sequence[Message]) -> list[Outcome]:
        outcomes: dict[str, Outcome] = {}
        blocked: set[bytes] = set()  # keys with a failure in this batch: later ones are HELD
        position = {m.id: n for n, m in enumerate(messages)}
        for group in [list(messages)] if self.transactional_id else waves(messages):
            self._publish_part(group, outcomes, blocked, position)
        return [outcomes[m.id] for m in messages]

    def _publish_part(
        self, todo: list[Message], outcomes: dict[str, Outcome], blocked: set[bytes], position: dict[str, int]
    ) -> None:
        """Rounds over ``todo`` until each message has its outcome. Each round delivers what is
        left, settles at least one message, or meets a size error it cannot pin on one message;
        then the rest goes in two halves, the earlier entirely first (key order), down to single
        messages if need be: about 2·log2(n) extra rounds for one big record in n, not n."""
        while todo:
            again, oversized = self._round(todo, outcomes, blocked)
            todo = sorted([*again, *oversized], key=lambda m: position[m.id])
            if oversized:
                half = len(todo) // 2  # >= 1: a round of one message never reports oversized
                self._publish_part(todo[:half], outcomes, blocked, position)
                self._publish_part(todo[half:], outcomes, blocked, position)
                return

    def _round(
        self, todo: list[Message], outcomes: dict[str, Outcome], blocked: set[bytes]
    ) -> tuple[list[Message], list[Message]]:
        """One transaction over ``todo``; returns what must go again in a fresh one, and what
        failed a size check that may be its batch's fault rather than its own."""
        producer = self._ensure_producer([m.topic for m in todo])
        transactional = bool(self.transactional_id)
        reports: dict[str, tuple[Any, str | None]] = {}
        sent: list[Message] = []

        def on_delivery(mid: str, err: Any, msg: Any) -> None:
            reports[mid] = (err, None if err else f"{msg.topic()}/{msg.partition()}/{msg.offset()}")

        def settle(m: Message, status: Status, error: str | None = None) -> None:
            outcomes[m.id] = Outcome(m, status, error=error)
            if status is not Status.DELIVERED and m.key is not None:
                blocked.add(m.key)

        try:
            if transactional:
                producer.begin_transaction()
            for m in todo:
                if m.key is not None and m.key in blocked:
                    settle(m, Status.HELD, HELD_REASON)
                    continue
                err = self._produce(producer, m, on_delivery)
                if err is None:
                    sent.append(m)
                elif err.name() in PERMANENT_ERRORS:
                    # Refused before it entered the queue: the transaction is unharmed.
                    settle(m, Status.REJECTED, f"{err.name()}: {err.str()}")
                else:
                    raise self._ck.KafkaException(err)
            left = -1  # unknown until the first flush says
            for wait in self._slices():
                if (left := producer.flush(wait)) == 0:
                    break
        except BrokerError:  # interrupted: nothing of this batch counts as delivered
            self._reset("interrupted while waiting for acknowledgements")
            raise
        except (self._ck.KafkaException, SystemError) as exc:
            raise self._batch_failed(self._kafka_error(exc), "produce") from exc
        if left:
            why = self._why_stuck(producer, {m.topic for m in sent if m.id not in reports})
            self._reset(f"{left} messages not acknowledged within {self.timeout_s}s")
            raise BrokerError(f"Kafka at {self.bootstrap} made no progress for {self.timeout_s}s{why}")
        if any(m.id not in reports for m in sent):  # flush() returned 0, so this is a client bug
            self._reset("delivery reports missing")
            raise BrokerError("Kafka producer lost delivery reports; the batch will be sent again")

        failed = {mid: err for mid, (err, _) in reports.items() if err is not None}
        if transactional and any(e.name() not in BROKER_WIDE_ERRORS for e in failed.values()):
            # A record's own error failed the transaction, and librdkafka purged the records still
            # queued for other partitions: those are innocent and go again, not an outage.
            failed = {mid: e for mid, e in failed.items() if e.name() != "_PURGE_QUEUE"}
        wide = sorted({e.name() for e in failed.values() if e.name() in BROKER_WIDE_ERRORS})
        if wide:
            if transactional:
                self._abort(producer)
            raise BrokerError(f"Kafka at {self.bootstrap} did not acknowledge the batch: {', '.join(wide)}")
        if not failed:
            if transactional:
                self._commit(producer)
            for m in sent:
                outcomes[m.id] = Outcome(m, Status.DELIVERED, location=reports[m.id][1])
            return [], []

        # Some records failed. In a transaction the whole of it is aborted and the innocent
        # go again; without one, what was acknowledged stays delivered.
        if transactional:
            self._abort(producer)
            # After records failed in a transaction librdkafka's next one can fail with
            # OUT_OF_ORDER_SEQUENCE_NUMBER ("requires epoch bump"); a fresh producer starts clean.
            self._reset("records failed in the aborted transaction")
        again: list[Message] = []
        oversized: list[Message] = []
        for m in sent:
            err = failed.get(m.id)
            if m.key is not None and m.key in blocked and (transactional or err is not None):
                settle(m, Status.HELD, HELD_REASON)
            elif err is not None and err.name() in SIZE_ERRORS and len(sent) > 1:
                oversized.append(m)  # decided when sent alone, before its key's later messages
            elif err is not None:
                status = Status.REJECTED if err.name() in PERMANENT_ERRORS else Status.RETRY
                settle(m, status, f"{err.name()}: {err.str()}")
            elif not transactional:
                outcomes[m.id] = Outcome(m, Status.DELIVERED, location=reports[m.id][1])
            else:
                again.append(m)
        return again, oversized

    def _why_stuck(self, producer: Any, topics: set[str]) -> str:
        """Why records get no acknowledgement, from the cluster's metadata: a partition with no
        leader, or fewer in-sync replicas than ``min.insync.replicas`` (librdkafka retries
        NOT_ENOUGH_REPLICAS silently until the message times out). "" when nothing explains it."""
        wait = min(2.0, self.timeout_s)
        try:
            md = producer.list_topics(timeout=wait)
        except Exception:  # the diagnosis is a courtesy; the outage is reported either way
            return ""
        problems: list[str] = []
        for topic in sorted(topics):
            parts = md.topics[topic].partitions if topic in md.topics else {}
            leaderless = sorted(p for p, m in parts.items() if m.leader < 0)
            if leaderless:
                problems.append(f"{topic} partition(s) {leaderless} have no leader")
            fewest = min((len(m.isrs) for m in parts.values()), default=None)
            if fewest is None or leaderless:
                continue
            try:
                res = admin_module().ConfigResource(admin_module().ConfigResource.Type.TOPIC, topic)
                admin = self._admin()
                conf = admin.describe_configs([res], request_timeout=wait)[res].result(wait)
                min_isr = int(conf["min.insync.replicas"].value)
            except Exception:  # no DescribeConfigs right, or the cluster too sick to answer
                continue
            starved = sorted(p for p, m in parts.items() if len(m.isrs) < min_isr)
            if starved:
                problems.append(
                    f"{topic} partition(s) {starved} have {fewest} in-sync replica(s), below "
                    f"min.insync.replicas={min_isr}: the brokers refuse acks=all writes "
                    "(NOT_ENOUGH_REPLICAS) until a replica is back"
                )
        return f" ({'; '.join(problems)})" if problems else ""

    def _produce(self, producer: Any, m: Message, on_delivery: Any) -> Any:
        headers = [*m.headers, (ID_HEADER, m.id.encode())]
        while True:
            try:
                producer.produce(
                    m.topic, value=m.value, key=m.key, headers=headers, on_delivery=partial(on_delivery, m.id)
                )
                return None
            except BufferError:  # local queue full: let librdkafka drain, then go on
                producer.poll(0.05)
            except self._ck.KafkaException as exc:
                return exc.args[0]

    def _commit(self, producer: Any) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            if self._interrupted.is_set():
                # Not known to be committed: sent again by the next relay, whose id fences this one.
                self._reset("interrupted during commit")
                self._check_interrupted()
            try:
                producer.commit_transaction(min(0.5, max(0.1, deadline - time.monotonic())))
                return
            except (self._ck.KafkaException, SystemError) as exc:
                err = self._kafka_error(exc)
                if err.retriable() and not err.txn_requires_abort() and time.monotonic() < deadline:
                    continue
                raise self._batch_failed(err, "commit") from exc

    def _abort(self, producer: Any) -> None:
        try:
            producer.abort_transaction(self.timeout_s)
        except (self._ck.KafkaException, SystemError) as exc:
            self._kafka_error(exc)  # anything else is a bug: raised as it is
            self._reset(f"abort failed: {exc}")
            raise BrokerError(f"Kafka transaction abort failed at {self.bootstrap}: {exc}") from exc

    def _kafka_error(self, exc: BaseException) -> Any:
        """The KafkaError behind a client call's exception. confluent-kafka raises a *fatal* producer
        error (OUT_OF_ORDER_SEQUENCE_NUMBER after an unclean leader election, say) from inside
        flush()/poll()/commit, and if a delivery report is still to be served it then calls that
        callback with the exception pending: Python raises SystemError, chained to the
        KafkaException. Any other exception is re-raised."""
        cause: BaseException | None = exc
        while cause is not None:
            if isinstance(cause, self._ck.KafkaException) and cause.args:
                return cause.args[0]
            cause = cause.__cause__ or cause.__context__
        raise exc

    def _batch_failed(self, err: Any, during: str) -> BrokerError:
        """A failure of the whole transaction: put the producer right; return the error to raise."""
        if err.txn_requires_abort() and self._producer is not None:
            try:
                self._producer.abort_transaction(self.timeout_s)
            except (self._ck.KafkaException, SystemError):
                self._reset("abort after a failed transaction did not succeed")
        else:
            self._reset(f"{during} failed: {err.name()} (fatal={err.fatal()})")
        return BrokerError(f"Kafka {during} failed at {self.bootstrap}: {err.name()}: {err.str()}")
