"""Batch publishing for brokers without transactions (RabbitMQ, NATS JetStream): pipelined, yet
per-key order and the HELD rule of :class:`~zeroloss.brokers.base.Broker` hold.

Such a broker acknowledges each message on its own, and one can fail (a nack, a full stream)
while a later one passes. If two messages of one key were in flight together, the later could be
stored although the earlier was refused — and nothing can take it back. So a batch is sent in
*waves*: wave ``n`` holds the ``n``-th message of every key (messages without a key all go in
wave 0, they promise no order). A wave is published concurrently and its acknowledgements
awaited together; before the next wave, every message whose key failed is ``HELD``. Messages of
one key are thereby sequential (one round trip each), different keys are pipelined: a batch of
many keys costs a few round trips, a batch of one hot key costs one round trip per message.

A send that fails in a way that says nothing about the message (connection lost, no answer in
time) raises :class:`BrokerWide`; the whole batch then goes back to the relay unspent, including
what earlier waves delivered — the republished copies carry the same id, and the broker's dedup
or the consumer's inbox drops them.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable, Sequence

from zeroloss.brokers.base import Outcome, Status
from zeroloss.message import Headers, Message

KEY_HEADER = "zeroloss-key"
"""Brokers without a key field (RabbitMQ, NATS) carry the message key in this header."""

HELD_REASON = "an earlier message of its key failed"


class BrokerWide(Exception):
    """Raised by a send function: the broker as a whole failed; the reason is the message."""


def waves(messages: Sequence[Message]) -> list[list[Message]]:
    """Group ``messages`` so that wave ``n`` holds the ``n``-th message of each key, in order."""
    out: list[list[Message]] = []
    seen: dict[bytes, int] = {}
    for m in messages:
        if m.key is None:
            n = 0
        else:
            n = seen.get(m.key, 0)
            seen[m.key] = n + 1
        while len(out) <= n:
            out.append([])
        out[n].append(m)
    return out


async def publish_in_waves(
    messages: Sequence[Message], send: Callable[[Message], Awaitable[Outcome]]
) -> list[Outcome]:
    """Publish with ``send`` wave by wave; one Outcome per message, in the input order. ``send``
    returns DELIVERED, RETRY or REJECTED, or raises :class:`BrokerWide`."""
    outcomes: dict[str, Outcome] = {}
    blocked: set[bytes] = set()
    for wave in waves(messages):
        live = []
        for m in wave:
            if m.key is not None and m.key in blocked:
                outcomes[m.id] = Outcome(m, Status.HELD, error=HELD_REASON)
            else:
                live.append(m)
        results = await asyncio.gather(*(send(m) for m in live), return_exceptions=True)
        for m, r in zip(live, results, strict=True):
            if isinstance(r, BaseException):
                raise r
            outcomes[m.id] = r
            if r.status is not Status.DELIVERED and m.key is not None:
                blocked.add(m.key)
    return [outcomes[m.id] for m in messages]


def duplicate_header(headers: Headers) -> str | None:
    """The first header name used twice, or None: AMQP tables and nats-py header dicts hold one
    value per name, so such a message is REJECTED rather than silently cut down."""
    names: set[str] = set()
    for k, _ in headers:
        if k in names:
            return k
        names.add(k)
    return None


B64 = "b64:"


def text_value(raw: bytes) -> str:
    """Header bytes as text for a text-only header (NATS): the UTF-8 text when it is safe and
    unambiguous, else ``b64:`` + base64. :func:`value_bytes` reverses it exactly."""
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        text = None
    if text and text.isprintable() and not text.startswith(B64) and text == text.strip():
        return text
    return B64 + base64.b64encode(raw).decode()


def value_bytes(text: str) -> bytes:
    return base64.b64decode(text[len(B64) :]) if text.startswith(B64) else text.encode()
