"""Non-blocking retries through ``<topic>.retry.<n>`` delay topics, against the embedded broker."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import unique_topic
from tests.effects_db import Db, make_db
from tests.embedded_kafka import FAST_GROUP, consumer, publish
from zeroloss import dlq
from zeroloss.consumer import Consumer, PoisonMessage, Received
from zeroloss.consumer.retry_topics import H_ATTEMPTS, H_NOT_BEFORE, H_ORIGINAL_TOPIC, origin, retry_copy, retry_pattern
from zeroloss.embedded_broker import EmbeddedBroker
from zeroloss.errors import ConfigError
from zeroloss.message import new_message
from zeroloss.readback import read_topic

pytestmark = pytest.mark.kafka_cluster


@pytest.fixture
def kafka(kafka_cluster: Any) -> Any:
    """This suite runs on the real three-broker Apache Kafka cluster (RF 3, min ISR 2)."""
    return kafka_cluster


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Db]:
    yield from make_db("sqlite", tmp_path)


def test_origin_reads_retry_headers_only_on_this_consumers_retry_topics() -> None:
    at = origin("orders", 2, 40, (), 3)
    assert (at.topic, at.partition, at.offset, at.stage, at.attempts, at.not_before_ms) == ("orders", 2, 40, 0, 0, 0)
    copy = retry_copy(
        message_id="m1",
        key=b"k",
        value=b"v",
        headers=(("trace", b"t"),),
        at=at,
        group="billing",
        attempts=1,
        first_failure=100.0,
        error=ValueError("boom"),
        delay_s=2.5,
        now=1000.0,
    )
    assert copy.topic == "orders.retry.1" and copy.id == "m1" and copy.key == b"k"
    h = dict(copy.headers)
    assert h["trace"] == b"t" and h[H_ATTEMPTS] == b"1" and h[H_NOT_BEFORE] == b"1002500"
    later = origin("orders.retry.1", 0, 7, copy.headers, 3)
    assert (later.topic, later.partition, later.offset, later.stage, later.attempts) == ("orders", 2, 40, 1, 1)
    assert later.first_failure == 100.0 and later.not_before_ms == 1002500 and later.group == "billing"
    # a dead letter replayed to the original topic starts afresh; so does a consumer without stages
    assert origin("orders", 0, 1, copy.headers, 3).attempts == 0
    assert origin("orders.retry.1", 0, 1, copy.headers, 0).stage == 0
    # a stage the configuration no longer has (it shrank from 4 to 3 stages) counts as the last one
    assert origin("orders.retry.4", 0, 1, copy.headers, 3).stage == 3
    # the next copy replaces the retry headers instead of piling them up
    again = retry_copy(
        message_id="m1",
        key=b"k",
        value=b"v",
        headers=copy.headers,
        at=later,
        group="billing",
        attempts=2,
        first_failure=100.0,
        error=ValueError("boom"),
        delay_s=1,
        now=2000.0,
    )
    assert again.topic == "orders.retry.2"
    assert [k for k, _ in again.headers].count(H_ATTEMPTS) == 1 and dict(again.headers)[H_ORIGINAL_TOPIC] == b"orders"


def test_retry_topics_are_refused_where_they_cannot_work(kafka: EmbeddedBroker) -> None:
    with pytest.raises(ConfigError, match="Kafka sources only"):
        Consumer("redis://127.0.0.1:6379/0", "g", ["t"], None, retry_delays_s=(1,))
    with pytest.raises(ConfigError, match="0 or more seconds"):
        Consumer(kafka.url, "g", ["t"], None, retry_delays_s=(1, -2))


def test_a_failing_message_waits_on_retry_topics_while_its_partition_flows(kafka: EmbeddedBroker, db: Db) -> None:
    topic = unique_topic("rt")
    msgs = [new_message(topic, b"ok-%d" % i, key=b"same") for i in range(30)]
    flaky = msgs[2] = new_message(topic, b"flaky", key=b"same")  # fails twice, then works
    broken = msgs[5] = new_message(topic, b"broken", key=b"same")  # fails every time
    publish(kafka.url, msgs)
    runs: dict[str, list[tuple[float, int]]] = {}
    lock = threading.Lock()
    c = consumer(kafka, topic, db.inbox, retry_delays_s=(0.5, 1.0))

    @c.handler
    def handle(msg: Received, tx: sa.Connection) -> None:
        with lock:
            runs.setdefault(msg.id, []).append((time.monotonic(), msg.attempts))
        if msg.value == b"broken" or (msg.value == b"flaky" and msg.attempts < 3):
            raise ValueError(f"{msg.value!r} failed attempt {msg.attempts}")
        db.record(msg, tx)

    # Until both have run out their retries, not merely 2 s without a message: on the cluster a
    # retry topic created at start may reach this consumer's metadata only at its next refresh (10 s).
    deadline = time.monotonic() + 60
    while (len(runs.get(flaky.id, ())) < 3 or len(runs.get(broken.id, ())) < 3) and time.monotonic() < deadline:
        c.run_until_idle(idle_s=2.0, timeout_s=120)
    c.close()
    # every message's effect exactly once; the broken one has none and is a dead letter
    assert db.counts() == Counter({m.id: 1 for m in msgs if m is not broken})
    assert [a for _, a in runs[flaky.id]] == [1, 2, 3] and [a for _, a in runs[broken.id]] == [1, 2, 3]
    # non-blocking: all 28 healthy messages, same key and partition, were done before flaky's 2nd run
    second_try = runs[flaky.id][1][0]
    assert all(runs[m.id][0][0] < second_try for m in msgs if m not in (flaky, broken))
    # the delays were waited out (0.5 s then 1 s), measured between the handler's runs
    (t1, _), (t2, _), (t3, _) = runs[broken.id]
    assert t2 - t1 >= 0.45 and t3 - t2 >= 0.95
    assert c.counters.retries == 4 and c.counters.dead_lettered == 1
    (letter,) = dlq.list_dead_letters(kafka.url, topic)
    assert letter.id == broken.id and letter.topic == f"{topic}.dlq" and letter.attempts == 3
    assert letter.original_topic == topic and letter.error_message == "b'broken' failed attempt 3"
    assert letter.original_offset == 5  # one key, a new topic: offsets 0..29 on one partition
    for stage in (1, 2):
        seen = read_topic(kafka.url, f"{topic}.retry.{stage}", expect=[flaky.id, broken.id])
        assert set(seen.ids) >= {flaky.id, broken.id}


def test_poison_skips_the_retry_topics(kafka: EmbeddedBroker, db: Db) -> None:
    topic = unique_topic("rt")
    poison = new_message(topic, b"poison")
    publish(kafka.url, [poison, new_message(topic, b"fine")])
    c = consumer(kafka, topic, db.inbox, retry_delays_s=(5.0,))
    calls: Counter[str] = Counter()

    @c.handler
    def handle(msg: Received, tx: sa.Connection) -> None:
        calls[msg.id] += 1
        if msg.value == b"poison":
            raise PoisonMessage("unparseable")
        db.record(msg, tx)

    c.run_until_idle(idle_s=1.5, timeout_s=90)
    c.close()
    assert calls[poison.id] == 1 and c.counters.retries == 0 and c.counters.dead_lettered == 1
    assert sum(db.counts().values()) == 1


def test_transactional_mode_commits_retry_copies_with_the_offsets(kafka: EmbeddedBroker) -> None:
    topic, out = unique_topic("rt"), unique_topic("rt-out")
    msgs = [new_message(topic, b"%d" % i, key=b"k") for i in range(10)]
    publish(kafka.url, msgs)
    c = Consumer(
        kafka.url, unique_topic("g"), [topic], None, transactional=True, retry_delays_s=(0.3,), config=dict(FAST_GROUP)
    )
    failed_once: set[str] = set()

    @c.handler
    def handle(msg: Received, tx: object) -> None:
        if msg.value == b"4" and msg.id not in failed_once:
            failed_once.add(msg.id)
            raise ValueError("first run fails")
        tx.send(out, msg.value or b"", key=msg.key)  # type: ignore[attr-defined]

    c.run_until_idle(idle_s=2.0, timeout_s=90)
    c.close()
    assert c.counters.retries == 1 and c.counters.dead_lettered == 0
    seen = read_topic(kafka.url, out)
    assert seen.records == 10 and len(seen.ids) == 10  # the retried one's output once, like the rest


def test_two_groups_share_the_retry_topics_without_running_each_others_retries(kafka: EmbeddedBroker, db: Db) -> None:
    topic = unique_topic("rt")
    msgs = [new_message(topic, b"%d" % i, key=b"k") for i in range(10)]
    publish(kafka.url, msgs)
    calls: dict[str, Counter[bytes]] = {"billing": Counter(), "email": Counter()}
    for group in ("email", "billing"):  # email fails "3" once and retries it; billing never fails
        c = consumer(kafka, topic, None, group=f"{group}-{topic}", retry_delays_s=(0.2,))

        @c.handler
        def handle(msg: Received, tx: object, group: str = group) -> None:
            calls[group][msg.value or b""] += 1
            if group == "email" and msg.value == b"3" and msg.attempts == 1:
                raise ValueError("mail server busy")

        c.run_until_idle(idle_s=1.5, timeout_s=90)
        # On a loaded cluster the retry copy (due in 0.2 s) can arrive after 1.5 s of quiet:
        # wait for it, bounded, rather than for a fixed idle time only.
        deadline = time.monotonic() + 60
        while group == "email" and calls["email"][b"3"] < 2 and time.monotonic() < deadline:
            c.run_until_idle(idle_s=1.5, timeout_s=60)
        c.close()
    assert calls["email"][b"3"] == 2 and calls["email"].total() == 11
    assert calls["billing"] == Counter({m.value: 1 for m in msgs})  # email's copy was passed by


def test_the_retry_pattern_matches_every_stage_and_nothing_else() -> None:
    import re

    p = re.compile(retry_pattern("shop.orders"))
    assert p.match("shop.orders.retry.1") and p.match("shop.orders.retry.12")
    assert not p.match("shop.orders") and not p.match("shopXorders.retry.1") and not p.match("shop.orders.retry.1.dlq")


def test_a_retry_copy_the_broker_refuses_is_dead_lettered_instead(kafka: EmbeddedBroker, db: Db) -> None:
    topic = unique_topic("rt")
    topic += "x" * (245 - len(topic))  # room for ".dlq", not for ".retry.1" (249 characters at most)
    assert len(topic + ".dlq") <= 249 < len(topic + ".retry.1")
    msgs = [new_message(topic, b"%d" % i) for i in range(3)]
    publish(kafka.url, msgs)
    c = consumer(kafka, topic, db.inbox, retry_delays_s=(0.1,))

    @c.handler
    def handle(msg: Received, tx: sa.Connection) -> None:
        if msg.value == b"1":
            raise ValueError("fails")
        db.record(msg, tx)

    c.run_until_idle(idle_s=1.5, timeout_s=90)
    c.close()
    assert c.counters.retries == 0 and c.counters.dead_lettered == 1
    assert [d.id for d in dlq.list_dead_letters(kafka.url, topic)] == [msgs[1].id]
    assert sum(db.counts().values()) == 2
