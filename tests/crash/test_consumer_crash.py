"""Crash tests with real processes: consumers SIGKILLed at random points neither lose an effect
nor apply one twice."""

from __future__ import annotations

import ast
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import unique_topic
from tests.effects_db import Db, assert_exactly_once, make_db
from tests.embedded_kafka import consumer, publish
from tests.waiting import wait_until
from zeroloss.embedded_broker import EmbeddedBroker
from zeroloss.message import new_message

pytestmark = [pytest.mark.kafka_cluster, pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture
def kafka(kafka_cluster: Any) -> Any:
    """This suite runs on the real three-broker Apache Kafka cluster (RF 3, min ISR 2)."""
    return kafka_cluster


KILLS = int(os.environ.get("ZEROLOSS_CRASH_KILLS", "4"))
MESSAGES = int(os.environ.get("ZEROLOSS_CRASH_MESSAGES", "2000"))
CHILD = Path(__file__).resolve().parent.parent / "consumer_child.py"


def start(
    kafka: EmbeddedBroker, group: str, topic: str, db: Db, log: Path, mode: str = "run", *extra: str
) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        str(CHILD),
        kafka.url,
        group,
        topic,
        db.url,
        db.inbox.table.name,
        db.effects.name,
        mode,
        *extra,
    ]
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


def last_assignment(log: Path) -> list[tuple[str, int]]:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if " assigned [" in ln]
    return ast.literal_eval(lines[-1].split(" assigned ", 1)[1]) if lines else []


@pytest.fixture
def db(tmp_path: Path) -> object:
    yield from make_db("postgresql", tmp_path)


def test_a_consumer_sigkilled_at_random_points_applies_every_effect_exactly_once(
    kafka: EmbeddedBroker, db: Db, tmp_path: Path
) -> None:
    seed = int(os.environ.get("ZEROLOSS_SEED", time.time()))
    rng = random.Random(seed)
    topic = unique_topic("crash")
    group = f"g-{topic}"
    msgs = [new_message(topic, b"%d" % i, key=b"k%d" % (i % 13)) for i in range(MESSAGES)]
    publish(kafka.url, msgs)
    log = tmp_path / "consumer.log"

    def total() -> int:
        return sum(db.counts().values())

    child = start(kafka, group, topic, db, log)
    try:
        for _ in range(KILLS):
            target = min(MESSAGES - 1, total() + rng.randint(1, MESSAGES // (KILLS + 1)))
            wait_until(lambda: total() >= target or child.poll() is not None, 120, "progress")  # noqa: B023
            assert child.poll() is None, log.read_text()[-3000:]
            child.send_signal(signal.SIGKILL)
            child.wait()
            child = start(kafka, group, topic, db, log)
        wait_until(lambda: len(db.counts()) == MESSAGES or child.poll() is not None, 180, "all effects")
        child.send_signal(signal.SIGTERM)  # graceful: finish, commit, leave the group, exit 0
        assert child.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    final = consumer(kafka, topic, db.inbox, group=group)
    final.handler(db.record)
    final.run_until_idle(idle_s=3.0, timeout_s=120)
    assert final.counters.processed == 0, f"seed {seed}"
    redelivered = log.read_text(errors="replace").count("duplicate, skipped")
    print(f"seed {seed}: {KILLS} kills, {redelivered} redelivered messages skipped by the inbox")
    assert redelivered or KILLS < 3, "no kill landed between an effect and its offset commit"
    assert_exactly_once(db, [m.id for m in msgs])
    for key, ids in db.order().items():  # per key, the first application of each id is in order
        firsts = list(dict.fromkeys(ids))
        assert firsts == [m.id for m in msgs if m.key == (key or "").encode()], f"key {key} out of order"


def test_two_consumers_in_one_group_one_killed_lose_nothing_and_double_nothing(
    kafka: EmbeddedBroker, db: Db, tmp_path: Path
) -> None:
    topic = unique_topic("crash2")
    group = f"g-{topic}"
    publish(kafka.url, [new_message(topic, b"warm-up")])  # creates the topic's partitions
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    a, b = (start(kafka, group, topic, db, log) for log in logs)
    try:

        def split() -> bool:  # both members hold part of the topic
            pa, pb = last_assignment(logs[0]), last_assignment(logs[1])
            return bool(pa and pb and not set(pa) & set(pb))

        wait_until(split, 120, "both consumers assigned")
        msgs = [new_message(topic, b"%d" % i, key=b"k%d" % (i % 11)) for i in range(MESSAGES)]
        publish(kafka.url, msgs)
        wait_until(lambda: sum(db.counts().values()) >= MESSAGES // 3 or a.poll() is not None, 120, "progress")
        assert a.poll() is None, logs[0].read_text()[-3000:]
        a.send_signal(signal.SIGKILL)
        a.wait()
        wait_until(lambda: len(db.counts()) == MESSAGES + 1 or b.poll() is not None, 180, "takeover")
        b.send_signal(signal.SIGTERM)
        assert b.wait(60) == 0, logs[1].read_text()[-3000:]
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
                p.wait()
    counts = db.counts()
    assert len(counts) == MESSAGES + 1
    assert set(counts.values()) == {1}, Counter(counts.values())


def test_with_retry_topics_a_sigkilled_consumer_still_applies_every_effect_exactly_once(
    kafka: EmbeddedBroker, db: Db, tmp_path: Path
) -> None:
    """Kills land while copies are on their way to, waiting on, or being read from retry topics."""
    seed = int(os.environ.get("ZEROLOSS_SEED", time.time()))
    rng = random.Random(seed)
    topic = unique_topic("crash-rt")
    group = f"g-{topic}"
    n = MESSAGES // 2
    msgs = [new_message(topic, b"%d" % i, key=b"k%d" % (i % 13)) for i in range(n)]
    publish(kafka.url, msgs)
    log = tmp_path / "consumer.log"

    def total() -> int:
        return sum(db.counts().values())

    child = start(kafka, group, topic, db, log, "run", "retry")
    try:
        for _ in range(3):
            target = min(n - 1, total() + rng.randint(1, n // 4))
            wait_until(lambda: total() >= target or child.poll() is not None, 120, "progress")  # noqa: B023
            assert child.poll() is None, log.read_text()[-3000:]
            child.send_signal(signal.SIGKILL)
            child.wait()
            child = start(kafka, group, topic, db, log, "run", "retry")
        wait_until(lambda: len(db.counts()) == n or child.poll() is not None, 180, "all effects")
        child.send_signal(signal.SIGTERM)
        assert child.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    retried = log.read_text(errors="replace").count(".retry.1, due in")
    print(f"seed {seed}: 3 kills, {retried} messages sent to {topic}.retry.1")
    assert retried >= n // 7  # every multiple of 7 failed once and went through the retry topic
    assert_exactly_once(db, [m.id for m in msgs])
