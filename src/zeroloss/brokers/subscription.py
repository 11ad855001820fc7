"""The consuming seam for brokers that acknowledge message by message (RabbitMQ, NATS JetStream,
Redis Streams): :class:`Subscription`. Kafka keeps its own offset-commit path in
:mod:`zeroloss.consumer`.

The :class:`~zeroloss.consumer.Consumer` drives a subscription like this (:func:`run`)::

    fetch a batch ──► per delivery: inbox transaction (claim id + handler) ──► commit ──► ack
                      │ handler fails: same delivery again after a backoff (touch keeps it ours)
                      └ max attempts, or poison: dead_letter (durably parked, then settled)
    stopping ──► release what was fetched but not processed (redelivered soon)

An ack is sent only after the inbox transaction committed, so a crash between the two means a
redelivery that the inbox recognises as a duplicate. A failure of the broker itself (connection
lost) raises :class:`~zeroloss.errors.BrokerError`; the consumer backs off, closes the
subscription and opens it again — unacknowledged deliveries come back from the broker.

Per-key order holds where the broker keeps it: one consumer on a RabbitMQ queue, on a NATS
durable consumer, or in a Redis consumer group sees messages in stream order; several consumers
in one group share the messages without a per-key assignment, and a redelivery after a crash can
come after later messages. Kafka (partition by key) is the broker to choose when several
consumers must keep per-key order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from zeroloss.backoff import backoff_s
from zeroloss.dlq import DLQ_SUFFIX, dead_letter
from zeroloss.errors import BrokerError, ConfigError, MalformedMessageError, MessageError
from zeroloss.inbox import id_problem
from zeroloss.message import Message
from zeroloss.received import Received

if TYPE_CHECKING:
    from zeroloss.consumer import Consumer

log = logging.getLogger(__name__)

SUBSCRIPTION_SCHEMES = ("amqp", "amqps", "nats", "redis", "rediss")


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message handed out by a subscription: what the handler sees, plus the broker's
    handle to settle it (an AMQP delivery, a NATS message, a Redis entry id)."""

    received: Received
    token: Any
    poison: str | None = None  # why it cannot be processed at all (unusable id): dead-lettered at once


@runtime_checkable
class Subscription(Protocol):
    def fetch(self, max_messages: int, timeout_s: float) -> list[Delivery]:
        """Up to ``max_messages`` deliveries, waiting at most ``timeout_s`` for the first."""
        ...

    def ack(self, d: Delivery) -> None:
        """Done (its inbox transaction committed): the broker may forget it."""
        ...

    def touch(self, d: Delivery) -> None:
        """Still working on it (retrying): keep it from being redelivered elsewhere."""
        ...

    def dead_letter(self, d: Delivery, letter: Message) -> str:
        """Park it on ``<topic>.dlq`` durably, then settle the original; where it went."""
        ...

    def release(self, ds: Sequence[Delivery]) -> None:
        """Give back deliveries that were fetched but not processed: redelivered soon."""
        ...

    def close(self) -> None: ...


def check_id(mid: str | bytes | None, fallback: str) -> tuple[str, str | None]:
    """(id, poison reason): the message id to deduplicate by, or why it is unusable — an id no
    inbox can store fails at the claim on every delivery, and an id decoded with replacement
    characters could match another message's and be skipped as its duplicate. Bytes must be UTF-8."""
    if mid is None:
        return fallback, None
    if isinstance(mid, bytes):
        try:
            mid = mid.decode()
        except UnicodeDecodeError:
            return fallback, f"message id {mid[:80]!r} is not UTF-8"
    if (why := id_problem(mid)) is not None:
        return fallback, f"message id {mid!r:.80} {why}"
    return mid, None


def open_subscription(url: str, group: str, topics: Sequence[str], **options: Any) -> Subscription:
    """The subscription behind a source URL (not Kafka: the Consumer handles that itself)."""
    from zeroloss.registry import scheme_of

    scheme = scheme_of(url)
    if scheme in ("amqp", "amqps"):
        from zeroloss.brokers.rabbitmq import RabbitSubscription

        return RabbitSubscription(url, group, topics, **options)
    if scheme == "nats":
        from zeroloss.brokers.nats import NatsSubscription

        return NatsSubscription(url, group, topics, **options)
    if scheme in ("redis", "rediss"):
        from zeroloss.brokers.redis import RedisSubscription

        return RedisSubscription(url, group, topics, **options)
    raise ConfigError(f"no subscription for scheme {scheme!r} in {url!r}; use kafka:// or one of "
                      f"{', '.join(SUBSCRIPTION_SCHEMES)}")


# -- the loop the Consumer runs for these brokers ------------------------------------------------


def run(consumer: Consumer, open_sub: Callable[[], Subscription], finished: Callable[[], bool]) -> None:
    """Consume until ``consumer`` is stopped or ``finished()``; reopen after broker failures."""
    outages = 0
    while not consumer._stop.is_set() and not finished():
        try:
            sub = open_sub()
        except BrokerError as exc:
            outages += 1
            delay = backoff_s(outages, consumer.backoff_base_s, consumer.max_backoff_s)
            log.error("consumer %s: cannot subscribe (%s); again in %.1fs", consumer.group, exc, delay)
            consumer._stop.wait(delay)
            continue
        consumer._assigned = True
        consumer._last_activity = time.monotonic()
        try:
            while not consumer._stop.is_set() and not finished():
                batch = sub.fetch(consumer.batch_size, consumer.poll_s)
                outages = 0
                _deliveries(consumer, sub, batch)
                if batch:
                    consumer._last_activity = time.monotonic()
                consumer._purge()
        except BrokerError as exc:
            outages += 1
            delay = backoff_s(outages, consumer.backoff_base_s, consumer.max_backoff_s)
            log.error("consumer %s: broker failed (%s); subscribing again in %.1fs", consumer.group, exc, delay)
            consumer._stop.wait(delay)
        finally:
            sub.close()


