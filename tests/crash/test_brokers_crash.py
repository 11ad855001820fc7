"""A relay SIGKILLed at random points loses nothing on RabbitMQ, NATS JetStream, Redis Streams and
RocketMQ (the same scenario as test_relay_crash.py for Kafka), and NATS's dedup window drops every copy."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.broker_harness import OTHER_BROKERS, BrokerHarness, fixture_url, harness
from tests.conftest import OutboxHarness, only_in_the_full_crash_matrix, unique_topic
from tests.relay_process import source_url, start_relay
from tests.waiting import wait_until
from zeroloss.outbox.base import State

pytestmark = pytest.mark.slow

KILLS = int(os.environ.get("ZEROLOSS_CRASH_KILLS", "3"))
MESSAGES = int(os.environ.get("ZEROLOSS_CRASH_MESSAGES", "1500"))


@pytest.fixture(params=OTHER_BROKERS)
def target(request: pytest.FixtureRequest) -> Iterator[BrokerHarness]:
    with harness(request.param, fixture_url(request, request.param)) as h:
        yield h


@pytest.mark.parametrize("outbox", ["spool", "sqlite"], indirect=True)
def test_relay_sigkilled_at_random_points_loses_nothing(
    outbox: OutboxHarness, target: BrokerHarness, tmp_path: Path
) -> None:
    if outbox.kind != "spool":  # the spool variant of each broker stays in make test
        only_in_the_full_crash_matrix(f"relay SIGKILL from a {outbox.kind} outbox")
    rng = random.Random(int(os.environ.get("ZEROLOSS_SEED", time.time())))
    topic = target.new_topic(unique_topic("crash"))
    ids = [outbox.add(topic=topic, value=b"%d" % i, key=b"k%d" % (i % 13)) for i in range(MESSAGES)]
    source = source_url(outbox)
    table = getattr(getattr(outbox.store, "table", None), "name", None)
    log = tmp_path / "relay.log"

    def delivered() -> int:
        return int(outbox.store.stats().counts[State.SUCCESS])

    starts = 0
    relay = start_relay(source, target.url, log, table)
    try:
        for _ in range(KILLS):
            goal = min(MESSAGES - 1, delivered() + rng.randint(1, MESSAGES // (KILLS + 1)))
            wait_until(lambda: delivered() >= goal or relay.poll() is not None, 120, "progress")  # noqa: B023
            assert relay.poll() is None, log.read_text()
            relay.send_signal(signal.SIGKILL)
            relay.wait()
            starts = log.read_text().count("relay started")
            relay = start_relay(source, target.url, log, table)
        wait_until(lambda: delivered() == MESSAGES or relay.poll() is not None, 180, "full delivery")
        wait_until(lambda: log.read_text().count("relay started") > starts, 60, "relay start-up")
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(30) == 0, log.read_text()[-3000:]
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait()
    entries = target.read(topic)
    seen = [mid for mid, _ in entries]
    assert set(ids) - set(seen) == set(), "lost messages"
    if target.name == "nats":  # the stream's duplicate window absorbed every republished copy
        assert len(seen) == len(set(seen)) == MESSAGES
    first: dict[bytes, list[str]] = {}
    done: set[str] = set()
    for mid, key in entries:
        if mid not in done and key is not None:
            done.add(mid)
            first.setdefault(key, []).append(mid)
    for key, got in first.items():
        assert got == [ids[i] for i in range(MESSAGES) if b"k%d" % (i % 13) == key], f"key {key!r} out of order"
    stats = outbox.store.stats()
    assert stats.counts[State.SUCCESS] == MESSAGES and stats.counts[State.FAILED] == 0
