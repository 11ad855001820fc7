"""One consumer contract, run against every broker: publish → consume → ack (exactly one effect
each, per-key order with one consumer), a republished id has no second effect, a crash mid-batch
loses nothing, a message that keeps failing is dead-lettered after max attempts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.broker_harness import harness, kafka_letters
from tests.conftest import require_service, unique_topic
from tests.effects_db import Db, make_db
from tests.embedded_kafka import FAST_GROUP
from zeroloss.brokers.base import Broker, Status
from zeroloss.brokers.subscription import Subscription
from zeroloss.consumer import Consumer, Received
from zeroloss.consumer import dead_letters as dlq
from zeroloss.message import ID_HEADER, Message, new_message
from zeroloss.registry import open_subscription


@dataclass
class Contract:
    name: str
    url: str
    make_broker: Callable[[], Broker]
    config: dict[str, Any]
    dead_letters: Callable[[str], list[tuple[str, dict[str, bytes]]]]  # (id, headers) on <topic>.dlq
    topics: list[str] = field(default_factory=list)
    prepare: Callable[[str], object] = lambda topic: None  # what must exist before publishing (RocketMQ)
    # Seconds before an unsettled message comes back to a new consumer: RocketMQ's revive runs every
    # few seconds even for a message given back at once.
    redelivery_s: float = 0.0

    def topic(self) -> str:
        t = unique_topic(f"ct-{self.name}")
        self.topics.append(t)
        self.prepare(t)
        return t

    def publish(self, msgs: list[Message]) -> None:
        b = self.make_broker()
        try:
            assert {o.status for o in b.publish(msgs)} == {Status.DELIVERED}
        finally:
            b.close()


@pytest.fixture(
    params=[
        pytest.param(n, id=n, marks=getattr(pytest.mark, n)) for n in ("kafka", "rabbitmq", "nats", "redis", "rocketmq")
    ]
)
def contract(request: pytest.FixtureRequest) -> Iterator[Contract]:
    name = request.param
    if name == "rocketmq":
        yield rocketmq_contract(request.getfixturevalue("rocketmq"))
        return
    if name == "kafka":
        from zeroloss.brokers.kafka import KafkaBroker

        k = request.getfixturevalue("kafka")
        yield Contract(
            name,
            k.url,
            lambda: KafkaBroker(k.url, timeout_s=15),
            dict(FAST_GROUP),
            lambda t: kafka_letters(k.bootstrap, t + ".dlq"),
        )
        return
    with harness(name) as h:
        config = {"rabbitmq": {}, "nats": {"ack_wait_s": 2.0}, "redis": {"claim_idle_s": 1.0, "claim_every_s": 0.2}}
        c = Contract(name, h.url, h.make, config[name], lambda t: h.read_headers(t + ".dlq"))
        try:
            yield c
        finally:
            h.topics.extend(c.topics)


def rocketmq_contract(server: Any) -> Contract:
    """Topics FIFO (per-key order needs a message group per key) and groups made per test; published
    with the plain client the way the relay writes (tests/rocketmq_plain.py); letters read back by
    the remoting-protocol reader."""
    from tests import rocketmq_plain
    from zeroloss.brokers.rocketmq_reader import RocketMQReader

    url = rocketmq_plain.url(server)

    def letters(topic: str) -> list[tuple[str, dict[str, bytes]]]:
        return [
            (s.id or "", {**dict(s.headers), ID_HEADER: (s.id or "").encode()})
            for s in RocketMQReader(url).read(topic + ".dlq")
        ]

    return Contract(
        "rocketmq",
        url,
        lambda: rocketmq_plain.PlainProducer(server),
        {"invisible_s": 10.0},
        letters,
        prepare=lambda t: rocketmq_plain.prepare(server, t),
        redelivery_s=3.0,
    )


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Db]:
    yield from make_db("sqlite", tmp_path)


def consumer(c: Contract, topic: str, db: Db, **kw: Any) -> Consumer:
    return Consumer(
        c.url, f"g-{topic}", [topic], db.inbox, config=dict(c.config), backoff_base_s=0.01, poll_s=0.2, **kw
    )


def test_publish_consume_ack_exactly_once_in_key_order(contract: Contract, db: Db) -> None:
    topic = contract.topic()
    msgs = [new_message(topic, b"%d" % i, key=b"k%d" % (i % 5)) for i in range(150)]
    contract.publish(msgs)
    c = consumer(contract, topic, db)
    c.handler(db.record)
    try:
        c.run_until_idle(idle_s=1.5, timeout_s=90)
        assert db.counts() == Counter({m.id: 1 for m in msgs})
        for key, ids in db.order().items():
            assert ids == [m.id for m in msgs if m.key == (key or "").encode()], f"key {key} out of order"
        # acked: the same group, started again, finds nothing to do
        again = consumer(contract, topic, db)
        again.handler(db.record)
        again.run_until_idle(idle_s=1.5, timeout_s=90)
        assert again.counters.processed == again.counters.duplicates == 0
    finally:
        c.close()


def test_a_republished_id_has_no_second_effect(contract: Contract, db: Db) -> None:
    topic = contract.topic()
    msgs = [new_message(topic, b"%d" % i, key=b"k") for i in range(20)]
    contract.publish(msgs)
    contract.publish(msgs[:5])  # the relay's at-least-once after a crash
    c = consumer(contract, topic, db)
    c.handler(db.record)
    try:
        c.run_until_idle(idle_s=1.5, timeout_s=90)
    finally:
        c.close()
    assert db.counts() == Counter({m.id: 1 for m in msgs})
    # NATS drops the copies in the stream (Nats-Msg-Id); the others deliver them and the inbox skips them
    assert c.counters.duplicates == (0 if contract.name == "nats" else 5)


class Crash(BaseException):
    """Stands in for the process dying mid-message: nothing after it runs (no commit, no ack)."""


def test_a_crash_mid_batch_loses_nothing_and_repeats_no_effect(contract: Contract, db: Db) -> None:
    topic = contract.topic()
    msgs = [new_message(topic, b"%d" % i, key=b"k%d" % (i % 3)) for i in range(40)]
    contract.publish(msgs)
    first = consumer(contract, topic, db)

    @first.handler
    def crash_at_20(msg: Received, tx: sa.Connection) -> None:
        if msg.id == msgs[20].id:
            raise Crash()
        db.record(msg, tx)

    with pytest.raises(Crash):
        first.run_until_idle(idle_s=1.5, timeout_s=90)
    first.close()
    assert msgs[20].id not in db.counts()
    second = consumer(contract, topic, db)
    second.handler(db.record)
    try:
        second.run_until_idle(idle_s=3.0 + contract.redelivery_s, timeout_s=90)
    finally:
        second.close()
    assert db.counts() == Counter({m.id: 1 for m in msgs})


def test_a_message_that_keeps_failing_is_dead_lettered_after_max_attempts(contract: Contract, db: Db) -> None:
    topic = contract.topic()
    msgs = [new_message(topic, b"%d" % i, key=b"k%d" % (i % 2)) for i in range(10)]
    bad = msgs[3]
    contract.publish(msgs)
    c = consumer(contract, topic, db, max_attempts=3)
    tries: Counter[str] = Counter()

    @c.handler
    def handle(msg: Received, tx: sa.Connection) -> None:
        tries[msg.id] += 1
        if msg.id == bad.id:
            raise ValueError("cannot handle this one")
        db.record(msg, tx)

    try:
        c.run_until_idle(idle_s=1.5, timeout_s=90)
    finally:
        c.close()
    assert tries[bad.id] == 3
    assert c.counters.dead_lettered == 1
    assert db.counts() == Counter({m.id: 1 for m in msgs if m is not bad})
    letters = contract.dead_letters(topic)
    assert [mid for mid, _ in letters] == [bad.id]
    # Every broker's letter carries zeroloss's error headers (RabbitMQ's used to carry only x-death).
    headers = letters[0][1]
    assert headers[dlq.H_ERROR_TYPE] == b"ValueError"
    assert headers[dlq.H_ERROR_MESSAGE] == b"cannot handle this one"
    assert headers[dlq.H_ATTEMPTS] == b"3"
    assert headers[dlq.H_ORIGINAL_TOPIC] == topic.encode()
    assert float(headers[dlq.H_FIRST_FAILURE]) > 0


def test_a_batch_handler_applies_each_effect_once_and_a_failing_message_is_found_alone(
    contract: Contract, db: Db
) -> None:
    topic = contract.topic()
    msgs = [new_message(topic, b"%d" % i, key=b"k%d" % (i % 3)) for i in range(60)]
    bad = msgs[17]
    contract.publish(msgs)
    c = consumer(contract, topic, db, max_attempts=2, transaction_batch=30)
    sizes: Counter[int] = Counter()

    @c.handler(batch=True)
    def handle(batch: list[Received], tx: sa.Connection) -> None:
        sizes[len(batch)] += 1
        for m in batch:
            db.record(m, tx)  # rolled back with the batch when one of it fails
        if any(m.id == bad.id for m in batch):
            raise ValueError("cannot handle this one")

    try:
        c.run_until_idle(idle_s=1.5 + contract.redelivery_s, timeout_s=90)
    finally:
        c.close()
    assert db.counts() == Counter({m.id: 1 for m in msgs if m is not bad})
    assert c.counters.dead_lettered == 1 and [mid for mid, _ in contract.dead_letters(topic)] == [bad.id]
    assert max(sizes) > 1  # runs were handled together
    for key, ids in db.order().items():
        assert ids == [m.id for m in msgs if m.key == (key or "").encode() and m is not bad], f"key {key} out of order"


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=getattr(pytest.mark, n)) for n in ("rabbitmq", "nats", "redis")]
)
def test_every_subscription_satisfies_the_protocol(name: str) -> None:
    from tests.broker_harness import HARNESSES

    with harness(name) as h:
        topic = unique_topic("proto")
        h.topics.append(topic)
        sub = open_subscription(HARNESSES[name]().url, f"g-{topic}", [topic])
        try:
            assert isinstance(sub, Subscription)
            assert sub.fetch(10, 0.2) == []
        finally:
            sub.close()


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=getattr(pytest.mark, n)) for n in ("rabbitmq", "nats", "redis")]
)
def test_a_consumer_waits_out_an_unreachable_broker(name: str, db: Db) -> None:
    from tests.broker_harness import HARNESSES

    require_service(name)
    c = Consumer(HARNESSES[name]().bad_url, "g-unreachable", ["t"], db.inbox, backoff_base_s=0.05, max_backoff_s=0.2)
    c.handler(db.record)
    c.run_for(1.0)  # keeps trying to subscribe, never raises, stops on time
    assert not c.assigned and db.counts() == Counter()


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=getattr(pytest.mark, n)) for n in ("rabbitmq", "nats", "redis")]
)
def test_key_value_and_headers_arrive_exactly_as_published(name: str) -> None:
    import time

    from tests.broker_harness import HARNESSES
    from zeroloss.message import ID_HEADER

    with harness(name) as h:
        topic = unique_topic("hdr")
        h.topics.append(topic)
        headers = [("bin", b"\x00\xff"), ("txt", "grüße".encode()), ("sp", b" x "), ("empty", b"")]
        msgs = [
            new_message(topic, b"\x00value", key=b"\xffkey", headers=headers),
            new_message(topic, b"", key=None),
            new_message(topic, b"v", key=b""),
        ]
        b = h.make()
        try:
            assert {o.status for o in b.publish(msgs)} == {Status.DELIVERED}
        finally:
            b.close()
        sub = open_subscription(HARNESSES[name]().url, f"g-{topic}", [topic])
        got: list[Any] = []
        try:
            deadline = time.monotonic() + 30
            while len(got) < len(msgs) and time.monotonic() < deadline:
                for d in sub.fetch(10, 0.5):
                    got.append(d)
                    sub.ack(d)
        finally:
            sub.close()
        by_id = {d.received.id: d for d in got}
        assert set(by_id) == {m.id for m in msgs}
        for m in msgs:
            r = by_id[m.id].received
            assert by_id[m.id].poison is None
            assert (r.topic, r.key, r.value) == (m.topic, m.key, m.value)
            got_headers = [(k, v) for k, v in r.headers if k != ID_HEADER]
            if name == "rabbitmq":  # an AMQP table keeps names and values, not their order
                got_headers, want = sorted(got_headers), sorted(m.headers)
            else:
                want = list(m.headers)
            assert got_headers == want


def _break(name: str, sub: Any) -> None:
    """Cut the subscription's link to the broker the way an outage would."""
    if name == "rabbitmq":
        sub._loop.run(sub._channel.close(), 10)
    elif name == "nats":
        sub.broker._loop.run(sub.broker._nc.close(), 10)
    else:
        sub._client.connection_pool.disconnect()


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=getattr(pytest.mark, n)) for n in ("rabbitmq", "nats", "redis")]
)
def test_a_lost_connection_mid_batch_is_resubscribed_without_loss_or_double_effect(
    name: str, db: Db, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zeroloss.consumer import runtime

    config = {"rabbitmq": {}, "nats": {"ack_wait_s": 2.0}, "redis": {"claim_idle_s": 1.0, "claim_every_s": 0.2}}
    with harness(name) as h:
        topic = unique_topic("cut")
        h.topics.append(topic)
        msgs = [new_message(topic, b"%d" % i, key=b"k%d" % (i % 3)) for i in range(60)]
        b = h.make()
        try:
            assert {o.status for o in b.publish(msgs)} == {Status.DELIVERED}
        finally:
            b.close()
        subs: list[Subscription] = []
        real_open = runtime.open_subscription  # type: ignore[attr-defined]

        def capture(*a: Any, **kw: Any) -> Subscription:
            subs.append(real_open(*a, **kw))
            return subs[-1]

        monkeypatch.setattr(runtime, "open_subscription", capture)
        c = Consumer(
            h.url,
            f"g-{topic}",
            [topic],
            db.inbox,
            config=config[name],
            backoff_base_s=0.05,
            max_backoff_s=0.2,
            batch_size=10,
        )

        @c.handler
        def handle(msg: Received, tx: sa.Connection) -> None:
            if msg.id == msgs[25].id and len(subs) == 1:
                _break(name, subs[0])  # after this handler's commit, its ack cannot go out
            db.record(msg, tx)

        try:
            c.run_until_idle(idle_s=3.0, timeout_s=90)
        finally:
            c.close()
    assert db.counts() == Counter({m.id: 1 for m in msgs})
    if name != "redis":  # redis-py reconnects by itself; the others subscribe again
        assert len(subs) >= 2


def test_sources_the_consumer_cannot_read_are_refused_up_front() -> None:
    from zeroloss.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot consume"):
        Consumer("mqtt://host", "g", ["t"], None)
    with pytest.raises(ConfigError, match="Kafka sources only"):
        Consumer("redis://127.0.0.1:1/0", "g", ["t"], None, transactional=True)


@pytest.mark.redis
@pytest.mark.postgres
def test_foreign_ids_no_inbox_can_tell_apart_or_store_are_dead_lettered(tmp_path: Path) -> None:
    """Two foreign ids that are not UTF-8 used to be decoded with replacement characters into the
    same string — the second skipped as the first's duplicate, lost; a NUL in an id failed every
    claim on PostgreSQL, taken for an outage and retried forever. Each is a dead letter now, and
    what comes after them is processed."""
    import redis

    from tests.broker_harness import HARNESSES
    from tests.test_consumer import stopped_after

    with harness("redis") as h:
        topic = unique_topic("ids")
        h.topics.append(topic)
        r = redis.Redis.from_url(HARNESSES["redis"]().url)
        try:
            for raw in (b"\xff-1", b"\xfe-1", b"order\x00-2"):
                r.xadd(topic, {b"id": raw, b"value": b"foreign"})
        finally:
            r.close()
        after = new_message(topic, b"after")
        b = h.make()
        try:
            assert {o.status for o in b.publish([after])} == {Status.DELIVERED}
        finally:
            b.close()
        for db in make_db("postgresql", tmp_path):
            c = Consumer(
                h.url,
                f"g-{topic}",
                [topic],
                db.inbox,
                config={"claim_idle_s": 1.0, "claim_every_s": 0.2},
                backoff_base_s=0.01,
                poll_s=0.2,
            )
            c.handler(db.record)
            try:
                with stopped_after(c, 60):
                    c.run_until_idle(idle_s=1.5, timeout_s=60)
            finally:
                c.close()
            assert db.counts() == Counter({after.id: 1})
            assert c.counters.dead_lettered == 3 and c.counters.duplicates == 0
            letters = h.read_headers(topic + ".dlq")
            assert len(letters) == 3 and all(mid.startswith(f"{topic}/") for mid, _ in letters)
            assert all(hs[dlq.H_ERROR_TYPE] == b"MessageError" for _, hs in letters)


def test_ids_are_checked_where_a_delivery_is_made() -> None:
    """RabbitMQ's message_id, NATS's Nats-Msg-Id (str) and Redis's id field (bytes) all go
    through check_id: what no inbox can store becomes poison under the fallback id."""
    from zeroloss.brokers.subscription import check_id

    assert check_id(None, "t/1") == ("t/1", None)
    assert check_id("abc", "t/1") == check_id(b"abc", "t/1") == ("abc", None)
    for bad in ("a\x00b", "", "x" * 256, b"\xff1", "x\ud800y", b"a\x00b"):
        mid, why = check_id(bad, "t/1")
        assert mid == "t/1" and why, bad
