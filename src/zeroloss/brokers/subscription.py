"""The consuming seam for brokers that acknowledge message by message (RabbitMQ, NATS JetStream,
Redis Streams, RocketMQ): :class:`Subscription`, which each of those adapters implements beside its
publishing side. The loop that drives it is :mod:`zeroloss.consumer.subscription_loop`; Kafka's
offset-commit loop is :mod:`zeroloss.consumer.kafka_loop`.
The details: docs/design.md, "brokers/subscription.py"."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from zeroloss.errors import MessageError
from zeroloss.inbox import id_problem
from zeroloss.message import Message
from zeroloss.received import Received


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message handed out by a subscription: what the handler sees, plus the broker's
    handle to settle it (an AMQP delivery, a NATS message, a Redis entry id)."""

    received: Received
    token: Any
    poison: str | None = None  # why it cannot be processed at all (unusable id): dead-lettered at once
    delivered: int = 0  # which delivery this is by the broker's own count (1: the first); 0: unknown


class DeliveryLimitReached(MessageError):
    """The broker has handed a message out so often without it being settled (the consumer died,
    lost its connection or was stopped each time it had it) that its next delivery could be its
    last: dead-lettered by us, with this error, rather than dropped by the broker."""


@runtime_checkable
class Subscription(Protocol):
    # How many times the broker delivers a message before it drops it or dead-letters it by
    # itself (NATS ``max_deliver``, RabbitMQ ``x-delivery-limit`` + 1, RocketMQ the group's
    # ``retryMaxTimes`` + 1); None: no such limit.
    max_deliveries: int | None

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
        """Give back deliveries that were fetched but not processed: redelivered soon. Called
        when the consumer stops; each counts as a delivery toward the broker's limit."""
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
