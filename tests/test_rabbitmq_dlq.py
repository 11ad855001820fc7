"""RabbitMQ dead letters are published by zeroloss with a publisher confirm, and the original is
acked only after it: a letter the broker refuses leaves the original held, never lost."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.broker_harness import AMQP_URL, harness
from tests.conftest import unique_topic
from zeroloss.brokers.base import Status
from zeroloss.brokers.rabbitmq_subscription import RabbitSubscription
from zeroloss.brokers.subscription import Delivery
from zeroloss.consumer import dead_letters as dlq
from zeroloss.errors import BrokerError
from zeroloss.message import new_message

pytestmark = pytest.mark.rabbitmq


async def _block_dead_letters(topic: str, blocker: str) -> None:
    """A second queue on the ``<topic>.dlq`` fanout exchange that refuses every message
    (x-max-length 0, reject-publish): the broker then nacks each dead letter published there."""
    import aio_pika

    conn = await aio_pika.connect(AMQP_URL)
    try:
        ch = await conn.channel()
        q = await ch.declare_queue(blocker, arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
        await q.bind(topic + ".dlq")
    finally:
        await conn.close()


async def _delete_queue(name: str) -> None:
    import aio_pika

    conn = await aio_pika.connect(AMQP_URL)
    try:
        await (await conn.channel()).queue_delete(name)
    finally:
        await conn.close()


def _fetch_one(sub: RabbitSubscription) -> Delivery:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        got = sub.fetch(1, 0.5)
        if got:
            return got[0]
    raise AssertionError("the message was not delivered within 30 s")


def test_a_refused_dead_letter_holds_the_original_and_a_confirmed_one_acks_it() -> None:
    with harness("rabbitmq") as h:
        topic = unique_topic("rdlq")
        h.topics.append(topic)
        msg = new_message(topic, b"payload", key=b"k", headers=[("trace", b"t-1")])
        b = h.make()
        try:
            assert [o.status for o in b.publish([msg])] == [Status.DELIVERED]  # declares the topology too
        finally:
            b.close()
        blocker = topic + ".blocker"
        asyncio.run(_block_dead_letters(topic, blocker))
        try:
            sub = RabbitSubscription(AMQP_URL, "g", [topic], timeout_s=10)
            try:
                d = _fetch_one(sub)
                letter = dlq.dead_letter(
                    message_id=d.received.id,
                    topic=topic,
                    partition=0,
                    offset=0,
                    key=d.received.key,
                    value=d.received.value,
                    headers=d.received.headers,
                    error=ValueError("bad order"),
                    attempts=5,
                    first_failure=time.time(),
                )
                with pytest.raises(BrokerError, match="not stored") as refused:
                    sub.dead_letter(d, letter)
                assert refused.value.retriable  # the consumer keeps the message and tries again
            finally:
                sub.close()  # the unacked original goes back to its queue
        finally:
            asyncio.run(_delete_queue(blocker))
        sub = RabbitSubscription(AMQP_URL, "g", [topic], timeout_s=10)
        try:
            d = _fetch_one(sub)
            assert d.received.id == msg.id  # held, not lost
            assert sub.dead_letter(d, letter) == topic + ".dlq"
            assert sub.fetch(1, 0.5) == []  # acked after the confirm: not redelivered
        finally:
            sub.close()
        assert h.read(topic) == []
        letters = h.read_headers(topic + ".dlq")
        assert msg.id in [mid for mid, _ in letters]  # a refused publish may still have reached this queue
        for _, headers in letters:
            assert headers[dlq.H_ERROR_TYPE] == b"ValueError"
            assert headers[dlq.H_ERROR_MESSAGE] == b"bad order"
            assert headers[dlq.H_ORIGINAL_TOPIC] == topic.encode()
            assert headers["trace"] == b"t-1"
