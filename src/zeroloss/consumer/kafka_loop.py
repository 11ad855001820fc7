"""The consumer's loop for Kafka: offsets committed only after the work they cover is done.
(Over 400 lines: one client's life — fetch, runs, commits, rebalances, retry-topic pauses — whose
parts share its offsets; split, each would reach into the others' state.)

After each batch the done offsets are committed synchronously, so a commit never covers a
message that has neither succeeded nor been dead-lettered: a partition's done offset only moves
to ``offset + 1`` of the message just finished, and messages finish strictly in partition order.
The details: docs/design.md, "consumer/kafka_loop.py"."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from zeroloss import metrics
from zeroloss.brokers.kafka_client import ensure_topics, kafka_module
from zeroloss.consumer.dead_letters import DeadLetterPublisher, dead_letter, store_letter
from zeroloss.consumer.handling import Handling
from zeroloss.consumer.kafka_txn import TxnAborted
from zeroloss.consumer.retry_topics import Origin, origin, retry_copy, retry_pattern, retry_topic
from zeroloss.errors import BrokerError, ConfigError, MessageError
from zeroloss.logs import brief
from zeroloss.message import Message, validate_topic
from zeroloss.received import Received, from_record, position, record_headers

log = logging.getLogger(__name__)

LAG_EVERY_S = 5.0
TP = tuple[str, int]


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


class _Settle:
    """The Kafka half of one record's handling (see :class:`~zeroloss.consumer.handling.Settlement`)."""

    def __init__(self, loop: KafkaLoop, rec: Any, msg: Received, at: Origin) -> None:
        self.loop, self.rec, self.msg, self.at = loop, rec, msg, at

    def done(self) -> None:
        pass  # the caller marks the offset done

    def dead_letter(self, error: BaseException, attempts: int, first_failure: float) -> bool:
        return self.loop.dead_letter(self.rec, self.msg.id, error, attempts, first_failure, self.at)

    def retry_later(self, error: Exception, attempts: int, first_failure: float) -> bool | None:
        stages = len(self.loop.retry_delays_s)
        if not stages:
            return None
        if self.at.stage < stages:
            return self.loop.retry_later(self.rec, self.msg, error, attempts, first_failure, self.at)
        return self.dead_letter(error, attempts, first_failure)  # every delay topic tried

    def before_backoff(self) -> bool:
        if self.loop.commit():  # what is done is kept, whatever the backoff ends in
            return True
        self.loop.rewind()
        return False

    def after_backoff(self) -> None:
        pass


