"""RabbitMQ's consume side: one channel, manual acks after commit, dead letters published to
``<topic>.dlq``; the publishing side is :mod:`zeroloss.brokers.rabbitmq`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from zeroloss.brokers._batch import KEY_HEADER
from zeroloss.brokers._loop import LoopThread
from zeroloss.brokers.base import publish_one
from zeroloss.brokers.rabbitmq import DELIVERY_COUNT_HEADER, RabbitBroker, aio_pika_module, check_url, declare_topology
from zeroloss.brokers.subscription import Delivery, check_id
from zeroloss.errors import BrokerError
from zeroloss.message import ID_HEADER, Message
from zeroloss.received import Received

log = logging.getLogger("zeroloss.brokers.rabbitmq")  # the adapter's one logger name, as before the split


def _header_bytes(v: Any) -> bytes:
    if isinstance(v, (bytes, bytearray)):
        return bytes(v)
    return v.encode() if isinstance(v, str) else str(v).encode()


class RabbitSubscription:
    """Consumes the quorum queue ``<topic>`` of each topic with manual acks and a prefetch.

    RabbitMQ's consuming group is the queue: every Consumer of a topic shares ``<topic>``
    whatever its group name (the group names its inbox claims). The id is the ``zeroloss-id``
    header, else the AMQP ``message_id``; a message with neither is delivered at least once
    (keyed by its delivery tag, which a redelivery does not keep).

    Dead letters are published by zeroloss, not by the broker: the letter (the original key, value
    and headers plus the ``zeroloss-dlq-*`` error headers, see :mod:`zeroloss.dlq`) goes to the
    exchange ``<topic>.dlq`` through a :class:`RabbitBroker` — publisher confirm, ``mandatory`` —
    and only after that confirm is the original acked. A letter that is not confirmed raises
    :class:`BrokerError` and the original stays unacked (held). The queue's own dead-lettering
    (``x-delivery-limit``, at-least-once strategy, with RabbitMQ's ``x-death`` header only) is the
    broker's backstop: the consumer reads ``x-delivery-count`` and dead-letters a message itself,
    with its error headers, at the delivery before the queue would.
    """

    def __init__(
        self,
        url: str,
        group: str,
        topics: Sequence[str],
        *,
        prefetch: int = 200,
        timeout_s: float = 30.0,
        delivery_limit: int = 20,
    ) -> None:
        self._ap = aio_pika_module()
        import aiormq

        self._aiormq = aiormq
        self.url = check_url(url)
        self.group = group
        self.topics = list(topics)
        self.prefetch = prefetch
        self.timeout_s = timeout_s
        self.delivery_limit = delivery_limit
        # A message returned more than delivery_limit times is dead-lettered by the queue itself
        # (x-death only, no error headers): the consumer dead-letters it before that.
        self.max_deliveries: int | None = delivery_limit + 1
        self._loop = LoopThread("zeroloss-rabbitmq-consumer")
        self._conn: Any = None
        self._channel: Any = None  # the consuming channel: the broker may close it alone
        self._inbox: asyncio.Queue[Any] | None = None
        self._queues: list[tuple[Any, str]] = []  # (queue, consumer tag)
        self._dlq: RabbitBroker | None = None  # made by the first dead letter
        try:
            self._run(self._open())
        except BaseException:
            self.close()
            raise

    def _run(self, coro: Any, timeout_s: float | None = None) -> Any:
        try:
            return self._loop.run(coro, timeout_s or self.timeout_s)
        except TimeoutError:
            raise BrokerError(f"RabbitMQ at {self.url.rpartition('@')[2]} did not answer in time") from None
        except (
            self._aiormq.exceptions.AMQPError,
            self._aiormq.exceptions.ChannelInvalidStateError,
            ConnectionError,
            OSError,
        ) as exc:
            raise BrokerError(f"RabbitMQ at {self.url.rpartition('@')[2]}: {type(exc).__name__}: {exc}") from exc

    async def _open(self) -> None:
        self._inbox = asyncio.Queue()
        self._conn = await self._ap.connect(
            self.url, timeout=self.timeout_s, client_properties={"connection_name": f"zeroloss-{self.group}"}
        )
        for topic in self.topics:
            async with self._conn.channel(publisher_confirms=False) as ch:
                await declare_topology(ch, topic, self.delivery_limit)
        channel = self._channel = await self._conn.channel()
        await channel.set_qos(prefetch_count=self.prefetch)
        await self._consume()

    async def _consume(self) -> None:
        assert self._inbox is not None and self._channel is not None
        for topic in self.topics:
            queue = await self._channel.declare_queue(topic, passive=True)
            self._queues.append((queue, await queue.consume(self._inbox.put, no_ack=False)))

    async def _fetch(self, max_messages: int, timeout_s: float) -> list[Any]:
        assert self._inbox is not None
        if self._conn is None or self._conn.is_closed or self._channel is None or self._channel.is_closed:
            raise ConnectionError("the connection or the consuming channel is closed")
        if not self._queues:  # released without stopping after all: consume again
            await self._consume()
        try:
            first = await asyncio.wait_for(self._inbox.get(), timeout_s)
        except TimeoutError:
            return []
        out = [first]
        while len(out) < max_messages and not self._inbox.empty():
            out.append(self._inbox.get_nowait())
        return out

    def fetch(self, max_messages: int, timeout_s: float) -> list[Delivery]:
        return [self._delivery(m) for m in self._run(self._fetch(max_messages, timeout_s), timeout_s + 10)]

    def _delivery(self, m: Any) -> Delivery:
        raw = dict(m.headers or {})
        key = raw.pop(KEY_HEADER, None)
        # The quorum queue's count of earlier deliveries that were returned (nack, or the channel
        # closed while holding it): broker metadata, not the message's, so not passed on.
        count = raw.pop(DELIVERY_COUNT_HEADER, None)
        delivered = count + 1 if isinstance(count, int) else (0 if m.redelivered else 1)
        headers = tuple((k, _header_bytes(v)) for k, v in raw.items())
        mid = raw.get(ID_HEADER)
        mid = _header_bytes(mid) if mid is not None else m.message_id  # check_id decodes strictly
        topic = m.routing_key or (self.topics[0] if len(self.topics) == 1 else "")
        mid, poison = check_id(mid, f"{topic}/{m.delivery_tag}")
        ts = int(m.timestamp.timestamp() * 1000) if m.timestamp else 0
        received = Received(
            mid, topic, 0, m.delivery_tag or 0, None if key is None else _header_bytes(key), m.body, headers, ts
        )
        return Delivery(received, m, poison, delivered=delivered)

    def ack(self, d: Delivery) -> None:
        self._run(d.token.ack())

    def touch(self, d: Delivery) -> None:
        """Nothing to do: RabbitMQ keeps an unacked delivery for as long as the channel lives
        (up to ``consumer_timeout``, 30 minutes by default)."""

    def dead_letter(self, d: Delivery, letter: Message) -> str:
        if self._dlq is None:  # its own connection: the letter needs a confirm channel, ours has none
            self._dlq = RabbitBroker(
                self.url,
                timeout_s=self.timeout_s,
                delivery_limit=self.delivery_limit,
                connection_name=f"zeroloss-{self.group}-dlq",
            )
        where = publish_one(self._dlq, letter, "dead letter")
        try:
            self._run(d.token.ack())
        except BrokerError as exc:
            # The letter is safe. Raising would make the caller publish it again while this channel
            # stays dead; instead the original comes back after the reconnect and is dead-lettered
            # once more (a second copy on the dlq: it is at-least-once, like Kafka's).
            log.warning(
                "dead letter %s stored; acking the original failed (%s): it will be redelivered", letter.id, exc
            )
        return where

    def release(self, ds: Sequence[Delivery]) -> None:
        async def give_back() -> None:
            # Stop the flow first (release means stopping): a requeued message would otherwise be
            # pushed straight back into our prefetch and returned again at close, counted twice
            # toward the queue's delivery limit.
            queues, self._queues = self._queues, []
            for queue, tag in queues:
                await queue.cancel(tag)
            for d in ds:
                await d.token.nack(requeue=True)

        self._run(give_back())

    def close(self) -> None:
        async def shut() -> None:
            conn, self._conn = self._conn, None
            if conn is not None and not conn.is_closed:
                await asyncio.wait_for(conn.close(), 5.0)

        with contextlib.suppress(Exception):
            self._loop.run(shut(), 10.0)
        self._loop.close()
        if self._dlq is not None:
            self._dlq.close()
            self._dlq = None
