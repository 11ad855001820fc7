"""The seam between the relay and a broker: :class:`Broker` publishes a batch and says, per
message, what became of it.

A broker-wide failure (unreachable, no progress, fenced) is not any one message's fault: the
adapter raises :class:`~zeroloss.errors.BrokerError` and the relay puts the whole batch back
without spending attempts. Everything else is reported per message as an :class:`Outcome`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from zeroloss.message import Message


class Status(enum.StrEnum):
    DELIVERED = "delivered"  # the broker persisted it with its strongest acknowledgement
    RETRY = "retry"  # this message failed in a way that may pass later: spend an attempt
    REJECTED = "rejected"  # can never pass as it is (too large, invalid topic): to `failed`
    HELD = "held"  # not sent because an earlier message of its key failed in this batch


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
        of a key is RETRY or REJECTED, every later message of that key in the batch must be
        HELD, never delivered: that is how per-key order survives a failure. Raise BrokerError
        when the broker as a whole failed and nothing can be said per message."""
        ...

    def close(self) -> None:
        """Flush nothing further; release the client."""
        ...
