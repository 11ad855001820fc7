"""Crash tests with real processes: a relay SIGKILLed at random points loses nothing."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import OutboxHarness, only_in_the_full_crash_matrix, unique_topic
from tests.relay_process import source_url, start_relay
from tests.waiting import wait_until
from zeroloss.embedded_broker import EmbeddedBroker
from zeroloss.outbox.base import State
from zeroloss.readback import read_topic

pytestmark = [pytest.mark.kafka_cluster, pytest.mark.slow]


@pytest.fixture
def kafka(kafka_cluster: Any) -> Any:
    """This suite runs on the real three-broker Apache Kafka cluster (RF 3, min ISR 2)."""
    return kafka_cluster


KILLS = int(os.environ.get("ZEROLOSS_CRASH_KILLS", "4"))
MESSAGES = int(os.environ.get("ZEROLOSS_CRASH_MESSAGES", "3000"))


def test_relay_sigkilled_at_random_points_loses_nothing(
    outbox: OutboxHarness, kafka: EmbeddedBroker, tmp_path: Path
) -> None:
    if outbox.kind in ("sqlite", "mariadb"):  # spool and PostgreSQL stay in make test
        only_in_the_full_crash_matrix(f"relay SIGKILL on a {outbox.kind} outbox")
    rng = random.Random(int(os.environ.get("ZEROLOSS_SEED", time.time())))
    topic = unique_topic("crash")
    ids = [outbox.add(topic=topic, value=b"%d" % i, key=b"k%d" % (i % 13)) for i in range(MESSAGES)]
    source = source_url(outbox)
    table = getattr(getattr(outbox.store, "table", None), "name", None)
    log = tmp_path / "relay.log"

    def delivered() -> int:
        return int(outbox.store.stats().counts[State.SUCCESS])

    starts = 0
    relay = start_relay(source, kafka.url, log, table)
    try:
        for _ in range(KILLS):
            target = min(MESSAGES - 1, delivered() + rng.randint(1, MESSAGES // (KILLS + 1)))
            wait_until(lambda: delivered() >= target or relay.poll() is not None, 120, "progress")  # noqa: B023
            assert relay.poll() is None, log.read_text()
            relay.send_signal(signal.SIGKILL)
            relay.wait()
            starts = log.read_text().count("relay started")  # a relay killed in start-up logs none
            relay = start_relay(source, kafka.url, log, table)
        wait_until(lambda: delivered() == MESSAGES or relay.poll() is not None, 180, "full delivery")
        # SIGTERM before the interpreter installed its handler would just kill it: wait for the
        # last relay's start-up line before asking it to drain.
        wait_until(lambda: log.read_text().count("relay started") > starts, 60, "relay start-up")
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(30) == 0, log.read_text()[-3000:]
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait()
    seen = read_topic(kafka.url, topic, expect=ids)
    lost = set(ids) - set(seen.ids)
    assert not lost, f"{len(lost)} lost"
    for key, got in seen.order.items():
        want = [ids[i] for i in range(MESSAGES) if b"k%d" % (i % 13) == key]
        assert got == want, f"key {key!r} out of order"
    stats = outbox.store.stats()
    assert stats.counts[State.SUCCESS] == MESSAGES
    assert stats.counts[State.FAILED] == 0
