"""Per-broker test harnesses for Kafka (the three-broker cluster), RabbitMQ, NATS JetStream, Redis
Streams and Apache RocketMQ 5: the adapter under test, a URL nobody listens on, and a read-back
with the broker's own client (not our adapters; RocketMQ: its remoting protocol's pull)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from tests.conftest import REDIS_URL, require_service
from zeroloss.brokers.base import Broker
from zeroloss.message import ID_HEADER

AMQP_URL = "amqp://guest:guest@127.0.0.1/"
NATS_URL = "nats://127.0.0.1:4222"

# (id, key) in the order the broker holds them
Entries = list[tuple[str, bytes | None]]
# (id, headers) in the order the broker holds them; header values as bytes
Letters = list[tuple[str, dict[str, bytes]]]


@dataclass
class BrokerHarness:
    name: str
    url: str
    bad_url: str  # the same broker kind at a port nobody listens on
    make: Callable[..., Broker]
    read: Callable[[str], Entries]
    drop: Callable[[str], None]  # remove what a test made for a topic
    read_headers: Callable[[str], Letters]
    topics: list[str] = field(default_factory=list)
    # What must exist before the relay publishes to a topic (RocketMQ: the topic itself, typed).
    create: Callable[[str], None] = lambda topic: None

    def new_topic(self, topic: str) -> str:
        """Register ``topic`` for clean-up and create what the broker needs ahead of publishing."""
        self.topics.append(topic)
        self.create(topic)
        return topic


def by_key(entries: Entries) -> dict[bytes, list[str]]:
    out: dict[bytes, list[str]] = {}
    for mid, key in entries:
        if key is not None:
            out.setdefault(key, []).append(mid)
    return out


# -- RabbitMQ -----------------------------------------------------------------------------------


async def _amqp_read(topic: str) -> Entries:
    import aio_pika

    conn = await aio_pika.connect(AMQP_URL)
    try:
        ch = await conn.channel()
        q = await ch.declare_queue(topic, passive=True)
        out: Entries = []
        while (msg := await q.get(no_ack=True, fail=False)) is not None:
            h = msg.headers or {}
            key = h.get("zeroloss-key")
            out.append((str(h[ID_HEADER]), None if key is None else bytes(key)))  # type: ignore[arg-type]
        return out
    finally:
        await conn.close()


async def _amqp_read_headers(topic: str) -> Letters:
    import aio_pika

    conn = await aio_pika.connect(AMQP_URL)
    try:
        q = await (await conn.channel()).declare_queue(topic, passive=True)
        out: Letters = []
        while (msg := await q.get(no_ack=True, fail=False)) is not None:
            h = {
                k: bytes(v) if isinstance(v, (bytes, bytearray)) else str(v).encode()
                for k, v in (msg.headers or {}).items()
            }
            out.append((h[ID_HEADER].decode(), h))
        return out
    finally:
        await conn.close()


async def _amqp_drop(topic: str) -> None:
    import aio_pika

    conn = await aio_pika.connect(AMQP_URL)
    try:
        for name in (topic, topic + ".dlq"):
            for kind in ("queue", "exchange"):
                ch = await conn.channel()
                with contextlib.suppress(Exception):
                    if kind == "queue":
                        await ch.queue_delete(name)
                    else:
                        await ch.exchange_delete(name)
                with contextlib.suppress(Exception):
                    await ch.close()
    finally:
        await conn.close()


def amqp_run(coro: Any) -> Any:
    return asyncio.run(coro)


def rabbitmq_harness() -> BrokerHarness:
    from zeroloss.brokers.rabbitmq import RabbitBroker

    return BrokerHarness(
        "rabbitmq",
        AMQP_URL,
        "amqp://guest:guest@127.0.0.1:5999/",
        lambda url=AMQP_URL, **kw: RabbitBroker(url, **{"timeout_s": 10.0, **kw}),
        lambda t: amqp_run(_amqp_read(t)),
        lambda t: amqp_run(_amqp_drop(t)),
        lambda t: amqp_run(_amqp_read_headers(t)),
    )


# -- NATS ---------------------------------------------------------------------------------------


async def _nats_read(topic: str) -> Entries:
    import nats

    from zeroloss.brokers.nats import stream_name

    nc = await nats.connect(NATS_URL)
    try:
        js = nc.jetstream()
        name = stream_name(topic)
        info = await js.stream_info(name)
        out: Entries = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(name, seq)
            h = msg.headers or {}
            key = h.get("zeroloss-key")
            out.append((h[ID_HEADER], None if key is None else base64.b64decode(key[4:])))
        return out
    finally:
        await nc.close()


async def _nats_read_headers(topic: str) -> Letters:
    import nats

    from zeroloss.brokers.nats import stream_name

    nc = await nats.connect(NATS_URL)
    try:
        js = nc.jetstream()
        name = stream_name(topic)
        info = await js.stream_info(name)
        out: Letters = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(name, seq)
            h = {
                k: base64.b64decode(v[4:]) if v.startswith("b64:") else v.encode()
                for k, v in (msg.headers or {}).items()
            }
            out.append((h[ID_HEADER].decode(), h))
        return out
    finally:
        await nc.close()


async def _nats_drop(topic: str) -> None:
    import nats

    from zeroloss.brokers.nats import stream_name

    nc = await nats.connect(NATS_URL)
    try:
        for t in (topic, topic + ".dlq"):
            with contextlib.suppress(Exception):
                await nc.jetstream().delete_stream(stream_name(t))
    finally:
        await nc.close()


def nats_harness() -> BrokerHarness:
    from zeroloss.brokers.nats import NatsBroker

    return BrokerHarness(
        "nats",
        NATS_URL,
        "nats://127.0.0.1:4999",
        lambda url=NATS_URL, **kw: NatsBroker(url, **{"timeout_s": 10.0, **kw}),
        lambda t: asyncio.run(_nats_read(t)),
        lambda t: asyncio.run(_nats_drop(t)),
        lambda t: asyncio.run(_nats_read_headers(t)),
    )


# -- Redis --------------------------------------------------------------------------------------


def _xrange(r: Any, topic: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """XRANGE of a client without decode_responses (redis-py types it for both)."""
    return cast(list[tuple[bytes, dict[bytes, bytes]]], r.xrange(topic))


def _redis_read(topic: str) -> Entries:
    import redis

    r = redis.Redis.from_url(REDIS_URL)
    try:
        return [(f[b"id"].decode(), f.get(b"key")) for _, f in _xrange(r, topic)]
    finally:
        r.close()


def _redis_read_headers(topic: str) -> Letters:
    import json

    import redis

    r = redis.Redis.from_url(REDIS_URL)
    try:
        out: Letters = []
        for _, f in _xrange(r, topic):
            h = {k: base64.b64decode(v) for k, v in json.loads(f.get(b"headers", b"[]"))}
            out.append((f[b"id"].decode(), h))
        return out
    finally:
        r.close()


def _redis_drop(topic: str) -> None:
    import redis

    r = redis.Redis.from_url(REDIS_URL)
    try:
        r.delete(topic, topic + ".dlq")
    finally:
        r.close()


def redis_harness() -> BrokerHarness:
    from zeroloss.brokers.redis import RedisStreamBroker

    return BrokerHarness(
        "redis",
        REDIS_URL,
        "redis://127.0.0.1:6999/0",
        lambda url=REDIS_URL, **kw: RedisStreamBroker(url, **{"timeout_s": 10.0, **kw}),
        _redis_read,
        _redis_drop,
        _redis_read_headers,
    )


# -- RocketMQ (tests/rocketmq_server.py) --------------------------------------------------------


def rocketmq_harness(url: str) -> BrokerHarness:
    """Topics are FIFO, made ahead (the server does not auto-create them), read back queue by queue
    with PULL_MESSAGE: each key's messages sit in one queue (its message group), in stored order."""
    from zeroloss.brokers._batch import value_bytes
    from zeroloss.brokers.rocketmq import RocketMQBroker
    from zeroloss.brokers.rocketmq_admin import RocketMQAdmin
    from zeroloss.brokers.rocketmq_fields import rocketmq_topic
    from zeroloss.brokers.rocketmq_url import parse_url

    admin = RocketMQAdmin.for_url(parse_url(url))

    def read(topic: str) -> Entries:
        out: Entries = []
        for m in admin.read_topic(rocketmq_topic(topic), group="zl-harness-reader"):
            key = m.properties.get("zeroloss-key")
            out.append((m.properties[ID_HEADER], None if key is None else value_bytes(key)))
        return out

    def read_headers(topic: str) -> Letters:
        return [
            (m.properties[ID_HEADER], {k: value_bytes(v) for k, v in m.properties.items()})
            for m in admin.read_topic(rocketmq_topic(topic), group="zl-harness-reader")
        ]

    def create(topic: str) -> None:
        admin.create_topics({rocketmq_topic(topic): "FIFO", rocketmq_topic(topic + ".dlq"): "FIFO"})

    def drop(topic: str) -> None:
        with contextlib.suppress(Exception):
            admin.delete_topics([rocketmq_topic(topic), rocketmq_topic(topic + ".dlq")])

    return BrokerHarness(
        "rocketmq",
        url,
        "rocketmq://127.0.0.1:18999?namesrv=127.0.0.1:19998",
        lambda url=url, **kw: RocketMQBroker(url, **{"timeout_s": 10.0, **kw}),
        read,
        drop,
        read_headers,
        create=create,
    )


