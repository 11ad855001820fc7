"""Batch publishing for brokers without transactions (RabbitMQ, NATS JetStream): pipelined, yet
per-key order and the HELD rule of :class:`~zeroloss.brokers.base.Broker` hold.
The details: docs/design.md, "brokers/_batch.py"."""

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
    messages: Sequence[Message], send: Callable[[Message], Awaitable[Outcome]], deadline: float
) -> list[Outcome]:
    """Publish with ``send`` wave by wave until ``deadline`` (event-loop time); one Outcome per
    message, in the input order. ``send`` returns DELIVERED, RETRY or REJECTED, or raises
    :class:`BrokerWide`. Messages the broker did not answer for — in flight at the deadline or at
    a broker-wide failure, or in a wave not started — are UNDECIDED. A wave is not started when
    the slowest wave so far would not fit before the deadline (better unsent than cut in flight).
    Raises :class:`BrokerWide` when nothing at all was decided."""
    loop = asyncio.get_running_loop()
    outcomes: dict[str, Outcome] = {}
    blocked: set[bytes] = set()
    stopped: str | None = None  # why the rest of the batch is UNDECIDED
    slowest = 0.0
    for n, wave in enumerate(waves(messages)):
        if stopped is None and n > 0 and loop.time() + slowest > deadline:
            stopped = "not sent: the batch ran out of time (timeout_s); it goes with the next batch"
        if stopped is not None:
            for m in wave:
                outcomes[m.id] = Outcome(m, Status.UNDECIDED, error=stopped)
            continue
        live = []
        for m in wave:
            if m.key is not None and m.key in blocked:
                outcomes[m.id] = Outcome(m, Status.HELD, error=HELD_REASON)
            else:
                live.append(m)
        if not live:
            continue
        started = loop.time()
        tasks = [asyncio.ensure_future(send(m)) for m in live]
        done, cut = await asyncio.wait(tasks, timeout=max(0.0, deadline - started))
        for t in cut:  # no answer before the deadline: whatever it becomes, we do not count it
            t.cancel()
        await asyncio.gather(*cut, return_exceptions=True)  # let the cancellations finish
        slowest = max(slowest, loop.time() - started)
        unexpected: BaseException | None = None
        for m, t in zip(live, tasks, strict=True):
            exc = None if t not in done else t.exception()
            if t not in done:
                stopped = stopped or "not acknowledged before the batch's deadline (timeout_s)"
                outcomes[m.id] = Outcome(m, Status.UNDECIDED, error=stopped)
            elif isinstance(exc, BrokerWide):
                stopped = str(exc)
                outcomes[m.id] = Outcome(m, Status.UNDECIDED, error=f"broker-wide failure: {exc}")
            elif exc is not None:
                unexpected = unexpected or exc
            else:
                r = t.result()
                outcomes[m.id] = r
                if r.status is not Status.DELIVERED and m.key is not None:
                    blocked.add(m.key)
        if unexpected is not None:  # a bug, not the broker: nothing of this batch is reported
            raise unexpected
    if stopped is not None and all(o.status is Status.UNDECIDED for o in outcomes.values()):
        raise BrokerWide(stopped)  # no answer at all: an outage, the relay backs off
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
