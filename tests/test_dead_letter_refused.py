"""A dead letter the broker refuses for good must not hold its partition (or queue) forever: it is
sent again smaller (error headers cut, then dropped), and if even that is refused it is parked in
a file (fsynced before the offset commit / ack), counted and logged, and the consumer moves on.

Real refusals: librdkafka's own ``message.max.bytes`` (what any Kafka producer enforces: a record
that fit when the relay sent it no longer fits with the error headers added; Tansu does not
enforce a topic's ``max.message.bytes``), and a NATS server on which another stream already owns
the dead-letter subject."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.broker_harness import NATS_URL, harness, kafka_letters
from tests.conftest import unique_topic
from tests.effects_db import Db, make_db
from tests.embedded_kafka import FAST_GROUP
from zeroloss.brokers.base import Status
from zeroloss.brokers.kafka import KafkaBroker
from zeroloss.consumer import Consumer, Received
from zeroloss.consumer import dead_letters as dlq
from zeroloss.message import Message, new_message

LIMIT = 10_000  # the dead-letter producer's message.max.bytes in these tests


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Db]:
    yield from make_db("sqlite", tmp_path)


def run_bounded(c: Consumer, seconds: float) -> None:
    """run_until_idle, but stopped after ``seconds`` however it is doing: on a consumer stuck
    retrying a dead letter forever the test must fail, not hang."""
    errors: list[BaseException] = []

    def go() -> None:
        try:
            c.run_until_idle(idle_s=2.0, timeout_s=seconds)
        except BaseException as exc:  # reported below
            errors.append(exc)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(seconds + 5)
    if t.is_alive():
        c.stop()
        t.join(60)
    assert not t.is_alive()
    assert not errors or isinstance(errors[0], TimeoutError), errors


def kafka_publish(url: str, msgs: list[Message]) -> None:
    b = KafkaBroker(url, timeout_s=15)
    try:
        assert {o.status for o in b.publish(msgs)} == {Status.DELIVERED}
    finally:
        b.close()


def failing_on(c: Consumer, bad: str, db: Db, error: str) -> None:
    @c.handler
    def handle(msg: Received, tx: sa.Connection) -> None:
        if msg.id == bad:
            raise ValueError(error)
        db.record(msg, tx)


@pytest.mark.kafka
def test_a_kafka_dead_letter_too_large_with_its_error_headers_is_stored_with_the_error_cut(
    kafka: Any, db: Db, tmp_path: Path
) -> None:
    topic = unique_topic("big")
    big = new_message(topic, b"v" * 9_000, key=b"k")
    after = new_message(topic, b"small", key=b"k")  # same key, same partition: waits behind `big`
    kafka_publish(kafka.url, [big, after])
    c = Consumer(
        kafka.url,
        f"g-{topic}",
        [topic],
        db.inbox,
        config=dict(FAST_GROUP),
        max_attempts=1,
        dlq_config={"message.max.bytes": LIMIT},
        parked_dir=tmp_path / "parked",
        backoff_base_s=0.05,
        max_backoff_s=0.5,
    )
    failing_on(c, big.id, db, "e" * 3_000)  # the full letter: 9,000 + 3,000 bytes and more
    try:
        run_bounded(c, 60)
    finally:
        c.close()
    assert db.counts() == Counter({after.id: 1}), "the partition is stuck behind the refused dead letter"
    (letter,) = kafka_letters(kafka.bootstrap, topic + ".dlq")
    assert letter[0] == big.id
    assert letter[1][dlq.H_SHRUNK] == b"error-truncated"
    assert letter[1][dlq.H_ERROR_MESSAGE] == b"e" * dlq.SHRUNK_ERROR_CHARS
    assert letter[1][dlq.H_ERROR_TYPE] == b"ValueError"
    assert c.counters.dead_lettered == 1 and c.counters.parked == 0
    assert dlq.parked(tmp_path / "parked") == []


@pytest.mark.kafka
def test_a_kafka_dead_letter_refused_even_bare_is_parked_durably_and_the_partition_moves_on(
    kafka: Any, db: Db, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    topic = unique_topic("huge")
    huge = new_message(topic, b"v" * LIMIT, key=b"k")  # over the limit whatever its headers
    after = new_message(topic, b"small", key=b"k")
    kafka_publish(kafka.url, [huge, after])
    group = f"g-{topic}"
    c = Consumer(
        kafka.url,
        group,
        [topic],
        db.inbox,
        config=dict(FAST_GROUP),
        max_attempts=1,
        dlq_config={"message.max.bytes": LIMIT},
        parked_dir=tmp_path / "parked",
        backoff_base_s=0.05,
        max_backoff_s=0.5,
    )
    failing_on(c, huge.id, db, "no")
    try:
        run_bounded(c, 60)
    finally:
        c.close()
    assert db.counts() == Counter({after.id: 1}), "the partition is stuck behind the refused dead letter"
    ((path, letter),) = dlq.parked(tmp_path / "parked")
    assert (letter.id, letter.topic, letter.value, letter.key) == (huge.id, topic + ".dlq", huge.value, b"k")
    assert letter.header(dlq.H_ERROR_MESSAGE) == b"no"  # parked whole, with its error headers
    assert letter.last_error is not None and "MSG_SIZE_TOO_LARGE" in letter.last_error
    assert c.counters.parked == 1 and c.counters.dead_lettered == 0
    assert any(r.levelname == "ERROR" and huge.id in r.getMessage() and path in r.getMessage() for r in caplog.records)
    # its offset was committed: the group, started again, has nothing left to do
    again = Consumer(kafka.url, group, [topic], db.inbox, config=dict(FAST_GROUP), parked_dir=tmp_path / "parked")
    again.handler(db.record)
    try:
        again.run_until_idle(idle_s=2.0, timeout_s=60)
    finally:
        again.close()
    assert again.counters.processed == again.counters.duplicates == 0


async def _own_subject(name: str, subject: str | None) -> None:
    import nats

    nc = await nats.connect(NATS_URL)
    try:
        js = nc.jetstream()
        if subject is None:
            await js.delete_stream(name)
        else:
            await js.add_stream(name=name, subjects=[subject])
    finally:
        await nc.close()


@pytest.mark.nats
def test_a_nats_dead_letter_no_stream_will_take_is_parked_and_acked(db: Db, tmp_path: Path) -> None:
    with harness("nats") as h:
        topic = unique_topic("owned")
        h.topics.append(topic)
        squatter = "SQUAT_" + topic.replace("-", "_")
        asyncio.run(_own_subject(squatter, topic + ".dlq"))  # the dead letters' subject is taken
        try:
            bad, good = new_message(topic, b"bad", key=b"k"), new_message(topic, b"good", key=b"k")
            b = h.make()
            try:
                assert {o.status for o in b.publish([bad, good])} == {Status.DELIVERED}
            finally:
                b.close()
            config = {"ack_wait_s": 1.0}
            c = Consumer(
                h.url,
                f"g-{topic}",
                [topic],
                db.inbox,
                config=dict(config),
                max_attempts=1,
                parked_dir=tmp_path / "parked",
                backoff_base_s=0.05,
                max_backoff_s=0.5,
            )
            failing_on(c, bad.id, db, "no")
            try:
                run_bounded(c, 30)
            finally:
                c.close()
            assert db.counts() == Counter({good.id: 1})
            ((_, letter),) = dlq.parked(tmp_path / "parked")
            assert (letter.id, letter.value) == (bad.id, b"bad")
            assert letter.last_error is not None and "another stream" in letter.last_error
            assert c.counters.parked == 1
            # acked: not redelivered to the group
            again = Consumer(
                h.url, f"g-{topic}", [topic], db.inbox, config=dict(config), parked_dir=tmp_path / "parked"
            )
            again.handler(db.record)
            try:
                again.run_until_idle(idle_s=3.0, timeout_s=30)
            finally:
                again.close()
            assert again.counters.processed == again.counters.duplicates == again.counters.parked == 0
        finally:
            asyncio.run(_own_subject(squatter, None))
