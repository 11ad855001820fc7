"""The Kafka (three-broker cluster), RabbitMQ, NATS JetStream, Redis Streams and RocketMQ adapters against
the real services: relay delivery in key order, outages that spend no attempts, unroutable or
invalid destinations, dedup."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.broker_harness import BROKERS, BrokerHarness, by_key, fixture_url, harness
from tests.conftest import OutboxHarness, unique_topic
from tests.waiting import wait_until
from zeroloss.brokers._batch import publish_in_waves, text_value, value_bytes, waves
from zeroloss.brokers._loop import LoopThread
from zeroloss.brokers.base import Broker, Outcome, Status
from zeroloss.brokers.redis import decode_headers, entry_fields
from zeroloss.errors import BrokerError, ConfigError
from zeroloss.message import Message, new_message
from zeroloss.outbox.base import State
from zeroloss.registry import open_broker
from zeroloss.relay import Relay, RelaySettings

FAST = RelaySettings(batch_size=100, backoff_base_s=0.01, max_backoff_s=0.05, idle_wait_s=0.01, max_attempts=3)


@pytest.fixture(params=BROKERS)
def target(request: pytest.FixtureRequest) -> Iterator[BrokerHarness]:
    with harness(request.param, fixture_url(request, request.param)) as h:
        yield h


def topic_for(h: BrokerHarness, prefix: str = "pub") -> str:
    return h.new_topic(unique_topic(prefix))


# -- no service needed ---------------------------------------------------------------------------


def test_waves_put_the_nth_message_of_every_key_in_wave_n() -> None:
    ms = [new_message("t", b"%d" % i, key=k) for i, k in enumerate([b"a", b"b", b"a", None, b"a", None])]
    assert [[m.value for m in w] for w in waves(ms)] == [[b"0", b"1", b"3", b"5"], [b"2"], [b"4"]]


def test_a_failure_holds_the_rest_of_its_key_and_nothing_else() -> None:
    ms = [new_message("t", b"%d" % i, key=k) for i, k in enumerate([b"a", b"b", b"a", b"b", b"a"])]
    sent: list[bytes] = []

    async def send(m: Message) -> Outcome:
        sent.append(m.value)
        return Outcome(m, Status.RETRY if m.value == b"2" else Status.DELIVERED)

    out = asyncio.run(publish_in_waves(ms, send, time.monotonic() + 30))  # asyncio's clock is monotonic
    assert [o.status for o in out] == [Status.DELIVERED, Status.DELIVERED, Status.RETRY, Status.DELIVERED, Status.HELD]
    assert b"4" not in sent  # never even sent


def test_text_header_values_round_trip_exactly() -> None:
    for raw in (b"plain", b"", b"\x00\xff", "grüße".encode(), b"b64:looks-encoded", b" padded ", b"line\nbreak"):
        assert value_bytes(text_value(raw)) == raw
    assert text_value(b"plain") == "plain"
    m = new_message("t", b"v", key=b"k", headers=[("a", b"\x00"), ("b", b"x")])
    assert decode_headers(entry_fields(m)[b"headers"]) == m.headers


def test_the_loop_thread_runs_coroutines_and_times_out() -> None:
    lt = LoopThread("test-loop")
    try:
        assert lt.run(asyncio.sleep(0, result=7), 5) == 7
        with pytest.raises(TimeoutError):
            lt.run(asyncio.sleep(30), 0.1)
        assert lt.run(asyncio.sleep(0, result=1), 5) == 1  # still usable after a timeout
    finally:
        lt.close()
    with pytest.raises(RuntimeError):
        lt.run(asyncio.sleep(0), 1)


def test_the_registry_opens_each_scheme_without_connecting() -> None:
    from zeroloss.brokers.nats import NatsBroker
    from zeroloss.brokers.rabbitmq import RabbitBroker
    from zeroloss.brokers.redis import RedisStreamBroker
    from zeroloss.brokers.rocketmq import RocketMQBroker

    for url, cls in (
        ("amqp://u:p@127.0.0.1:1/", RabbitBroker),
        ("nats://127.0.0.1:1", NatsBroker),
        ("redis://127.0.0.1:1/0", RedisStreamBroker),
        ("rocketmq://127.0.0.1:1", RocketMQBroker),
    ):
        b = open_broker(url, timeout_s=1)
        try:
            assert isinstance(b, cls) and isinstance(b, Broker)
        finally:
            b.close()
    with pytest.raises(ConfigError, match="amqp"):
        open_broker("mqtt://x")


# -- against the services ------------------------------------------------------------------------


@pytest.mark.parametrize("outbox", ["spool", "sqlite"], indirect=True)
def test_relay_delivers_everything_in_key_order(outbox: OutboxHarness, target: BrokerHarness) -> None:
    topic = topic_for(target)
    n = 400
    ids = [outbox.add(topic=topic, value=b"%d" % i, key=b"k%d" % (i % 7)) for i in range(n)]
    broker = target.make()
    try:
        Relay(outbox.store, broker, FAST).drain(timeout_s=120)
    finally:
        broker.close()
    stats = outbox.store.stats()
    assert stats.counts[State.SUCCESS] == n
    assert stats.counts[State.FAILED] == stats.counts[State.PENDING] == 0
    entries = target.read(topic)
    assert sorted(mid for mid, _ in entries) == sorted(ids)  # everything, once
    for key, got in by_key(entries).items():
        assert got == [ids[i] for i in range(n) if b"k%d" % (i % 7) == key], f"key {key!r} out of order"


def test_a_batch_reports_every_message_with_a_location(target: BrokerHarness) -> None:
    topic = topic_for(target)
    msgs = [
        new_message(
            topic, b"v%d" % i, key=None if i % 5 == 0 else b"k%d" % (i % 3), headers={"h": b"\x00\xff", "t": b"text"}
        )
        for i in range(200)
    ]
    broker = target.make()
    try:
        assert isinstance(broker, Broker)
        outcomes = broker.publish(msgs)
        assert broker.publish([]) == []
    finally:
        broker.close()
    assert [o.message.id for o in outcomes] == [m.id for m in msgs]
    assert {o.status for o in outcomes} == {Status.DELIVERED}
    assert all(o.location for o in outcomes)
    entries = target.read(topic)
    for key, got in by_key(entries).items():
        assert got == [m.id for m in msgs if m.key == key], f"key {key!r} out of order"
    assert {mid for mid, _ in entries} == {m.id for m in msgs}


@pytest.mark.parametrize("outbox", ["spool", "sqlite"], indirect=True)
def test_an_unreachable_broker_is_a_broker_error_and_the_relay_spends_no_attempts(
    outbox: OutboxHarness, target: BrokerHarness
) -> None:
    topic = topic_for(target)
    broker = target.make(target.bad_url, timeout_s=3.0)
    try:
        with pytest.raises(BrokerError) as err:
            broker.publish([new_message(topic, b"x")])
        assert err.value.retriable
        mid = outbox.add(topic=topic, value=b"v", key=b"k")
        relay = Relay(outbox.store, broker, FAST)
        relay.run_once()
    finally:
        broker.close()
    state, msg = outbox.store.get(mid)
    assert state is State.PENDING
    assert msg.attempts == 0 and msg.last_error
    assert relay.counters.broker_errors == 1
    # and once the broker answers, it goes
    good = target.make()
    try:
        relay = Relay(outbox.store, good, FAST)
        relay.drain(timeout_s=60)
    finally:
        good.close()
    assert outbox.store.get(mid)[0] is State.SUCCESS
    assert [m for m, _ in target.read(topic)] == [mid]


# -- what each broker does with a destination it cannot use -------------------------------------


@pytest.mark.rabbitmq
def test_rabbitmq_unroutable_is_retry_with_the_reason_and_the_binding_comes_back() -> None:
    import aio_pika

    with harness("rabbitmq") as h:
        topic = topic_for(h)
        broker = h.make()
        try:
            assert broker.publish([new_message(topic, b"first")])[0].status is Status.DELIVERED

            async def unbind() -> None:
                conn = await aio_pika.connect(h.url)
                async with conn:
                    ch = await conn.channel()
                    q = await ch.declare_queue(topic, passive=True)
                    await q.unbind(topic)

            asyncio.run(unbind())
            lost = new_message(topic, b"unroutable", key=b"A")
            after = new_message(topic, b"after", key=b"A")
            out = broker.publish([lost, after])
            assert out[0].status is Status.RETRY and "unroutable" in (out[0].error or "")
            assert out[1].status is Status.HELD
            again = broker.publish([lost, after])  # topology declared again: bound again
            assert [o.status for o in again] == [Status.DELIVERED, Status.DELIVERED]
        finally:
            broker.close()
        ids = [i for i, _ in h.read(topic)]
        assert ids[-2:] == [lost.id, after.id] and len(ids) == 3


@pytest.mark.rabbitmq
def test_rabbitmq_topology_conflict_is_rejected_and_declares_quorum_queues_with_a_dlq() -> None:
    import aio_pika

    with harness("rabbitmq") as h:
        clash, fine = topic_for(h, "clash"), topic_for(h, "fine")

        async def classic_queue() -> None:
            conn = await aio_pika.connect(h.url)
            async with conn:
                ch = await conn.channel()
                await ch.declare_queue(clash, durable=True)  # a classic queue of the same name

        asyncio.run(classic_queue())
        broker = h.make()
        try:
            out = broker.publish(
                [
                    new_message(clash, b"x", key=b"A"),
                    new_message(clash, b"y", key=b"A"),
                    new_message(fine, b"z", key=b"A"),
                ]
            )
        finally:
            broker.close()
        assert out[0].status is Status.REJECTED and "topology conflict" in (out[0].error or "")
        assert out[1].status is Status.HELD and out[2].status is Status.HELD

        async def check() -> None:
            conn = await aio_pika.connect(h.url)
            async with conn:
                ch = await conn.channel()
                # re-declaring with exactly our arguments succeeds only if they are what we set
                from zeroloss.brokers.rabbitmq import declare_topology

                await declare_topology(ch, fine, 20)
                await ch.declare_queue(fine + ".dlq", passive=True)

        asyncio.run(check())


@pytest.mark.nats
def test_nats_drops_a_republished_id_within_the_dedup_window() -> None:
    with harness("nats") as h:
        topic = topic_for(h)
        msgs = [new_message(topic, b"v%d" % i, key=b"k") for i in range(20)]
        broker = h.make()
        try:
            first = broker.publish(msgs)
            second = broker.publish(msgs[5:])  # a relay that crashed before marking them
        finally:
            broker.close()
        assert {o.status for o in first + second} == {Status.DELIVERED}
        assert [o.location for o in second] == [o.location for o in first[5:]]  # the originals' sequences
        assert [i for i, _ in h.read(topic)] == [m.id for m in msgs]

        async def config() -> tuple[float, str]:
            import nats

            from zeroloss.brokers.nats import stream_name

            nc = await nats.connect(h.url)
            try:
                info = await nc.jetstream().stream_info(stream_name(topic))
                return info.config.duplicate_window, str(getattr(info.config.storage, "value", info.config.storage))
            finally:
                await nc.close()

        assert asyncio.run(config()) == (300.0, "file")


@pytest.mark.nats
def test_nats_subject_owned_by_another_stream_is_rejected() -> None:
    import nats

    with harness("nats") as h:
        base = topic_for(h, "ovl")
        foreign = "FOREIGN_" + base.replace("-", "_")

        async def make_foreign() -> None:
            nc = await nats.connect(h.url)
            try:
                await nc.jetstream().add_stream(name=foreign, subjects=[base + ".*"])
            finally:
                await nc.close()

        async def drop_foreign() -> None:
            nc = await nats.connect(h.url)
            try:
                await nc.jetstream().delete_stream(foreign)
            finally:
                await nc.close()

        asyncio.run(make_foreign())
        try:
            broker = h.make()
            try:
                out = broker.publish(
                    [
                        new_message(base + ".x", b"a", key=b"A"),
                        new_message(base, b"b", key=b"A"),
                        new_message(base, b"c", key=b"B"),
                    ]
                )
            finally:
                broker.close()
        finally:
            asyncio.run(drop_foreign())
        assert out[0].status is Status.REJECTED and "another stream" in (out[0].error or "")
        assert [o.status for o in out[1:]] == [Status.HELD, Status.DELIVERED]


@pytest.mark.redis
def test_redis_key_of_another_type_is_rejected_and_its_key_held() -> None:
    import redis

    with harness("redis") as h:
        clash, fine = topic_for(h, "clash"), topic_for(h, "fine")
        r = redis.Redis.from_url(h.url)
        try:
            r.set(clash, b"not a stream")
            broker = h.make()
            try:
                out = broker.publish(
                    [
                        new_message(clash, b"a", key=b"A"),
                        new_message(fine, b"b", key=b"A"),
                        new_message(fine, b"c", key=b"B"),
                    ]
                )
            finally:
                broker.close()
        finally:
            r.delete(clash)
            r.close()
        assert out[0].status is Status.REJECTED and "WRONGTYPE" in (out[0].error or "")
        assert [o.status for o in out[1:]] == [Status.HELD, Status.DELIVERED]
        assert [i for i, _ in h.read(fine)] == [out[2].message.id]


# -- Kafka: what the real cluster refuses --------------------------------------------------------


@pytest.mark.kafka_cluster
def test_kafka_a_record_too_large_is_rejected_and_holds_only_its_key(kafka_cluster: Any) -> None:
    with harness("kafka", kafka_cluster.url) as h:
        topic = topic_for(h)
        big = new_message(topic, b"x" * 2_000_000, key=b"A")  # over the broker's 1 MB max.message.bytes
        after, other = new_message(topic, b"after", key=b"A"), new_message(topic, b"other", key=b"B")
        broker = h.make()
        try:
            out = broker.publish([big, after, other])
        finally:
            broker.close()
        assert [o.status for o in out] == [Status.REJECTED, Status.HELD, Status.DELIVERED]
        assert "MSG_SIZE_TOO_LARGE" in (out[0].error or "")
        assert [i for i, _ in h.read(topic)] == [other.id]


@pytest.mark.kafka_cluster
@pytest.mark.parametrize("outbox", ["sqlite"], indirect=True)
def test_kafka_in_sync_replicas_below_the_minimum_is_an_outage_that_spends_no_attempts(
    kafka_cluster: Any, outbox: OutboxHarness
) -> None:
    """min.insync.replicas=2 with one of two replicas down: the broker refuses acks=all writes
    (NOT_ENOUGH_REPLICAS) and nothing is written; the relay backs off and the message waits."""
    from confluent_kafka.admin import NewTopic

    with harness("kafka", kafka_cluster.url) as h:
        topic = topic_for(h)
        leader = 1
        follower = 2
        kafka_cluster.admin().create_topics(
            [
                NewTopic(
                    topic,
                    num_partitions=1,
                    replica_assignment=[[leader, follower]],
                    config={"min.insync.replicas": "2"},
                )
            ]
        )[topic].result(30)
        mid = outbox.add(topic=topic, value=b"v", key=b"k")
        kafka_cluster.kill(follower)
        try:
            deadline = time.monotonic() + 60
            while kafka_cluster.replicas_of(topic, 0)[1] != [leader]:
                assert time.monotonic() < deadline, "the ISR never shrank to the leader"
                time.sleep(0.2)
            broker = h.make(timeout_s=3.0)
            try:
                relay = Relay(outbox.store, broker, FAST)
                relay.run_once()
                ready, why = relay.readiness()
            finally:
                broker.close()
            state, msg = outbox.store.get(mid)
            assert state is State.PENDING and msg.attempts == 0
            assert relay.counters.broker_errors == 1
            assert not ready and "NOT_ENOUGH_REPLICAS" in why, why
            assert "NOT_ENOUGH_REPLICAS" in (outbox.store.stats().oldest_pending_error or "")  # status says it too
        finally:
            kafka_cluster.restart(follower)
        broker = h.make()
        try:
            Relay(outbox.store, broker, FAST).drain(timeout_s=60)
        finally:
            broker.close()
        assert outbox.store.get(mid)[0] is State.SUCCESS
        # read_committed: the transaction's commit marker reaches the restarted follower a moment
        # after the ack, and a reader asking it first sees the partition empty (a CI check did)
        wait_until(lambda: [m for m, _ in h.read(topic)] == [mid], 30, f"{mid} read back from {topic}")


# -- RocketMQ: what the broker and the client refuse, and what is not SEND_OK ---------------------


def test_rocketmq_urls_name_the_proxy_the_name_server_and_credentials() -> None:
    from zeroloss.brokers.rocketmq_fields import rocketmq_topic
    from zeroloss.brokers.rocketmq_url import parse_url

    u = parse_url("rocketmq://127.0.0.1:18081?namesrv=127.0.0.1:19876")
    assert (u.endpoint, u.namesrv, u.cluster, u.access_key) == ("127.0.0.1:18081", "127.0.0.1:19876", None, "")
    u = parse_url("rocketmq://ak:s%2Fk@mq.example")  # RocketMQ's default ports: proxy 8081, name server 9876
    assert (u.endpoint, u.namesrv, u.access_key, u.secret_key) == ("mq.example:8081", "mq.example:9876", "ak", "s/k")
    assert parse_url("rocketmq://h:1?namesrv=a:1;b:2&cluster=C").cluster == "C"
    for bad, why in (
        ("kafka://h:1", "not a RocketMQ URL"),
        ("rocketmq://h:1?queues=3", "unknown setting"),
        ("rocketmq://h:1?namesrv=a:b", "HOST:PORT"),
        ("rocketmq://:1", "no proxy host"),
        ("rocketmq://h:x", "bad port"),
    ):
        with pytest.raises(ConfigError, match=why):
            parse_url(bad)
    assert rocketmq_topic("orders.dlq") == "orders_dlq"  # RocketMQ allows no '.' in a topic name
    with pytest.raises(ValueError, match="cannot be a RocketMQ topic"):
        rocketmq_topic("x" * 200)  # zeroloss allows 249 characters, RocketMQ 127


def test_rocketmq_what_is_not_send_ok_is_never_delivered() -> None:
    """The proxy turns FLUSH_DISK_TIMEOUT, FLUSH_SLAVE_TIMEOUT and SLAVE_NOT_AVAILABLE into these
    codes and the client raises them; they are the broker's state: broker-wide, no attempt spent.
    (A real broker that times out its flush cannot be had on demand: the client's own exceptions.)"""
    from rocketmq.v5.exception import (
        BadRequestException,
        InternalErrorException,
        NotFoundException,
        ProxyTimeoutException,
        TooManyRequestsException,
    )

    from zeroloss.brokers._batch import BrokerWide
    from zeroloss.brokers.rocketmq import RocketMQBroker

    b = RocketMQBroker("rocketmq://127.0.0.1:1", timeout_s=3)
    m = new_message("t", b"v", key=b"k")
    try:
        for exc, name in (
            (ProxyTimeoutException("flush", 50401), "FLUSH_DISK_TIMEOUT"),
            (ProxyTimeoutException("slave", 50402), "FLUSH_SLAVE_TIMEOUT"),
            (InternalErrorException("ha", 50002), "SLAVE_NOT_AVAILABLE"),
            (TooManyRequestsException("busy", 42900), "TOO_MANY_REQUESTS"),
            (OSError("reset"), "reset"),
        ):
            with pytest.raises(BrokerWide, match=name):
                b._failed(m, exc)
        assert b._failed(m, BadRequestException("bad property", 40015)).status is Status.REJECTED
        assert b._failed(m, NotFoundException("no topic", 40402)).status is Status.RETRY
    finally:
        b.close()


@pytest.mark.rocketmq
def test_rocketmq_refusals_hold_only_their_key(rocketmq: Any) -> None:
    """A missing topic is RETRY (init creates it), an empty body and a topic name RocketMQ cannot
    have are REJECTED, a TRANSACTION topic refuses the relay's messages; each holds its key only."""
    with harness("rocketmq", rocketmq.zeroloss_url) as h:
        fine = topic_for(h, "fine")
        missing = unique_topic("missing")
        tx = unique_topic("tx")
        h.topics.append(tx)
        rocketmq.create_topic(tx, "TRANSACTION")
        msgs = [
            new_message(missing, b"a", key=b"A"),
            new_message(fine, b"a2", key=b"A"),
            new_message(fine, b"", key=b"B"),
            new_message(fine, b"b2", key=b"B"),
            new_message("x" * 200, b"c", key=b"C"),
            new_message(tx, b"d", key=b"D"),
            new_message(fine, b"e", key=b"E"),
            new_message(fine, b"f", key=None, headers={"h": b""}),
        ]
        broker = h.make()
        try:
            out = broker.publish(msgs)
        finally:
            broker.close()
        assert [o.status for o in out] == [
            Status.RETRY,
            Status.HELD,
            Status.REJECTED,
            Status.HELD,
            Status.REJECTED,
            Status.REJECTED,
            Status.DELIVERED,
            Status.DELIVERED,
        ]
        assert "does not exist" in (out[0].error or "") and "zeroloss init" in (out[0].error or "")
        assert "empty body" in (out[2].error or "")
        assert "cannot be a RocketMQ topic" in (out[4].error or "")
        assert "message type" in (out[5].error or "")
        assert sorted(i for i, _ in h.read(fine)) == sorted(m.id for m in msgs[6:])
        letters = dict(h.read_headers(fine))
        assert letters[msgs[7].id]["h"] == b"" and letters[msgs[6].id]["zeroloss-key"] == b"E"


@pytest.mark.rocketmq
def test_rocketmq_a_normal_topic_takes_keyed_messages_without_order(
    rocketmq: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with harness("rocketmq", rocketmq.zeroloss_url) as h:
        topic = unique_topic("normal")
        h.topics.append(topic)
        rocketmq.create_topic(topic, "NORMAL")
        msgs = [new_message(topic, b"%d" % i, key=b"k") for i in range(3)]
        broker = h.make()
        try:
            out = broker.publish(msgs)
        finally:
            broker.close()
        assert {o.status for o in out} == {Status.DELIVERED}
        assert "is NORMAL, not FIFO" in caplog.text
        assert sorted(i for i, _ in h.read(topic)) == sorted(m.id for m in msgs)


@pytest.mark.rocketmq
def test_rocketmq_location_finds_the_message_by_its_id(rocketmq: Any) -> None:
    """The location is topic/message-id/queue-offset; the broker finds the message by that id and
    by our id (a message key), at that offset."""
    from zeroloss.brokers.rocketmq_admin import RocketMQAdmin

    with harness("rocketmq", rocketmq.zeroloss_url) as h:
        topic = topic_for(h, "loc")
        broker = h.make()
        try:
            (out,) = broker.publish([new_message(topic, b"v", key=b"k")])
        finally:
            broker.close()
        assert out.location is not None
        name, mid, offset = out.location.split("/")
        admin = RocketMQAdmin(rocketmq.namesrv_addr)
        deadline = time.monotonic() + 30
        while not (found := admin.query_messages(name, mid, unique=True)):  # the index is written asynchronously
            assert time.monotonic() < deadline, "the broker never indexed the message"
            time.sleep(0.1)
        assert [(m.properties["zeroloss-id"], m.queue_offset) for m in found] == [(out.message.id, int(offset))]
        assert [m.message_id for m in admin.query_messages(name, out.message.id)] == [mid]


def test_rocketmq_interrupt_cuts_a_publish_to_a_proxy_that_never_answers() -> None:
    """A listener that takes connections and says nothing (a hung proxy): interrupt() makes the
    publish give up with a retriable BrokerError long before its 30 s timeout would."""
    import socket
    import threading

    from zeroloss.brokers.base import Interruptible
    from zeroloss.brokers.rocketmq import RocketMQBroker

    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)  # the kernel completes the handshakes; nobody ever reads or writes
        broker = RocketMQBroker(f"rocketmq://127.0.0.1:{hole.getsockname()[1]}", timeout_s=30)
        assert isinstance(broker, Interruptible)
        errors: list[BaseException] = []

        def publish() -> None:
            try:
                broker.publish([new_message("t", b"v", key=b"k")])
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=publish)
        t.start()
        try:
            conn, _ = hole.accept()  # the client connected: the publish is in flight, waiting for an answer
            broker.interrupt()
            t.join()
            conn.close()
        finally:
            broker.close()
        assert len(errors) == 1 and isinstance(errors[0], BrokerError) and errors[0].retriable
        assert "interrupted" in str(errors[0])
        with pytest.raises(BrokerError, match="interrupted"):  # and every later publish
            broker.publish([new_message("t", b"v")])


