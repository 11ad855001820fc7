"""The seam between the relay and a broker: :class:`Broker` publishes a batch and says, per
message, what became of it. :class:`TopicAdmin` is the operator's face of the same adapters:
declare ahead of time what the relay and the consumers will need (``zeroloss init --target``),
and remove it again (the demo's clean-up).

A broker-wide failure (unreachable, no progress, fenced) is not any one message's fault: the
adapter raises :class:`~zeroloss.errors.BrokerError` and the relay puts the whole batch back
without spending attempts. Everything else is reported per message as an :class:`Outcome` — also
when such a failure (or the batch's deadline) comes after part of the batch was acknowledged:
then the acknowledged part is DELIVERED and the rest UNDECIDED, so progress is never thrown away.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from zeroloss.errors import BrokerError
from zeroloss.message import Headers, Message


class Status(enum.StrEnum):
    DELIVERED = "delivered"  # the broker persisted it with its strongest acknowledgement
    RETRY = "retry"  # this message failed in a way that may pass later: spend an attempt
    REJECTED = "rejected"  # can never pass as it is (too large, invalid topic): to `failed`
    HELD = "held"  # not sent because an earlier message of its key failed in this batch
    # No answer for it: the batch stopped (deadline, broker-wide failure) before the broker said
    # anything about this message. Maybe stored, maybe not: back to pending unspent, sent again.
    UNDECIDED = "undecided"


@dataclass(frozen=True, slots=True)
class Outcome:
    message: Message
    status: Status
    location: str | None = None  # where the broker put it, e.g. "orders/2/1543"
    error: str | None = None


@runtime_checkable
class Broker(Protocol):
    def publish(self, messages: Sequence[Message]) -> list[Outcome]:
        """Publish in order; return one Outcome per message, in the same order. Once a message
        of a key is RETRY, REJECTED or UNDECIDED, every later message of that key in the batch
        must be HELD or UNDECIDED, never delivered: that is how per-key order survives a failure.
        DELIVERED only on the broker's acknowledgement of that message. Raise BrokerError when
        the broker as a whole failed and nothing can be said per message."""
        ...

    def close(self) -> None:
        """Flush nothing further; release the client."""
        ...


@runtime_checkable
class Interruptible(Protocol):
    """A broker whose publish can be cut short: the relay calls :meth:`interrupt` when it is told
    to stop, so SIGTERM takes effect within about a second even while the broker does not answer."""

    def interrupt(self) -> None:
        """Make a publish in progress (and every later one) give up soon with a retriable
        BrokerError; nothing not yet acknowledged counts as delivered."""
        ...


def publish_one(broker: Broker, msg: Message, what: str = "message") -> str:
    """Publish one message (a dead letter, a retry copy) and return where it went; BrokerError —
    retriable unless the broker refused it for good — if the broker did not take it."""
    (outcome,) = broker.publish([msg])
    if outcome.status is not Status.DELIVERED:
        raise BrokerError(
            f"{what} {msg.id} to {msg.topic} not stored: {outcome.error}",
            retriable=outcome.status is not Status.REJECTED,
        )
    return outcome.location or msg.topic


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """What :meth:`TopicAdmin.declare` may be asked for beyond the names. An adapter refuses
    (ConfigError) a setting its broker has no such thing for, rather than ignore it silently."""

    partitions: int | None = None  # Kafka only; None: the broker's default
    replication_factor: int | None = None  # Kafka topics, NATS stream replicas; None: the default
    group: str | None = None  # a consumer group to create now where the broker has such a thing


@dataclass(frozen=True, slots=True)
class Declared:
    """One thing :meth:`TopicAdmin.declare` looked at, and what it did."""

    kind: str  # "topic", "queue", "stream", "consumer group"
    name: str
    action: str  # "created", "exists" or "nothing needed"
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.action:<15} {self.kind} {self.name}" + (f"  ({self.detail})" if self.detail else "")


@runtime_checkable
class TopicAdmin(Protocol):
    def declare(self, topics: Sequence[str], spec: TopicSpec | None = None) -> list[Declared]:
        """Create, idempotently, what publishing to and consuming from ``topics`` needs — each
        topic and its dead-letter ``<topic>.dlq`` — and say what was there already. Raise
        ConfigError when something of that name exists in a form zeroloss cannot use, BrokerError
        when the broker cannot be reached."""
        ...

    def delete(self, topics: Sequence[str]) -> None:
        """Remove ``topics`` and their dead-letter topics with everything in them; what does not
        exist is fine."""
        ...


@runtime_checkable
class GroupAdmin(Protocol):
    """An adapter whose broker keeps a consumer group as an object of its own, created ahead
    (RocketMQ's subscription groups), which a caller that made one can remove again."""

    def delete_group(self, group: str) -> None:
        """Remove the consumer group and its offsets; a group that does not exist is fine."""
        ...


@runtime_checkable
class Reachable(Protocol):
    """An adapter whose admin work goes to another endpoint than its messages (RocketMQ: the
    name server, not the proxy), so that a successful declare does not show the broker answers."""

    def check_reachable(self) -> None:
        """Raise BrokerError, saying what to fix, unless the endpoint messages go to answers."""
        ...


@dataclass(frozen=True, slots=True)
class Stored:
    """A message as the broker keeps it, read without consuming it (``zeroloss dlq`` reads dead
    letters this way)."""

    position: str  # where it sits, in the broker's terms: "ZL_orders_ddlq/17", "orders.dlq/1712345678901-0"
    offset: int  # a number that grows along the topic; -1 where the broker has none
    id: str | None  # our message id, when the message carries one
    key: bytes | None
    value: bytes
    headers: Headers  # the message's own headers, without the id and the key
    partition: int = 0  # Kafka: the partition (part of position too); 0 where the broker has none


@runtime_checkable
class TopicReader(Protocol):
    def read(self, topic: str) -> Iterator[Stored]:
        """Everything ``topic`` holds, oldest first, leaving it there; ConfigError where the broker
        cannot be read without taking messages away."""
        ...


DLQ_SUFFIX = ".dlq"


def dlq_topic(topic: str, suffix: str = DLQ_SUFFIX) -> str:
    """``orders`` → ``orders.dlq``; a name already ending in the suffix is returned as is."""
    return topic if topic.endswith(suffix) else topic + suffix


def with_dead_letters(topics: Sequence[str]) -> list[str]:
    """``["orders"]`` → ``["orders", "orders.dlq"]``: each topic then its dead-letter topic, once
    each (a topic that already is a dead-letter topic is not given another)."""
    return list(dict.fromkeys(name for t in topics for name in (t, dlq_topic(t))))
