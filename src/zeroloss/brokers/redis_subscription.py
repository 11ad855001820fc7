"""Redis Streams' consume side: a consumer group per stream (XREADGROUP, XACK after commit,
XAUTOCLAIM to take over idle entries); the publishing side is :mod:`zeroloss.brokers.redis`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from zeroloss.brokers.base import publish_one
from zeroloss.brokers.redis import (
    F_HEADERS,
    F_ID,
    F_KEY,
    F_VALUE,
    RedisStreamBroker,
    check_url,
    decode_headers,
    redis_module,
)
from zeroloss.brokers.subscription import Delivery, check_id
from zeroloss.errors import BrokerError
from zeroloss.message import Message
from zeroloss.received import Received

log = logging.getLogger("zeroloss.brokers.redis")  # the adapter's one logger name, as before the split


class RedisSubscription:
    """A consumer group (``XGROUP CREATE … MKSTREAM``, from the stream's start) per topic's stream;
    ``XREADGROUP`` hands out new entries, ``XACK`` after the inbox commit. Entries a dead consumer
    left pending are taken over with ``XAUTOCLAIM`` once idle for ``claim_idle_s`` — keep it above
    the longest time a handler (with its retries) can take, or a slow consumer's entry is
    processed twice at once (the inbox still lets only one commit). Dead letters are appended to
    ``<stream>.dlq`` (same entry format, with the error headers), then the original is acked.
    Redis has no idempotent ``XADD``: a republished id is dropped by the consumer's inbox."""

    def __init__(
        self,
        url: str,
        group: str,
        topics: Sequence[str],
        *,
        timeout_s: float = 30.0,
        claim_idle_s: float = 60.0,
        claim_every_s: float = 5.0,
        consumer_name: str | None = None,
    ) -> None:
        import os
        import socket
        import uuid

        self._r = redis_module()
        self.url = check_url(url)
        self.group = group
        self.topics = list(topics)
        self.timeout_s = timeout_s
        self.claim_idle_s = claim_idle_s
        self.claim_every_s = claim_every_s
        self.name = consumer_name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._next_claim = 0.0
        self._claim_from = {t: "0-0" for t in self.topics}
        self.max_deliveries: int | None = None  # Redis never gives up on a pending entry by itself
        self._client = self._r.Redis.from_url(
            url, socket_timeout=timeout_s + 5, socket_connect_timeout=min(timeout_s, 5.0)
        )
        self._dlq = RedisStreamBroker(url, timeout_s=timeout_s)
        with self._errors():
            for t in self.topics:
                try:
                    self._client.xgroup_create(t, group, id="0", mkstream=True)
                except self._r.exceptions.ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise

    def _errors(self) -> Any:
        import contextlib

        r = self._r

        @contextlib.contextmanager
        def translate() -> Any:
            try:
                yield
            except (r.exceptions.ConnectionError, r.exceptions.TimeoutError, r.exceptions.ResponseError) as exc:
                raise BrokerError(f"Redis at {self.url.rpartition('@')[2]}: {type(exc).__name__}: {exc}") from exc

        return translate()

    def fetch(self, max_messages: int, timeout_s: float) -> list[Delivery]:
        import time

        out: list[Delivery] = []
        with self._errors():
            if time.monotonic() >= self._next_claim:  # what dead consumers left behind
                self._next_claim = time.monotonic() + self.claim_every_s
                for t in self.topics:
                    if len(out) >= max_messages:
                        break
                    nxt, entries, *_ = self._client.xautoclaim(
                        t,
                        self.group,
                        self.name,
                        int(self.claim_idle_s * 1000),
                        self._claim_from[t],
                        count=max_messages - len(out),
                    )
                    self._claim_from[t] = nxt.decode() if isinstance(nxt, bytes) else str(nxt)
                    out.extend(self._delivery(t, eid, f) for eid, f in entries if f is not None)
            if len(out) < max_messages:
                got = self._client.xreadgroup(
                    self.group,
                    self.name,
                    dict.fromkeys(self.topics, ">"),
                    count=max_messages - len(out),
                    block=max(1, int(timeout_s * 1000)),
                )
                for stream, entries in got or []:
                    t = stream.decode() if isinstance(stream, bytes) else str(stream)
                    out.extend(self._delivery(t, eid, f) for eid, f in entries if f is not None)
        return out

    def _delivery(self, topic: str, eid: Any, f: dict[bytes, bytes]) -> Delivery:
        eid = eid.decode() if isinstance(eid, bytes) else str(eid)
        mid, poison = check_id(f.get(F_ID), f"{topic}/{eid}")  # bytes: check_id decodes strictly
        try:
            headers = decode_headers(f.get(F_HEADERS))
        except ValueError as exc:
            headers, poison = (), poison or str(exc)
        ms = int(eid.split("-", 1)[0]) if eid.split("-", 1)[0].isdigit() else 0
        received = Received(mid, topic, 0, ms, f.get(F_KEY), f.get(F_VALUE, b""), headers, ms)
        return Delivery(received, (topic, eid), poison)

    def ack(self, d: Delivery) -> None:
        with self._errors():
            self._client.xack(d.token[0], self.group, d.token[1])

    def touch(self, d: Delivery) -> None:
        """Reset the entry's idle time so no one claims it while the handler retries."""
        with self._errors():
            self._client.xclaim(d.token[0], self.group, self.name, 0, [d.token[1]], justid=True)

    def dead_letter(self, d: Delivery, letter: Message) -> str:
        where = publish_one(self._dlq, letter, "dead letter")
        try:
            self.ack(d)
        except BrokerError as exc:
            # The letter is stored; raising would append it again on every retry. The entry stays
            # pending, is claimed again after claim_idle_s and dead-lettered once more (a copy).
            log.warning(
                "dead letter %s stored; XACK of the original failed (%s): it will be redelivered", letter.id, exc
            )
        return where

    def release(self, ds: Sequence[Delivery]) -> None:
        """Mark them idle for longer than ``claim_idle_s`` (``XCLAIM … IDLE``), so the next
        ``XAUTOCLAIM`` of any consumer in the group takes them at once."""
        idle_ms = int(self.claim_idle_s * 1000) + 1
        with self._errors():
            for d in ds:
                self._client.xclaim(d.token[0], self.group, self.name, 0, [d.token[1]], idle=idle_ms, justid=True)
        self._claim_from = dict.fromkeys(self.topics, "0-0")
        self._next_claim = 0.0

    def close(self) -> None:
        self._client.close()
        self._dlq.close()