@pytest.mark.rocketmq
def test_rocketmq_a_reserved_property_is_rejected_and_any_key_becomes_a_group(rocketmq: Any) -> None:
    """A header named like one of RocketMQ's system properties is refused by the proxy (REJECTED);
    a key of any length or bytes still makes a valid message group (a digest past 63 characters)."""
    with harness("rocketmq", rocketmq.zeroloss_url) as h:
        topic = topic_for(h, "props")
        long_key = b"a key with spaces " * 10
        msgs = [
            new_message(topic, b"a", key=b"A", headers={"KEYS": b"x"}),
            new_message(topic, b"b", key=long_key),
            new_message(topic, b"c", key=long_key),
            new_message(topic, b"d", key=b"\x00\xff"),
        ]
        broker = h.make()
        try:
            out = broker.publish(msgs)
        finally:
            broker.close()
        assert [o.status for o in out] == [Status.REJECTED, Status.DELIVERED, Status.DELIVERED, Status.DELIVERED]
        assert "property is used by system: KEYS" in (out[0].error or "")
        assert by_key(h.read(topic)) == {long_key: [msgs[1].id, msgs[2].id], b"\x00\xff": [msgs[3].id]}


def test_rocketmq_the_clients_failed_heartbeat_callbacks_are_not_logged_as_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While the proxy is down the client's heartbeat callback raises every 10 s and
    concurrent.futures logs a gRPC traceback as an ERROR: dropped; other errors there still show."""
    import logging

    import grpc

    from zeroloss.brokers.rocketmq_client import rocketmq_module

    rocketmq_module()
    down = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "refused")
    futures_log = logging.getLogger("concurrent.futures")
    with caplog.at_level(logging.ERROR):
        futures_log.error("exception calling callback for %r", "<Future>", exc_info=(type(down), down, None))
        futures_log.error("exception calling callback for %r", "<Future>", exc_info=(ValueError, ValueError("x"), None))
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [ValueError]
