"""Publishing to and consuming from the embedded Kafka-compatible broker (Tansu) in tests."""

from __future__ import annotations

from typing import Any

from zeroloss.brokers.kafka import KafkaBroker
from zeroloss.consumer import Consumer
from zeroloss.embedded_broker import EmbeddedBroker
from zeroloss.message import Message

FAST_GROUP = {"session.timeout.ms": 2000, "heartbeat.interval.ms": 500}  # Tansu joins in session/2


def publish(url: str, msgs: list[Message]) -> None:
    broker = KafkaBroker(url, timeout_s=15)
    try:
        assert {o.status.value for o in broker.publish(msgs)} == {"delivered"}
    finally:
        broker.close()


def consumer(kafka: EmbeddedBroker, topic: str, inbox: Any, group: str | None = None, **kw: Any) -> Consumer:
    return Consumer(
        kafka.url,
        group or f"g-{topic}",
        [topic],
        inbox,
        config={**FAST_GROUP, **kw.pop("config", {})},
        backoff_base_s=0.01,
        **kw,
    )
