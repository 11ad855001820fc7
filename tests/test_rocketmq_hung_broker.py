"""A RocketMQ consumer facing a broker that answers nothing (SIGSTOP: its sockets stay open, a hung
JVM or a network that drops packets): stopping it must cost one request timeout, not one per
message it holds. Before the fix each held message was given back by its own blocking call under
the subscription's lock (and the extender's rounds likewise), so a stop with 32 messages in hand
took 32 request timeouts (16 minutes at the default 30 s).

The broker is paused, so this runs on a throwaway server of its own, never the shared one, and
lives in ``make chaos`` (about 35 s to start the server)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests import rocketmq_plain
from tests.conftest import only_in_the_full_crash_matrix
from tests.rocketmq_server import RocketMQServer
from zeroloss.brokers.rocketmq_subscription import RocketMQSubscription
from zeroloss.message import new_message

pytestmark = [
    pytest.mark.rocketmq,
    pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning"),
]
pytest.importorskip("rocketmq", reason="rocketmq-python-client (zeroloss[rocketmq]) not installed")

HELD = 16
TIMEOUT_S = 2  # the client's request timeout: each unanswered call waits this long


def test_closing_with_messages_in_hand_on_a_hung_broker_costs_one_timeout_not_one_per_message(tmp_path: Path) -> None:
    only_in_the_full_crash_matrix("a throwaway RocketMQ server, paused (about 35 s to start)")
    stop_on_a_hung_broker(tmp_path)


def stop_on_a_hung_broker(directory: Path) -> float:
    """Receive HELD messages, pause the broker, close the subscription; returns how long close took."""
    server = RocketMQServer(directory / "rocketmq", namesrv_port=25876, broker_port=25911, proxy_port=25081)
    server.start()
    try:
        topic = rocketmq_plain.unique("hung")
        group = rocketmq_plain.prepare(server, topic, fifo=False)
        producer = rocketmq_plain.PlainProducer(server, fifo=False)
        producer.publish([new_message(topic, f"v{i}".encode()) for i in range(HELD)])
        producer.close()
        sub = RocketMQSubscription(
            rocketmq_plain.url(server), group, [topic], timeout_s=TIMEOUT_S, invisible_s=10, settle_s=30
        )
        held: list[object] = []
        deadline = time.monotonic() + 60
        while len(held) < HELD and time.monotonic() < deadline:
            held += sub.fetch(HELD, 1.0)
        assert len(held) == HELD
        server.pause("broker")
        try:
            began = time.monotonic()
            sub.close()
            took = time.monotonic() - began
        finally:
            server.resume("broker")
        # Serially it takes HELD x TIMEOUT_S (32 s); at once, about one TIMEOUT_S. The bound is the
        # serial cost, not a speed: the test fails only if the calls are one after another again.
        assert took < HELD * TIMEOUT_S / 2, f"close took {took:.1f}s with {HELD} messages held"
        return took
    finally:
        server.stop(wipe=True)
