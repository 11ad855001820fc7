"""NATS JetStream's consume side: a durable pull consumer per topic's stream (durable = the group),
explicit acks, dead letters to ``<topic>.dlq``; the publishing side is :mod:`zeroloss.brokers.nats`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from zeroloss.brokers._batch import (
    KEY_HEADER,
    BrokerWide,
    value_bytes,
)
from zeroloss.brokers.base import publish_one
from zeroloss.brokers.nats import MSG_ID_HEADER, NatsBroker, nats_module, stream_name
from zeroloss.brokers.subscription import Delivery, check_id
from zeroloss.errors import BrokerError, ConfigError
from zeroloss.message import ID_HEADER, Message
from zeroloss.received import Received

log = logging.getLogger("zeroloss.brokers.nats")  # the adapter's one logger name, as before the split


def durable_name(group: str) -> str:
    """A consumer group as a JetStream durable name (no dots), escaped like :func:`stream_name`."""
    return "ZL_" + group.replace("_", "__").replace(".", "_d")


class NatsSubscription:
    """A durable pull consumer per topic's stream (durable = the group): explicit acks,
    ``ack_wait_s`` before an unacked message is redelivered (``touch`` pushes it back while the
    handler retries), ``max_deliver`` deliveries at most: past that the server drops a message
    silently, so the consumer reads each delivery's count (``num_delivered``) and dead-letters a
    message at its second-to-last delivery (see :mod:`zeroloss.brokers.subscription`). Dead letters are published to the
    ``<topic>.dlq`` stream (with our error headers, ``Nats-Msg-Id`` = the id, so a repeated dead
    letter is dropped within the window), then the original is ``term``-inated.

    It shares one :class:`NatsBroker` (connection, event loop, stream creation) for consuming and
    for publishing dead letters.
    """

    def __init__(
        self,
        url: str,
        group: str,
        topics: Sequence[str],
        *,
        timeout_s: float = 30.0,
        ack_wait_s: float = 30.0,
        max_deliver: int = 100,
        dedup_window_s: float = 300.0,
    ) -> None:
        self._nats = nats_module()
        self.group = group
        self.topics = list(topics)
        self.ack_wait_s = ack_wait_s
        self.max_deliver = max_deliver
        self.broker = NatsBroker(url, timeout_s=timeout_s, dedup_window_s=dedup_window_s)
        self._subs: list[tuple[str, Any]] = []
        self.max_deliveries: int | None = None  # the durables' own MaxDeliver, read back from the server
        # Fetch one message at a time until a fetch brings no redelivery: after a crash, the message
        # that killed the consumer is then delivered again alone, and the ones fetched along with
        # it before do not share its delivery count (and its dead letter at the limit).
        self._careful = True
        try:
            self._run(self._open())
        except BaseException:
            self.close()
            raise

    def _run(self, coro: Any, timeout_s: float | None = None) -> Any:
        nats = self._nats
        try:
            return self.broker._loop.run(coro, timeout_s or self.broker.timeout_s)
        except TimeoutError:
            raise BrokerError(f"NATS at {self.broker.url} did not answer in time") from None
        except BrokerWide as exc:
            raise BrokerError(f"NATS at {self.broker.url}: {exc}") from exc
        except (nats.errors.Error, OSError) as exc:
            raise BrokerError(f"NATS at {self.broker.url}: {type(exc).__name__}: {exc}") from exc

    async def _open(self) -> None:
        api = self._nats.js.api
        js = await self.broker._connect()
        for topic in self.topics:
            await self.broker.ensure_stream(topic)
            if topic in self.broker._refused:
                raise ConfigError(self.broker._refused[topic])
            config = api.ConsumerConfig(
                ack_policy=api.AckPolicy.EXPLICIT,
                ack_wait=self.ack_wait_s,
                max_deliver=self.max_deliver,
                deliver_policy=api.DeliverPolicy.ALL,
            )
            sub = await js.pull_subscribe(
                topic, durable=durable_name(self.group), stream=stream_name(topic), config=config
            )
            self._subs.append((topic, sub))
            # An existing durable keeps the MaxDeliver it was made with, whatever we asked for.
            info = await js.consumer_info(stream_name(topic), durable_name(self.group))
            limit = info.config.max_deliver
            if limit is not None and limit > 0:
                self.max_deliveries = min(limit, self.max_deliveries or limit)

    async def _fetch(self, max_messages: int, timeout_s: float) -> list[Any]:
        nats = self._nats
        if self.broker._nc is None or not self.broker._nc.is_connected:
            raise BrokerWide("not connected")
        out: list[Any] = []
        per = max(0.05, timeout_s / max(1, len(self._subs)))
        for _, sub in self._subs:
            if len(out) >= max_messages:
                break
            try:
                out.extend(await sub.fetch(max_messages - len(out), timeout=per))
            except nats.errors.TimeoutError:
                continue
        return out

    def fetch(self, max_messages: int, timeout_s: float) -> list[Delivery]:
        want = 1 if self._careful else max_messages
        msgs = self._run(self._fetch(want, timeout_s), timeout_s + self.broker.timeout_s)
        out = [self._delivery(m) for m in msgs]
        if out:
            self._careful = any(d.delivered > 1 for d in out)
        return out

    def _delivery(self, m: Any) -> Delivery:
        raw = dict(m.headers or {})
        key = raw.pop(KEY_HEADER, None)
        headers = tuple((k, value_bytes(v)) for k, v in raw.items() if not k.startswith("Nats-"))
        meta = m.metadata
        seq = meta.sequence.stream
        mid, poison = check_id(raw.get(ID_HEADER) or raw.get(MSG_ID_HEADER), f"{meta.stream}/{seq}")
        ts = int(meta.timestamp.timestamp() * 1000) if meta.timestamp else 0
        received = Received(mid, m.subject, 0, seq, None if key is None else value_bytes(key), m.data, headers, ts)
        return Delivery(received, m, poison, delivered=meta.num_delivered or 0)

    def ack(self, d: Delivery) -> None:
        self._run(d.token.ack())

    def touch(self, d: Delivery) -> None:
        self._run(d.token.in_progress())

    def dead_letter(self, d: Delivery, letter: Message) -> str:
        where = publish_one(self.broker, letter, "dead letter")
        try:
            self._run(d.token.term())
        except BrokerError as exc:
            # The letter is stored. Raising would have the caller publish it again and again on a
            # connection that stays dead; the original comes back after AckWait and goes the same
            # way (the copy is dropped by Nats-Msg-Id within the window).
            log.warning(
                "dead letter %s stored; terminating the original failed (%s): it will be redelivered", letter.id, exc
            )
        return where

    def release(self, ds: Sequence[Delivery]) -> None:
        async def give_back() -> None:
            for d in ds:
                await d.token.nak()

        self._run(give_back())

    def close(self) -> None:
        self._subs.clear()
        self.broker.close()
