"""Brokers that give up on a message by themselves — NATS ``max_deliver`` (dropped silently),
RabbitMQ ``x-delivery-limit`` (dead-lettered by the queue, without our error headers) — must never
get there: the consumer reads the broker's delivery count, counts earlier unsettled deliveries as
attempts, and dead-letters the message itself, with its error, before the broker's last delivery.

Each round below is a new consumer process's life: the handler fails and the consumer is stopped
during the backoff (the delivery is given back: nak / nack-requeue), or the handler "kills the
process" (nothing is settled; the broker redelivers). Without the broker's count every life starts
at attempt 1 and the message is never dead-lettered by the consumer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.broker_harness import BrokerHarness, harness
from tests.conftest import unique_topic
from tests.effects_db import Db, make_db
from zeroloss.brokers.base import Status
from zeroloss.consumer import Consumer, Received
from zeroloss.consumer import dead_letters as dlq
from zeroloss.errors import ConfigError
from zeroloss.message import new_message

BROKERS = [pytest.param(n, id=n, marks=getattr(pytest.mark, n)) for n in ("nats", "rabbitmq")]
DELIVERIES = 5  # the broker's limit in these tests: NATS max_deliver, RabbitMQ delivery_limit + 1
CONFIG: dict[str, dict[str, Any]] = {
    "nats": {"ack_wait_s": 1.0, "max_deliver": DELIVERIES},
    "rabbitmq": {"delivery_limit": DELIVERIES - 1},
}
PUBLISH = {"nats": {}, "rabbitmq": {"delivery_limit": DELIVERIES - 1}}  # the queue is declared by the first user


class Crash(BaseException):
    """Stands in for the process dying in the handler: nothing after it runs (no commit, no ack)."""


@pytest.fixture(params=BROKERS)
def target(request: pytest.FixtureRequest) -> Iterator[BrokerHarness]:
    with harness(request.param) as h:
        yield h


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Db]:
    yield from make_db("sqlite", tmp_path)


def publish_one(h: BrokerHarness, topic: str) -> str:
    msg = new_message(topic, b"payload", key=b"k")
    broker = h.make(**PUBLISH[h.name])
    try:
        assert [o.status for o in broker.publish([msg])] == [Status.DELIVERED]
    finally:
        broker.close()
    return msg.id


def dead_lettered(h: BrokerHarness, topic: str, found: list[tuple[str, dict[str, bytes]]]) -> bool:
    """Whether the topic's dead letters (added to ``found``) are there yet."""
    found.extend(letters(h, topic))
    return bool(found)


def lives(
    h: BrokerHarness,
    topic: str,
    db: Db,
    handler: Callable[[Consumer, Received, Any], None],
    *,
    max_attempts: int = 3,
    until: Callable[[], bool],
    rounds: int = 2 * DELIVERIES,
) -> list[int]:
    """Run one consumer after another (each a new process's life) until ``until()``; the
    ``attempts`` each handler call saw."""
    seen: list[int] = []
    for _ in range(rounds):
        if until():
            break
        c = Consumer(
            h.url,
            f"g-{topic}",
            [topic],
            db.inbox,
            config=dict(CONFIG[h.name]),
            max_attempts=max_attempts,
            backoff_base_s=5.0,
            max_backoff_s=5.0,
            poll_s=0.2,
        )

        @c.handler
        def handle(msg: Received, tx: sa.Connection, c: Consumer = c) -> None:
            seen.append(msg.attempts)
            handler(c, msg, tx)

        try:
            # idle: nothing (re)delivered within the redelivery delay (NATS: ack_wait_s)
            c.run_until_idle(idle_s=3.0, timeout_s=60)
        except Crash:
            pass
        finally:
            c.close()
    return seen


def letters(h: BrokerHarness, topic: str) -> list[tuple[str, dict[str, bytes]]]:
    try:
        return h.read_headers(topic + ".dlq")
    except Exception:  # not made yet
        return []


def test_a_message_failing_in_every_life_is_dead_lettered_with_its_error(target: BrokerHarness, db: Db) -> None:
    """The handler fails and the consumer stops during the backoff, every time (a deploy loop, a
    liveness probe): the delivery goes back to the broker, whose count climbs."""
    topic = unique_topic("dlim")
    target.topics.append(topic)
    mid = publish_one(target, topic)

    def fail_then_stop(c: Consumer, msg: Received, tx: Any) -> None:
        c.stop()  # the backoff after this failure is cut short: the delivery is released
        raise ValueError(f"cannot handle {msg.id}")

    found: list[tuple[str, dict[str, bytes]]] = []
    seen = lives(target, topic, db, fail_then_stop, until=lambda: dead_lettered(target, topic, found))
    assert [m for m, _ in found] == [mid], f"not dead-lettered; the handler saw attempts {seen}"
    headers = found[0][1]
    assert headers[dlq.H_ERROR_TYPE] == b"ValueError"
    assert headers[dlq.H_ERROR_MESSAGE] == f"cannot handle {mid}".encode()
    assert headers[dlq.H_ATTEMPTS] == b"3"
    assert seen == [1, 2, 3]  # earlier deliveries count: max_attempts tries in all, across lives


def test_a_message_that_kills_its_consumer_every_time_is_dead_lettered_before_the_broker_gives_up(
    target: BrokerHarness, db: Db
) -> None:
    topic = unique_topic("dcrash")
    target.topics.append(topic)
    mid = publish_one(target, topic)

    def crash(c: Consumer, msg: Received, tx: Any) -> None:
        raise Crash()

    found: list[tuple[str, dict[str, bytes]]] = []
    seen = lives(target, topic, db, crash, until=lambda: dead_lettered(target, topic, found))
    assert [m for m, _ in found] == [mid], f"dropped by the broker: the handler saw attempts {seen}"
    headers = found[0][1]
    assert headers[dlq.H_ERROR_TYPE] == b"DeliveryLimitReached", headers
    assert f"delivered {DELIVERIES - 1} times".encode() in headers[dlq.H_ERROR_MESSAGE]
    # handled at deliveries 1 .. limit-2; the second-to-last delivery is dead-lettered, not handled
    assert seen == list(range(1, DELIVERIES - 1))


def test_max_attempts_must_leave_the_broker_a_delivery_to_spare(target: BrokerHarness, db: Db) -> None:
    topic = unique_topic("dcfg")
    target.topics.append(topic)
    publish_one(target, topic)
    c = Consumer(
        target.url, f"g-{topic}", [topic], db.inbox, config=dict(CONFIG[target.name]), max_attempts=DELIVERIES - 1
    )
    c.handler(db.record)
    with pytest.raises(ConfigError, match="max_attempts=4"):
        c.run_for(5.0)
    c.close()
