"""The consumer's loop for brokers that acknowledge message by message (RabbitMQ, NATS, Redis)::

    fetch a batch ──► per delivery: inbox transaction (claim id + handler) ──► commit ──► ack
                      │ handler fails: same delivery again after a backoff (touch keeps it ours)
                      └ max attempts, or poison: dead_letter (durably parked, then settled)
    stopping ──► release what was fetched but not processed (redelivered soon)

Handling itself (attempts, backoff, outages) is :mod:`zeroloss.consumer.handling`; this module
only fetches, settles and reopens the :class:`~zeroloss.brokers.subscription.Subscription` after a
broker failure.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from zeroloss.backoff import backoff_s
from zeroloss.brokers.subscription import Delivery, Subscription
from zeroloss.consumer.dead_letters import dead_letter
from zeroloss.consumer.handling import Handling
from zeroloss.errors import BrokerError, MessageError

log = logging.getLogger(__name__)


class _Settle:
    """The broker's half of one delivery's handling (see :class:`~zeroloss.consumer.handling.Settlement`)."""

    def __init__(self, loop: SubscriptionLoop, sub: Subscription, d: Delivery) -> None:
        self.loop, self.sub, self.d = loop, sub, d

    def done(self) -> None:
        self.loop.ack(self.sub, self.d)

    def dead_letter(self, error: BaseException, attempts: int, first_failure: float) -> bool:
        return self.loop.dead_letter(self.sub, self.d, error, attempts, first_failure)

    def retry_later(self, error: Exception, attempts: int, first_failure: float) -> bool | None:
        return None  # these brokers redeliver by themselves: retried in place

    def before_backoff(self) -> bool:
        return True

    def after_backoff(self) -> None:
        self.sub.touch(self.d)


class SubscriptionLoop:
    def __init__(self, handling: Handling, open_sub: Callable[[], Subscription], *, batch_size: int, poll_s: float,
                 dlq_suffix: str, housekeeping: Callable[[], None], counters: Any) -> None:
        self.h = handling
        self.open_sub = open_sub
        self.batch_size = batch_size
        self.poll_s = poll_s
        self.dlq_suffix = dlq_suffix
        self.housekeeping = housekeeping
        self.counters = counters
        self.assigned = False  # subscribed at least once
        self.last_activity = 0.0
        self.waiting = False  # nothing waits elsewhere (no retry topics here)

    def run(self, finished: Callable[[], bool]) -> None:
        """Consume until stopped or ``finished()``; reopen after broker failures."""
        h, outages = self.h, 0
        while not h.stop.is_set() and not finished():
            try:
                sub = self.open_sub()
            except BrokerError as exc:
                outages += 1
                delay = backoff_s(outages, h.backoff_base_s, h.max_backoff_s)
                log.error("consumer %s: cannot subscribe (%s); again in %.1fs", h.group, exc, delay)
                h.stop.wait(delay)
                continue
            self.assigned = True
            self.last_activity = time.monotonic()
            try:
                while not h.stop.is_set() and not finished():
                    batch = sub.fetch(self.batch_size, self.poll_s)
                    outages = 0
                    self._deliveries(sub, batch)
                    if batch:
                        self.last_activity = time.monotonic()
                    self.housekeeping()
            except BrokerError as exc:
                outages += 1
                delay = backoff_s(outages, h.backoff_base_s, h.max_backoff_s)
                log.error("consumer %s: broker failed (%s); subscribing again in %.1fs", h.group, exc, delay)
                h.stop.wait(delay)
            finally:
                sub.close()

    def _deliveries(self, sub: Subscription, batch: list[Delivery]) -> None:
        """Handle a fetched batch in order. With a SqlInbox, runs of deliveries share one inbox
        transaction and are acked after its commit; a failure, poison, or a transaction that did
        not commit goes one at a time. Stopping releases what is left."""
        h, i = self.h, 0
        while i < len(batch):
            if h.stop.is_set():
                sub.release(batch[i:])
                return
            failure: Exception | None = None
            if h.transaction_batch > 1 and batch[i].poison is None:
                run: list[Delivery] = []
                limit = h.run_limit()
                while i + len(run) < len(batch) and len(run) < limit and batch[i + len(run)].poison is None:
                    run.append(batch[i + len(run)])
                result = h.shared_transaction([d.received for d in run])
                if result is None:  # none of the run happened: each on its own
                    for k, d in enumerate(run):
                        if h.stop.is_set() or not self._handle(sub, d):
                            sub.release(batch[i + k:])
                            return
                    i += len(run)
                    continue
                outcomes, failure = result
                for d, (fresh, began) in zip(run, outcomes, strict=False):
                    self.ack(sub, d)
                    h.finished(d.received.topic, "processed" if fresh else "duplicate", d.received, began)
                i += len(outcomes)
                if failure is None:
                    continue
            if not self._handle(sub, batch[i], failure):
                sub.release(batch[i:])
                return
            i += 1

    def _handle(self, sub: Subscription, d: Delivery, failure: Exception | None = None) -> bool:
        if d.poison is not None:
            return self.dead_letter(sub, d, MessageError(d.poison), 0, time.time())
        return self.h.handle(d.received, _Settle(self, sub, d), failure=failure)

    def ack(self, sub: Subscription, d: Delivery) -> None:
        """Ack after the commit. A lost ack is harmless: the redelivery is an inbox duplicate."""
        try:
            sub.ack(d)
            self.counters.commits += 1
        except BrokerError as exc:
            self.counters.commit_failures += 1
            log.warning("ack of %s failed (%s); its redelivery will be skipped as a duplicate", d.received.id, exc)

    def dead_letter(self, sub: Subscription, d: Delivery, exc: BaseException, attempts: int,
                    first_failure: float) -> bool:
        h, msg = self.h, d.received
        letter = dead_letter(
            message_id=msg.id, topic=msg.topic, partition=msg.partition, offset=msg.offset, key=msg.key,
            value=msg.value, headers=msg.headers, error=exc, attempts=attempts, first_failure=first_failure,
            suffix=self.dlq_suffix,
        )
        failures = 0
        while True:
            try:
                where = sub.dead_letter(d, letter)
                break
            except BrokerError as err:
                failures += 1
                log.error("message %s: dead letter failed (%s); the message is held", msg.id, err)
                if not err.retriable or h.stop.wait(backoff_s(failures, h.backoff_base_s, h.max_backoff_s)):
                    return False
        h.finished(msg.topic, "dead_lettered", None, None)
        log.error("message %s dead-lettered to %s after %d attempts: %s: %s",
                  msg.id, where, attempts, type(exc).__name__, exc)
        return True
