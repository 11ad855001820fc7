"""Key order on a FIFO topic needs an orderly consumer group: the proxy receives for a group that is
not orderly without the FIFO lock, so a key's next message goes to a second consumer while the first
still holds the one before it (measured on 5.5.0, below). The consumer refuses such a group rather
than handle a key's messages out of order (issue 13 review)."""

from __future__ import annotations

import pytest

from tests import rocketmq_plain
from tests.rocketmq_server import RocketMQServer
from zeroloss.brokers.rocketmq_fields import rocketmq_topic
from zeroloss.brokers.rocketmq_subscription import RocketMQSubscription
from zeroloss.brokers.subscription import Delivery
from zeroloss.errors import ConfigError
from zeroloss.message import new_message

pytestmark = [
    pytest.mark.rocketmq,
    pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning"),
]
pytest.importorskip("rocketmq", reason="rocketmq-python-client (zeroloss[rocketmq]) not installed")


def fifo_topic_with_a_key_backlog(server: RocketMQServer, *, orderly: bool) -> tuple[str, str]:
    topic = rocketmq_plain.unique("order")
    server.create_topics({rocketmq_topic(topic): "FIFO"})
    group = f"g-{topic}"
    server.create_group(group, fifo=orderly)
    rocketmq_plain.PlainProducer(server).publish(
        [new_message(topic, b"A1", key=b"A"), new_message(topic, b"A2", key=b"A")]
    )
    return topic, group


def test_a_group_that_is_not_orderly_is_refused_on_a_fifo_topic(rocketmq: RocketMQServer) -> None:
    topic, group = fifo_topic_with_a_key_backlog(rocketmq, orderly=False)
    with pytest.raises(ConfigError, match=f"not orderly.*{topic} is a FIFO topic.*updateSubGroup -g {group} -o true"):
        RocketMQSubscription(rocketmq_plain.url(rocketmq), group, [topic], settle_s=30)


def test_an_orderly_group_gives_a_keys_next_message_to_no_one_while_the_one_before_is_held(
    rocketmq: RocketMQServer,
) -> None:
    """What the refusal protects: with the same group made without ``fifo=True`` the second
    consumer's receives returned A2 while the first held A1."""
    topic, group = fifo_topic_with_a_key_backlog(rocketmq, orderly=True)
    url = rocketmq_plain.url(rocketmq)
    first = RocketMQSubscription(url, group, [topic], settle_s=30)
    second = RocketMQSubscription(url, group, [topic], settle_s=30)
    try:
        held: list[Delivery] = []
        while not held:  # pytest's timeout bounds this
            held = first.fetch(1, 1.0)
        assert [d.received.value for d in held] == [b"A1"]
        assert [d.received.value for _ in range(2) for d in second.fetch(1, 1.0)] == []
        first.ack(held[0])
        after: list[bytes | None] = []
        while not after:
            after = [d.received.value for d in first.fetch(1, 1.0) + second.fetch(1, 1.0)]
        assert after == [b"A2"]
    finally:
        first.close()
        second.close()
