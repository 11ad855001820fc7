from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from tests.broker_harness import AMQP_URL, NATS_URL
from tests.conftest import REDIS_URL, require_service
from tests.test_cli_init import _amqp_queue, _nats_subjects, _redis, kafka_partitions
from zeroloss.demo import run_demo

pytestmark = pytest.mark.slow


@pytest.mark.kafka
def test_the_demo_loses_nothing_and_prints_its_ledger() -> None:
    lines: list[str] = []
    assert run_demo(orders=600, echo=lines.append) == 0, "\n".join(lines)
    text = "\n".join(lines)
    assert "orders committed         600" in text
    assert "lost                     0" in text
    assert "invoices (effects)       600" in text
    assert "double effects           0" in text
    assert "SIGKILLed" in text


def _demo_against(url: str) -> tuple[str, str]:
    """Run the demo on ``url``; (its output, the topic it used)."""
    lines: list[str] = []
    code = run_demo(orders=200, echo=lines.append, target=url)
    text = "\n".join(lines)
    assert code == 0, text
    for needle in ("orders committed         200", "lost                     0", "invoices (effects)       200",
                   "double effects           0", "effects out of key order 0", "SIGKILLed"):
        assert needle in text
    found = re.search(r"topic (orders-[0-9a-f]{8})", text)
    assert found, text
    assert f"removed {found[1]} and {found[1]}.dlq from the broker" in text
    return text, found[1]


@pytest.mark.parametrize("name", [pytest.param(n, marks=getattr(pytest.mark, n)) for n in ("rabbitmq", "redis",
                                                                                              "nats")])
def test_the_demo_runs_against_another_broker_and_cleans_up(name: str) -> None:
    require_service(name)
    url = {"rabbitmq": AMQP_URL, "redis": REDIS_URL, "nats": NATS_URL}[name]
    text, topic = _demo_against(url)
    # Not read back (a queue is emptied by its consumer): the ledger says where the numbers come from.
    assert "as the consumer received them" in text
    # Nothing left behind, asked of the broker's own client.
    for t in (topic, topic + ".dlq"):
        if name == "rabbitmq":
            assert asyncio.run(_amqp_queue(t)) is None
        elif name == "redis":
            assert _redis(lambda r: r.exists(t)) == 0  # noqa: B023
        else:
            assert asyncio.run(_nats_subjects(t)) is None


@pytest.mark.kafka
def test_the_demo_runs_against_an_external_kafka(kafka: Any) -> None:
    text, topic = _demo_against(kafka.url)
    assert "read back from the broker" in text
    assert kafka_partitions(kafka.bootstrap, topic) == 0