# -- Kafka (the real three-broker cluster) -------------------------------------------------------


def _kafka_records(bootstrap: str, topic: str) -> list[Any]:
    """Every committed record of ``topic``, partition by partition (each partition in offset order)."""
    import time

    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"harness-{topic}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions

        def ends() -> dict[int, int]:
            return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}

        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        got: dict[int, list[Any]] = {p: [] for p in parts}
        deadline = time.monotonic() + 60
        want, seen = ends(), None
        # Read up to each partition's end; a transaction's commit marker takes the last offset,
        # so a partition is done when its next record would be at end - 1 or later. The ends are
        # read again before stopping, in case the first reading came from stale metadata.
        while want != seen:
            seen = want
            while any((got[p][-1].offset() + 1 if got[p] else 0) < want[p] - 1 for p in parts):
                assert time.monotonic() < deadline, f"reading {topic} back took over 60 s"
                for rec in c.consume(1000, 0.2):
                    if not rec.error():
                        got[cast(int, rec.partition())].append(rec)
            want = ends()
        return [rec for p in sorted(got) for rec in got[p]]
    finally:
        c.close()


def kafka_harness(url: str) -> BrokerHarness:
    from zeroloss.brokers.kafka import KafkaBroker, parse_bootstrap
    from zeroloss.embedded_broker import free_port

    bootstrap = parse_bootstrap(url)

    def read(topic: str) -> Entries:
        return [(dict(r.headers() or [])[ID_HEADER].decode(), r.key()) for r in _kafka_records(bootstrap, topic)]

    def read_headers(topic: str) -> Letters:
        out: Letters = []
        for r in _kafka_records(bootstrap, topic):
            h = dict(r.headers() or [])
            out.append((h[ID_HEADER].decode(), h))
        return out

    def drop(topic: str) -> None:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": bootstrap})
        for f in admin.delete_topics([topic, topic + ".dlq"], operation_timeout=10).values():
            with contextlib.suppress(Exception):
                f.result(15)

    def make(url: str = url, **kw: Any) -> Broker:
        import uuid

        return KafkaBroker(url, **{"transactional_id": f"harness-{uuid.uuid4().hex[:8]}", "timeout_s": 10.0, **kw})

    return BrokerHarness("kafka", url, f"kafka://127.0.0.1:{free_port()}", make, read, drop, read_headers)