class KafkaLoop:
    """One Kafka consumer client's life: subscribe, fetch, handle in order, commit, rebalance."""

    def __init__(
        self,
        handling: Handling,
        url: str,
        conf: dict[str, Any],
        topics: Sequence[str],
        *,
        retry_delays_s: Sequence[float],
        batch_size: int,
        poll_s: float,
        dlq_suffix: str,
        dlq: DeadLetterPublisher,
        housekeeping: Callable[[], None],
        counters: Any,
    ) -> None:
        self.h = handling
        self.url = url
        self.conf = conf
        self.topics = list(topics)
        self.retry_delays_s = list(retry_delays_s)
        self.retry_topics = [retry_topic(t, n) for t in self.topics for n in range(1, len(self.retry_delays_s) + 1)]
        self.subscribed = self.topics + [retry_pattern(t) for t in self.topics if self.retry_delays_s]
        self.batch_size = batch_size
        self.poll_s = poll_s
        self.dlq_suffix = dlq_suffix
        self.dlq = dlq
        self.housekeeping = housekeeping
        self.counters = counters
        self._ck = kafka_module()
        self.client: Any = None
        self.done: dict[TP, int] = {}  # (topic, partition) → next offset to commit
        self.assignment: set[TP] = set()
        self.assigned = False  # has the current client received its first assignment?
        self.paused: dict[TP, float] = {}  # retry partition → when its head copy is due
        self.last_activity = 0.0
        self._next_lag = 0.0
        self.lag: int | None = None  # records behind, summed over the owned partitions (progress line)
        self._retry_topics_ready = False

    @property
    def waiting(self) -> bool:
        """A copy waits on a retry topic: work still to do, however quiet the topics are."""
        return bool(self.paused)

    def run(self, finished: Callable[[], bool]) -> None:
        self._open()
        try:
            while not self.h.stop.is_set() and not finished():
                self._resume_due()
                self._report_lag()
                batch = self._fetch()
                try:
                    self._records(batch)
                    committed = self.commit()
                except TxnAborted:  # a produce into the transaction failed: it was aborted
                    self.done.clear()
                    committed = False
                if not committed:
                    self.rewind()
                if batch:  # idle time counts from the end of the last batch's work
                    self.last_activity = time.monotonic()
                self.housekeeping()
        finally:
            self._shutdown()

    def _fetch(self) -> list[Any]:
        """Wake at the first message, then take what is already queued. consume() alone waits
        until its batch is full or its timeout passes: at low rates every message would wait up
        to ``poll_s``."""
        first = self.client.poll(self.poll_s)
        if first is None:
            return []
        return [first, *self.client.consume(self.batch_size - 1, 0)] if self.batch_size > 1 else [first]

    def _open(self) -> None:
        self.done.clear()
        self.assignment.clear()
        self.paused.clear()
        self.assigned = False
        if self.retry_delays_s and not self._retry_topics_ready:
            self._create_retry_topics()
        self.client = self._ck.Consumer(self.conf)
        self.client.subscribe(
            self.subscribed, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )

    def _create_retry_topics(self) -> None:
        """Create the delay topics up front, like the originals' partition counts: a consumer
        subscribed to a topic that does not exist would only see it after a metadata refresh."""
        try:
            for t in self.topics:
                retries = [x for x in self.retry_topics if x.startswith(t + ".retry.")]
                if created := ensure_topics(self.url, retries, like=t):
                    log.info("consumer %s created retry topics %s", self.h.group, created)
            self._retry_topics_ready = True
        except BrokerError as exc:  # the first copy's publish creates them if the broker auto-creates
            log.warning("consumer %s: %s", self.h.group, exc)

    def _shutdown(self) -> None:
        client, self.client = self.client, None
        if client is None:
            return
        try:
            self.commit(client)
        finally:
            client.close()  # leaves the group; on_revoke runs (and finds nothing left to commit)
            self.dlq.close()
            if self.h.txn is not None:
                self.h.txn.close()

    def _report_lag(self) -> None:
        """Lag per owned partition from the high watermark of the last fetch (no broker round
        trip; Tansu answers a live watermark query wrongly, its fetch responses rightly)."""
        if time.monotonic() < self._next_lag or self.client is None or not self.assignment:
            return
        self._next_lag = time.monotonic() + LAG_EVERY_S
        tps = [self._ck.TopicPartition(t, p) for t, p in sorted(self.assignment)]
        try:
            total = 0
            for tp in self.client.position(tps):
                _, high = self.client.get_watermark_offsets(tp, cached=True)
                # a seek (a paused retry partition) leaves no position: count from what is done
                at = tp.offset if tp.offset >= 0 else self.done.get((tp.topic, tp.partition), -1)
                if high >= 0 and at >= 0:
                    metrics.consumer_lag(self.h.group, tp.topic, tp.partition, high - at)
                    total += high - at
            self.lag = total
        except self._ck.KafkaException as exc:  # metrics never stop consuming
            log.debug("consumer lag unavailable: %s", exc)

    # -- rebalancing and commits --------------------------------------------------------------

    def _on_assign(self, client: Any, partitions: list[Any]) -> None:
        for tp in partitions:
            self.done.pop((tp.topic, tp.partition), None)
        self.assignment = {(tp.topic, tp.partition) for tp in partitions}
        self.assigned = True
        self.counters.assignments += 1
        self.last_activity = time.monotonic()
        log.info("consumer %s assigned %s", self.h.group, sorted(self.assignment))

    def _on_revoke(self, client: Any, partitions: list[Any]) -> None:
        self.counters.rebalances += 1
        self.commit(client)  # nothing is in flight: callbacks only run inside consume()/close()
        self._forget(partitions, client)

    def _on_lost(self, client: Any, partitions: list[Any]) -> None:
        self.counters.rebalances += 1
        log.warning(
            "consumer %s lost %d partitions (session expired); their done offsets are dropped",
            self.h.group,
            len(partitions),
        )
        self._forget(partitions, client)

    def _forget(self, partitions: list[Any], client: Any) -> None:
        paused = [tp for tp in partitions if self.paused.pop((tp.topic, tp.partition), None) is not None]
        if paused:  # librdkafka keeps a partition's pause across assignments: undo ours while we own it
            client.resume(paused)
        for tp in partitions:
            self.done.pop((tp.topic, tp.partition), None)
            self.assignment.discard((tp.topic, tp.partition))
            metrics.consumer_lag_forget(self.h.group, tp.topic, tp.partition)

    def _resume_due(self) -> None:
        now = time.time()
        due = [tp for tp, at in self.paused.items() if at <= now]
        if due:
            for tp in due:
                del self.paused[tp]
            self.client.resume([self._ck.TopicPartition(t, p) for t, p in due])

    def _wait_for_due(self, rec: Any, tp: TP, due_s: float) -> None:
        """Leave a retry copy that is not yet due where it is: pause its partition and rewind to
        it, so it is fetched again once resumed (the records after it are due later still)."""
        self.paused[tp] = due_s
        part = self._ck.TopicPartition(tp[0], tp[1], rec.offset())
        self.client.pause([part])
        self.client.seek(part)

    def commit(self, client: Any = None) -> bool:
        """Commit the done offsets synchronously; on failure keep them for the next try (a
        revoke or loss drops them; committing a finished message late is always safe). In
        transactional mode commit the transaction; False if it was aborted (caller rewinds)."""
        client = client or self.client
        txn = self.h.txn
        if client is None or not (self.done or (txn is not None and txn.open)):
            return True
        offsets = [self._ck.TopicPartition(t, p, o) for (t, p), o in self.done.items()]
        if txn is not None:
            self.done.clear()
            try:
                txn.commit(offsets, client.consumer_group_metadata())
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
                if self.done.get(key) == tp.offset:
                    del self.done[key]
            else:
                self.counters.commit_failures += 1
                log.warning("offset commit for %s/%d failed: %s", tp.topic, tp.partition, tp.error)
        self.counters.commits += 1
        return True

    def rewind(self) -> None:
        """After an aborted transaction: back to the committed offset of every assigned partition."""
        ck, tps = self._ck, [self._ck.TopicPartition(t, p) for t, p in sorted(self.assignment)]
        try:
            for tp in self.client.committed(tps, timeout=30) if tps else []:
                offset = tp.offset if tp.offset >= 0 else ck.OFFSET_BEGINNING
                self.client.seek(ck.TopicPartition(tp.topic, tp.partition, offset))
        except ck.KafkaException as exc:  # leave the group; a restart resumes at the committed offsets
            raise BrokerError(f"cannot rewind after an aborted transaction: {exc}") from exc

    # -- records --------------------------------------------------------------------------------

    def _records(self, batch: list[Any]) -> None:
        """Handle a consume() batch in order: runs of plain messages share one inbox transaction
        (:meth:`_together`); anything else — a failure, poison, a retry copy not yet due, a
        broker error, a commit that failed — goes one at a time through :meth:`_record`."""
        i = 0
        stop = self.h.stop
        while i < len(batch) and not stop.is_set():
            if self.h.transaction_batch > 1:
                j, failure, committed, careful = self._together(batch, i)
                if not committed:  # none of batch[i:j] happened: each again on its own
                    for rec in batch[i:j]:
                        if stop.is_set() or not self._record(rec):
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

    def _plain_run(self, batch: list[Any], start: int) -> tuple[list[tuple[int, Any, Received]], int, bool]:
        """The messages from ``start`` on that can share a transaction — (index, record, message),
        at most :meth:`Handling.run_limit` — the index where the run stops (the first record that
        needs care: a broker error, an undecodable id, a retry copy; or the end of the batch), and
        whether it stopped because it was full. Records of partitions this consumer no longer
        reads are passed over, as :meth:`_record` does."""
        run: list[tuple[int, Any, Received]] = []
        stages = len(self.retry_delays_s)
        limit = self.h.run_limit()
        j = start
        while j < len(batch) and len(run) < limit:
            rec = batch[j]
            if rec.error() is not None:
                break
            tp = (rec.topic(), rec.partition())
            if tp not in self.assignment or tp in self.paused:
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
        """Run the plain messages from ``start`` on in one inbox transaction. Returns (index of the
        first record not done, the exception its handler raised if that is why, True, whether that
        record needs the one-at-a-time path — not so when the run merely filled up). If the
        transaction itself failed: the end of the range it covered and False — none of it
        happened, take each again on its own."""
        run, stop, full = self._plain_run(batch, start)
        if not run:
            return stop, None, True, not full
        result = self.h.shared_transaction([m for _, _, m in run])
        if result is None:
            return run[-1][0] + 1, None, False, True
        outcomes, failure = result
        for (_, rec, msg), (was_fresh, began) in zip(run, outcomes, strict=False):
            self.done[(rec.topic(), rec.partition())] = rec.offset() + 1
            self.h.finished(msg.topic, "processed" if was_fresh else "duplicate", msg, began)
            if not was_fresh:
                log.debug("message %s: duplicate, skipped", msg.id)
        if failure is not None:
            return run[len(outcomes)][0], failure, True, True
        return stop, None, True, not full

    def _record(self, rec: Any, failure: Exception | None = None) -> bool:
        """Handle one record from consume(); False when the batch must stop here (stopping).
        ``failure``: its handler already raised this once, in a shared transaction."""
        err = rec.error()
        if err is not None:
            if err.fatal():
                raise BrokerError(f"fatal Kafka consumer error: {err.name()}: {err.str()}", retriable=False)
            log.warning("consumer %s: %s", self.h.group, err.str())
            return True
        tp = (rec.topic(), rec.partition())
        if tp not in self.assignment or tp in self.paused:  # revoked (its new owner has it), or rewound
            return True
        at = origin(rec.topic(), rec.partition(), rec.offset(), record_headers(rec), len(self.retry_delays_s))
        if at.group not in (None, self.h.group):  # another group's retry copy: theirs to handle
            self.done[tp] = rec.offset() + 1
            return True
        if at.not_before_ms > time.time() * 1000:
            self._wait_for_due(rec, tp, at.not_before_ms / 1000)
            return True
        try:
            msg = from_record(rec)
        except MessageError as exc:
            handled = self.dead_letter(rec, position(rec), exc, at.attempts, at.first_failure or time.time(), at)
        else:
            handled = self.h.handle(
                msg, _Settle(self, rec, msg, at), attempts=at.attempts, first_failure=at.first_failure, failure=failure
            )
        if not handled:
            return False
        self.done[tp] = rec.offset() + 1
        return True

    # -- passing a record on --------------------------------------------------------------------

    def _send(self, out: Message, *, raise_rejected: bool = False) -> str | None:
        """Hand a dead letter or retry copy to the broker before its source offset may be committed:
        into the batch's transaction, or published and acknowledged (None: stopping interrupted it)."""
        if self.h.txn is not None:
            self.h.txn.add([out])  # commits with the batch's offsets, or is redone after an abort
            return out.topic
        return self.dlq.deliver(
            out, self.h.stop, self.h.backoff_base_s, self.h.max_backoff_s, raise_rejected=raise_rejected
        )

    def retry_later(
        self, rec: Any, msg: Received, error: Exception, attempts: int, first_failure: float, at: Origin
    ) -> bool:
        delay = self.retry_delays_s[at.stage]
        copy = retry_copy(
            message_id=msg.id,
            key=rec.key(),
            value=rec.value(),
            headers=record_headers(rec),
            at=at,
            group=self.h.group,
            attempts=attempts,
            first_failure=first_failure,
            error=error,
            delay_s=delay,
            now=time.time(),
        )
        try:
            validate_topic(copy.topic)  # e.g. too long: the original's name left no room for ".retry.N"
            if self._send(copy, raise_rejected=True) is None:
                return False
        except (MessageError, BrokerError) as exc:  # refused for good (too long a name, too large)
            log.error("message %s: the broker refused its retry copy (%s); dead-lettering it", msg.id, exc)
            return self.dead_letter(rec, msg.id, error, attempts, first_failure, at)
        self.h.finished(rec.topic(), "retry", None, None)
        log.warning(
            "message %s failed (attempt %d of %d): %r; to %s, due in %.2fs",
            msg.id,
            attempts,
            len(self.retry_delays_s) + 1,
            error,
            copy.topic,
            delay,
        )
        return True

    def dead_letter(
        self, rec: Any, mid: str, exc: BaseException, attempts: int, first_failure: float, at: Origin
    ) -> bool:
        """Dead-letter the record under its original topic, partition and offset (a retry copy's
        origin); True once delivered, False if stopping interrupted the wait."""
        letter = dead_letter(
            message_id=mid,
            topic=at.topic,
            partition=at.partition,
            offset=at.offset,
            key=rec.key(),
            value=rec.value(),
            headers=record_headers(rec),
            error=exc,
            attempts=attempts,
            first_failure=first_failure,
            suffix=self.dlq_suffix,
        )
        if self.h.txn is not None:  # into the batch's transaction (a refusal aborts it: see the README)
            self.h.txn.add([letter])
            where, parked = letter.topic, False
        else:
            stored = store_letter(
                letter, self.dlq.publish, self.h.parking, self.h.stop, self.h.backoff_base_s, self.h.max_backoff_s
            )
            if stored is None:
                return False
            where, parked = stored
        if parked:  # durably in the parking lot: only now may its offset be committed
            self.h.finished(rec.topic(), "parked", None, None)
            log.error(
                "message %s: its dead letter was refused by the broker for good; parked in %s after %d attempts: %s",
                mid,
                where,
                attempts,
                brief(exc),
            )
            return True
        self.h.finished(rec.topic(), "dead_lettered", None, None)
        log.error("message %s dead-lettered to %s after %d attempts: %s", mid, where, attempts, brief(exc))
        return True
