"""The consumer's loop for brokers that acknowledge message by message (RabbitMQ, NATS, Redis, RocketMQ)::

    fetch a batch ──► per delivery: inbox transaction (claim id + handler) ──► commit ──► ack
                      │ handler fails: same delivery again after a backoff (touch keeps it ours)
                      └ max attempts, or poison: dead_letter (stored, then settled; refused
                        for good: smaller, else parked in a file — see consumer.dead_letters)
    stopping ──► release what was fetched but not processed (redelivered soon)

Handling itself (attempts, backoff, outages) is :mod:`zeroloss.consumer.handling`; this module
only fetches, settles and reopens the :class:`~zeroloss.brokers.subscription.Subscription` after a
broker failure.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from zeroloss.backoff import backoff_s
from zeroloss.brokers.subscription import Delivery, DeliveryLimitReached, Subscription
from zeroloss.consumer.dead_letters import dead_letter, store_letter
from zeroloss.consumer.handling import Handling
from zeroloss.errors import BrokerError, ConfigError, MessageError
from zeroloss.logs import age, brief

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


def check_limits(max_attempts: int, max_deliveries: int | None) -> None:
    """The consumer must give up on a message (dead-letter it) before the broker does, with a
    delivery to spare: the broker's own limit drops the message (NATS) or dead-letters it without
    our error headers (RabbitMQ)."""
    if max_deliveries is None:
        return
    if max_deliveries < 3 or max_attempts > max_deliveries - 2:
        raise ConfigError(
            f"max_attempts={max_attempts} needs a broker delivery limit of at least "
            f"{max(3, max_attempts + 2)} (max_attempts + 2), but the broker delivers a message "
            f"{max_deliveries} times at most: past that it would drop or dead-letter it by itself; "
            f"lower max_attempts or raise the limit (NATS max_deliver, RabbitMQ delivery_limit)"
        )


def _last_chance(sub: Subscription, d: Delivery) -> bool:
    """Is this the broker's second-to-last delivery of ``d``, or later? Then it is not handled
    again but dead-lettered: a handler that kills the process once more would leave one delivery
    for the dead-lettering, none for another try. Counts cannot tell a message that kills its
    consumer from one fetched along with it, so the limit is the broker's, not ``max_attempts``:
    nothing is dead-lettered unhandled that the broker would not have given up on anyway."""
    limit = sub.max_deliveries
    return limit is not None and d.delivered >= limit - 1


def _plain(sub: Subscription, d: Delivery) -> bool:
    """May ``d`` share a transaction with others (not poison, not at its delivery limit)?"""
    return d.poison is None and not _last_chance(sub, d)


class SubscriptionLoop:
    def __init__(
        self,
        handling: Handling,
        open_sub: Callable[[], Subscription],
        *,
        batch_size: int,
        poll_s: float,
        dlq_suffix: str,
        housekeeping: Callable[[], None],
        counters: Any,
    ) -> None:
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
        down_since: float | None = None  # monotonic, for "broker is back after …"
        while not h.stop.is_set() and not finished():
            try:
                sub = self.open_sub()
            except BrokerError as exc:
                outages += 1
                delay = backoff_s(outages, h.backoff_base_s, h.max_backoff_s)
                if down_since is None:  # once per outage; the tries after it are DEBUG
                    down_since = time.monotonic()
                    log.error(
                        "consumer %s: cannot subscribe (%s); retrying with backoff (next in %.1fs)", h.group, exc, delay
                    )
                else:
                    log.debug("consumer %s: still cannot subscribe (%s); again in %.1fs", h.group, exc, delay)
                h.stop.wait(delay)
                continue
            try:
                check_limits(h.max_attempts, sub.max_deliveries)
            except ConfigError:
                sub.close()
                raise
            self.assigned = True
            self.last_activity = time.monotonic()
            try:
                while not h.stop.is_set() and not finished():
                    batch = sub.fetch(self.batch_size, self.poll_s)
                    outages = 0
                    if down_since is not None:
                        log.info("consumer %s: broker is back after %s", h.group, age(time.monotonic() - down_since))
                        down_since = None
                    self._deliveries(sub, batch)
                    if batch:
                        self.last_activity = time.monotonic()
                    self.housekeeping()
            except BrokerError as exc:
                outages += 1
                delay = backoff_s(outages, h.backoff_base_s, h.max_backoff_s)
                if down_since is None:
                    down_since = time.monotonic()
                    log.error(
                        "consumer %s: broker failed (%s); subscribing again with backoff (next in %.1fs)",
                        h.group,
                        exc,
                        delay,
                    )
                else:
                    log.debug("consumer %s: broker failed again (%s); next try in %.1fs", h.group, exc, delay)
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
            if h.transaction_batch > 1 and _plain(sub, batch[i]):
                run: list[Delivery] = []
                limit = h.run_limit()
                while i + len(run) < len(batch) and len(run) < limit and _plain(sub, batch[i + len(run)]):
                    run.append(batch[i + len(run)])
                result = h.shared_transaction([replace(d.received, attempts=max(1, d.delivered)) for d in run])
                if result is None:  # none of the run happened: each on its own
                    for k, d in enumerate(run):
                        if h.stop.is_set() or not self._handle(sub, d):
                            sub.release(batch[i + k :])
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
        # Earlier deliveries that were not settled count as attempts: the handler failed and the
        # consumer stopped during its backoff, or it died in the handler. (A delivery fetched but
        # released unhandled at a stop counts too: that can only make the dead letter come sooner.)
        earlier = max(0, d.delivered - 1)
        if d.poison is not None:
            return self.dead_letter(sub, d, MessageError(d.poison), 0, time.time())
        if _last_chance(sub, d):
            why = DeliveryLimitReached(
                f"delivered {d.delivered} times without being settled (the broker gives up after "
                f"{sub.max_deliveries}): the consumer died, lost its connection or was stopped while it had it, "
                f"each time; see the consumer's log for the handler's errors"
            )
            return self.dead_letter(sub, d, why, earlier, time.time())
        return self.h.handle(d.received, _Settle(self, sub, d), attempts=earlier, failure=failure)

    def ack(self, sub: Subscription, d: Delivery) -> None:
        """Ack after the commit. A lost ack is harmless: the redelivery is an inbox duplicate."""
        try:
            sub.ack(d)
            self.counters.commits += 1
        except BrokerError as exc:
            self.counters.commit_failures += 1
            log.warning("ack of %s failed (%s); its redelivery will be skipped as a duplicate", d.received.id, exc)

    def dead_letter(
        self, sub: Subscription, d: Delivery, exc: BaseException, attempts: int, first_failure: float
    ) -> bool:
        h, msg = self.h, d.received
        letter = dead_letter(
            message_id=msg.id,
            topic=msg.topic,
            partition=msg.partition,
            offset=msg.offset,
            key=msg.key,
            value=msg.value,
            headers=msg.headers,
            error=exc,
            attempts=attempts,
            first_failure=first_failure,
            suffix=self.dlq_suffix,
        )
        stored = store_letter(
            letter, lambda m: sub.dead_letter(d, m), h.parking, h.stop, h.backoff_base_s, h.max_backoff_s
        )
        if stored is None:
            return False
        where, parked = stored
        if parked:  # durably in the parking lot: only now may the broker forget the original
            self.ack(sub, d)
            h.finished(msg.topic, "parked", None, None)
            log.error(
                "message %s: its dead letter was refused by the broker for good; parked in %s after %d attempts: %s",
                msg.id,
                where,
                attempts,
                brief(exc),
            )
            return True
        h.finished(msg.topic, "dead_lettered", None, None)
        log.error("message %s dead-lettered to %s after %d attempts: %s", msg.id, where, attempts, brief(exc))
        return True
