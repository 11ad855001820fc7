"""What exists on each broker, asked with the broker's own client (not zeroloss's adapters)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.broker_harness import AMQP_URL, NATS_URL
from tests.conftest import REDIS_URL


def kafka_partitions(bootstrap: str, topic: str) -> int:
    """Partitions of ``topic`` (0: no such topic)."""
    from confluent_kafka.admin import AdminClient

    md = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10)
    return len(md.topics[topic].partitions) if topic in md.topics and md.topics[topic].error is None else 0


async def amqp_queue(name: str) -> int | None:
    """Messages in queue ``name``, or None when there is no such queue."""
    import aio_pika
    import aiormq

    conn = await aio_pika.connect(AMQP_URL)
    try:
        ch = await conn.channel()
        try:
            q = await ch.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        count = q.declaration_result.message_count
        await ch.close()
        assert count is not None
        return int(count)
    finally:
        await conn.close()


async def nats_subjects(topic: str) -> list[str] | None:
    import nats
    import nats.js.errors

    from zeroloss.brokers.nats import stream_name

    nc = await nats.connect(NATS_URL)
    try:
        try:
            info = await nc.jetstream().stream_info(stream_name(topic))
        except nats.js.errors.NotFoundError:
            return None
        return list(info.config.subjects or [])
    finally:
        await nc.close()


def with_redis(fn: Callable[[Any], Any]) -> Any:
    import redis

    r = redis.Redis.from_url(REDIS_URL)
    try:
        return fn(r)
    finally:
        r.close()
