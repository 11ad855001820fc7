"""Consumers on RabbitMQ, NATS JetStream, Redis Streams and RocketMQ SIGKILLed at random points neither lose
an effect nor apply one twice (the Kafka version is test_consumer_crash.py)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.broker_harness import OTHER_BROKERS, BrokerHarness, harness
from tests.conftest import only_in_the_full_crash_matrix, unique_topic
from tests.effects_db import Db, assert_exactly_once, make_db
from tests.waiting import wait_until
from zeroloss.brokers.base import Broker, Status
from zeroloss.consumer import Consumer
from zeroloss.message import new_message

pytestmark = pytest.mark.slow

KILLS = int(os.environ.get("ZEROLOSS_CRASH_KILLS", "3"))
MESSAGES = int(os.environ.get("ZEROLOSS_CRASH_MESSAGES", "1000"))
CHILD = Path(__file__).resolve().parent.parent / "subscription_child.py"
# redelivery of what a killed consumer held: at once (RabbitMQ), after AckWait (NATS), after the
# claim idle time (Redis), after the invisible duration (RocketMQ: 10 s at least)
CONFIG = {
    "rabbitmq": {},
    "nats": {"ack_wait_s": 2.0},
    "redis": {"claim_idle_s": 2.0, "claim_every_s": 0.5},
    "rocketmq": {"invisible_s": 10.0},
}


# RocketMQ's variant is the test below (its own topic set-up, and in make chaos for its 25 s a kill).
@pytest.fixture(params=[p for p in OTHER_BROKERS if p.values != ("rocketmq",)])
def target(request: pytest.FixtureRequest) -> Iterator[BrokerHarness]:
    with harness(request.param) as h:
        yield h


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Db]:
    yield from make_db("sqlite", tmp_path)


def start(url: str, name: str, group: str, topic: str, db: Db, log: Path) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        str(CHILD),
        url,
        group,
        topic,
        db.url,
        db.inbox.table.name,
        db.effects.name,
        json.dumps(CONFIG[name]),
    ]
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


def test_a_consumer_sigkilled_at_random_points_applies_every_effect_exactly_once(
    target: BrokerHarness, db: Db, tmp_path: Path
) -> None:
    topic = unique_topic("ccrash")
    target.topics.append(topic)
    kill_at_random_points(target.url, target.name, topic, target.make, db, tmp_path, KILLS, MESSAGES)


@pytest.mark.rocketmq
def test_a_rocketmq_consumer_sigkilled_applies_every_effect_exactly_once(
    request: pytest.FixtureRequest, db: Db, tmp_path: Path
) -> None:
    """What a killed consumer held comes back after the invisible duration (10 s at least): about
    25 s for one kill, so this runs in make chaos; make test has the contract's crash mid-batch."""
    from tests import rocketmq_plain

    only_in_the_full_crash_matrix("RocketMQ consumer SIGKILL")
    rocketmq = request.getfixturevalue("rocketmq")  # after the skip: make test needs no server for it
    topic = unique_topic("ccrash")
    rocketmq_plain.prepare(rocketmq, topic)
    kill_at_random_points(
        rocketmq_plain.url(rocketmq),
        "rocketmq",
        topic,
        lambda: rocketmq_plain.PlainProducer(rocketmq),
        db,
        tmp_path,
        KILLS,
        MESSAGES,
    )


def kill_at_random_points(
    url: str, name: str, topic: str, make: Callable[[], Broker], db: Db, tmp_path: Path, kills: int, messages: int
) -> None:
    seed = int(os.environ.get("ZEROLOSS_SEED", time.time()))
    rng = random.Random(seed)
    group = f"g-{topic}"
    msgs = [new_message(topic, b"%d" % i, key=b"k%d" % (i % 13)) for i in range(messages)]
    broker = make()
    try:
        assert {o.status for o in broker.publish(msgs)} == {Status.DELIVERED}
    finally:
        broker.close()
    log = tmp_path / "consumer.log"

    def total() -> int:
        return sum(db.counts().values())

    child = start(url, name, group, topic, db, log)
    try:
        for _ in range(kills):
            goal = min(messages - 1, total() + rng.randint(1, messages // (kills + 1)))
            wait_until(lambda: total() >= goal or child.poll() is not None, 120, "progress")  # noqa: B023
            assert child.poll() is None, log.read_text()[-3000:]
            child.send_signal(signal.SIGKILL)
            child.wait()
            starts = log.read_text().count("consumer started")  # a child killed in start-up logs none
            child = start(url, name, group, topic, db, log)
        wait_until(lambda: len(db.counts()) == messages or child.poll() is not None, 180, "all effects")
        wait_until(lambda: log.read_text().count("consumer started") > starts, 60, "last start-up")
        child.send_signal(signal.SIGTERM)
        assert child.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    final = Consumer(url, group, [topic], db.inbox, config=dict(CONFIG[name]))
    final.handler(db.record)
    final.run_until_idle(idle_s=4.0, timeout_s=120)  # longer than the redelivery delays above
    assert final.counters.processed == 0, f"seed {seed}"
    skipped = log.read_text(errors="replace").count("duplicate, skipped")
    print(f"seed {seed}: {kills} kills, {skipped} redelivered messages skipped by the inbox")
    assert_exactly_once(db, [m.id for m in msgs])
