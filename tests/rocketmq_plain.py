"""Publishing to the RocketMQ test server with the plain rocketmq-python-client Producer, the way
zeroloss's relay writes a message there (so the consumer side can be tested on its own): the id as
the user property ``zeroloss-id`` and a message key, the key's bytes as ``zeroloss-key`` (base64)
and as a message key and, on a FIFO topic, the message group (the id when there is no key),
headers as user properties — text as is, other bytes ``b64:`` + base64."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Sequence
from typing import Any

from tests.rocketmq_server import RocketMQServer
from zeroloss.brokers._batch import KEY_HEADER, text_value
from zeroloss.brokers.base import Outcome, Status
from zeroloss.brokers.rocketmq_fields import rocketmq_topic
from zeroloss.message import ID_HEADER, Message


def url(server: RocketMQServer) -> str:
    """The zeroloss URL of the test server: its gRPC proxy, and its name server for the reader."""
    return f"{server.url}?namesrv={server.namesrv_addr}"


def prepare(server: RocketMQServer, topic: str, *, fifo: bool = True, retry_max_times: int = 16) -> str:
    """Create ``topic`` (FIFO: per-key order), its NORMAL dead-letter topic and the group
    ``g-<topic>``; return the group's name."""
    server.create_topics(
        {rocketmq_topic(topic): "FIFO" if fifo else "NORMAL", rocketmq_topic(topic + ".dlq"): "NORMAL"}
    )
    group = f"g-{topic}"
    server.create_group(group, fifo=fifo, retry_max_times=retry_max_times)
    return group


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class PlainProducer:
    """A test-only :class:`~zeroloss.brokers.base.Broker`: one synchronous send per message."""

    def __init__(self, server: RocketMQServer, *, fifo: bool = True) -> None:
        import rocketmq

        self._rmq = rocketmq
        self.fifo = fifo
        self._producer = rocketmq.Producer(server.client_config())
        self._producer.startup()

    def publish(self, messages: Sequence[Message]) -> list[Outcome]:
        out = []
        for m in messages:
            msg: Any = self._rmq.Message()
            msg.topic = rocketmq_topic(m.topic)
            msg.body = m.value
            msg.add_property(ID_HEADER, m.id)
            for k, v in m.headers:
                msg.add_property(k, text_value(v))
            if m.key is not None:
                msg.keys = text_value(m.key)
                msg.add_property(KEY_HEADER, "b64:" + base64.b64encode(m.key).decode())
            msg.keys = m.id  # a second index key, as the relay adds: not the message's key
            if self.fifo:
                msg.message_group = text_value(m.key) if m.key is not None else m.id
            receipt = self._producer.send(msg)
            out.append(Outcome(m, Status.DELIVERED, location=f"{msg.topic}/{receipt.message_id}"))
        return out

    def close(self) -> None:
        self._producer.shutdown()