HARNESSES: dict[str, Callable[[], BrokerHarness]] = {
    "rabbitmq": rabbitmq_harness,
    "nats": nats_harness,
    "redis": redis_harness,
}
# RabbitMQ, NATS, Redis and RocketMQ; Kafka's crash suites are test_relay_crash.py and test_consumer_crash.py.
OTHER_BROKERS = [pytest.param(n, id=n, marks=getattr(pytest.mark, n)) for n in (*HARNESSES, "rocketmq")]
BROKERS = [pytest.param("kafka", id="kafka", marks=pytest.mark.kafka_cluster), *OTHER_BROKERS]
# Brokers whose harness needs a URL from a fixture that starts (or reuses) the broker's processes.
FIXTURE_URLS: dict[str, Callable[[Any], str]] = {
    "kafka": lambda cluster: str(cluster.url),
    "rocketmq": lambda server: str(server.zeroloss_url),
}
FIXTURES = {"kafka": "kafka_cluster", "rocketmq": "rocketmq"}


def fixture_url(request: pytest.FixtureRequest, name: str) -> str | None:
    """The URL of broker ``name`` from its fixture (Kafka's cluster, the RocketMQ server), else None."""
    if name not in FIXTURES:
        return None
    return FIXTURE_URLS[name](request.getfixturevalue(FIXTURES[name]))


@contextlib.contextmanager
def harness(name: str, url: str | None = None) -> Iterator[BrokerHarness]:
    """The harness for ``name``; Kafka's and RocketMQ's need the ``url`` of their fixture's broker
    (:func:`fixture_url`)."""
    if name == "kafka":
        assert url is not None, "the kafka harness needs the cluster's URL"
        h = kafka_harness(url)
    elif name == "rocketmq":
        assert url is not None, "the rocketmq harness needs the server's URL (fixture rocketmq)"
        h = rocketmq_harness(url)
    else:
        require_service(name)
        h = HARNESSES[name]()
    try:
        yield h
    finally:
        for t in h.topics:
            h.drop(t)


def kafka_letters(bootstrap: str, topic: str) -> list[tuple[str, dict[str, bytes]]]:
    """(id, headers) of every record of ``topic``, read with a plain confluent-kafka consumer."""
    import time
    import uuid

    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"read-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    out: list[tuple[str, dict[str, bytes]]] = []
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        last_new = time.monotonic()
        while time.monotonic() - last_new < 2.0:  # the high watermark is not trusted on Tansu
            for rec in c.consume(100, 0.2):
                if rec.error() is None:
                    h = {k: v or b"" for k, v in cast(list[tuple[str, bytes]], rec.headers() or [])}
                    out.append((h[ID_HEADER].decode(), h))
                    last_new = time.monotonic()
    finally:
        c.close()
    return out