def _deliveries(consumer: Consumer, sub: Subscription, batch: list[Delivery]) -> None:
    """Handle a fetched batch in order. With a SqlInbox, runs of deliveries share one inbox
    transaction (see :meth:`Consumer._shared_transaction`) and are acked after its commit; a
    failure, poison, or a transaction that did not commit goes one at a time through
    :func:`_handle`. Stopping releases what is left."""
    i = 0
    while i < len(batch):
        if consumer._stop.is_set():
            sub.release(batch[i:])
            return
        failure: Exception | None = None
        if consumer.transaction_batch > 1 and batch[i].poison is None:
            run: list[Delivery] = []
            limit = consumer._run_limit()
            while i + len(run) < len(batch) and len(run) < limit and batch[i + len(run)].poison is None:
                run.append(batch[i + len(run)])
            result = consumer._shared_transaction([d.received for d in run])
            if result is None:  # none of the run happened: each on its own
                for k, d in enumerate(run):
                    if consumer._stop.is_set() or not _handle(consumer, sub, d):
                        sub.release(batch[i + k:])
                        return
                i += len(run)
                continue
            outcomes, failure = result
            for d, (fresh, began) in zip(run, outcomes, strict=False):
                _settle(consumer, sub, d)
                consumer._finished(d.received.topic, "processed" if fresh else "duplicate", d.received, began)
            i += len(outcomes)
            if failure is None:
                continue
        if not _handle(consumer, sub, batch[i], failure):
            sub.release(batch[i:])
            return
        i += 1


def _handle(consumer: Consumer, sub: Subscription, d: Delivery, failure: Exception | None = None) -> bool:
    """Process one delivery to the end (True) or give up because stopping interrupted (False).
    ``failure``: its handler already raised this once, in a shared transaction."""
    from zeroloss.consumer import _HandlerFailed, _is_outage

    msg = d.received
    if d.poison is not None:
        return _dead_letter(consumer, sub, d, MessageError(d.poison), 0, time.time())
    attempts = outages = 0
    first_failure: float | None = None
    while True:
        error: Exception
        if failure is not None:  # the first attempt already ran, in a shared transaction
            error, faulty, failure = failure, True, None
        else:
            started = time.monotonic()
            try:
                fresh = consumer._attempt(replace(msg, attempts=attempts + 1))
            except _HandlerFailed as failed:
                error, faulty = failed.exc, not _is_outage(failed.exc)
            except MessageError as exc:  # the inbox refused the id itself
                return _dead_letter(consumer, sub, d, exc, attempts, first_failure or time.time())
            except Exception as exc:  # the inbox failed
                error, faulty = exc, False
            else:
                _settle(consumer, sub, d)
                consumer._finished(msg.topic, "processed" if fresh else "duplicate", msg, started)
                if not fresh:
                    log.debug("message %s: duplicate, skipped", msg.id)
                return True
        if faulty:
            attempts += 1
            first_failure = first_failure or time.time()
            if isinstance(error, (MessageError, MalformedMessageError)) or attempts >= consumer.max_attempts:
                return _dead_letter(consumer, sub, d, error, attempts, first_failure)
            consumer._finished(msg.topic, "retry")
            delay = backoff_s(attempts, consumer.backoff_base_s, consumer.max_backoff_s)
            log.warning("message %s failed (attempt %d of %d): %r; again in %.2fs",
                        msg.id, attempts, consumer.max_attempts, error, delay)
        else:
            outages += 1
            consumer.counters.store_errors += 1
            delay = backoff_s(outages, consumer.backoff_base_s, consumer.max_backoff_s)
            log.error("message %s: the inbox's store failed (%s); again in %.1fs", msg.id, error, delay)
        if consumer._stop.wait(delay):
            log.info("stopping: message %s left for redelivery", msg.id)
            return False
        sub.touch(d)


def _settle(consumer: Consumer, sub: Subscription, d: Delivery) -> None:
    """Ack after the commit. A lost ack is harmless: the redelivery is an inbox duplicate."""
    try:
        sub.ack(d)
        consumer.counters.commits += 1
    except BrokerError as exc:
        consumer.counters.commit_failures += 1
        log.warning("ack of %s failed (%s); its redelivery will be skipped as a duplicate", d.received.id, exc)


def _dead_letter(consumer: Consumer, sub: Subscription, d: Delivery, exc: BaseException, attempts: int,
                 first_failure: float) -> bool:
    msg = d.received
    letter = dead_letter(
        message_id=msg.id, topic=msg.topic, partition=msg.partition, offset=msg.offset, key=msg.key,
        value=msg.value, headers=msg.headers, error=exc, attempts=attempts, first_failure=first_failure,
        suffix=consumer.dlq_suffix if consumer.dlq_suffix else DLQ_SUFFIX,
    )
    failures = 0
    while True:
        try:
            where = sub.dead_letter(d, letter)
            break
        except BrokerError as err:
            failures += 1
            log.error("message %s: dead letter failed (%s); the message is held", msg.id, err)
            if not err.retriable or consumer._stop.wait(
                    backoff_s(failures, consumer.backoff_base_s, consumer.max_backoff_s)):
                return False
    consumer._finished(msg.topic, "dead_lettered")
    log.error("message %s dead-lettered to %s after %d attempts: %s: %s",
              msg.id, where, attempts, type(exc).__name__, exc)
    return True
