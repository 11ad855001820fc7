"""The three-broker Apache Kafka cluster itself: what the fault tests built on it rely on."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.conftest import unique_topic
from tests.kafka_cluster import KafkaCluster

pytestmark = pytest.mark.kafka_cluster


def produce(cluster: KafkaCluster, topic: str, values: list[bytes], timeout: float = 30.0) -> None:
    """Idempotent, acks=all; fails unless every message is acknowledged within ``timeout``."""
    from confluent_kafka import Producer

    errors: list[Any] = []
    p = Producer(
        cluster.client_config(**{"enable.idempotence": True, "acks": "all", "message.timeout.ms": int(timeout * 1000)})
    )
    try:
        for v in values:
            p.produce(topic, v, key=v, on_delivery=lambda err, _msg: errors.append(err))
        assert p.flush(timeout + 5) == 0, "messages still in flight"
    finally:
        p.close()
    assert errors == [None] * len(values)


def read(cluster: KafkaCluster, topic: str, count: int, timeout: float = 20.0) -> list[bytes]:
    """Every partition of ``topic`` from the start, until ``count`` messages have come."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    parts = cluster.admin().list_topics(topic=topic, timeout=5).topics[topic].partitions
    c = Consumer(cluster.client_config(**{"group.id": unique_topic("g"), "enable.auto.commit": False}))
    got: list[bytes] = []
    try:
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            msg = c.poll(0.5)
            if msg is not None and not msg.error() and (value := msg.value()) is not None:
                got.append(value)
    finally:
        c.close()
    return got


def test_three_brokers_and_a_default_topic_has_rf3_min_isr2_and_round_trips(kafka_cluster: KafkaCluster) -> None:
    from confluent_kafka.admin import ConfigResource, ResourceType

    assert kafka_cluster.broker_ids() == {1, 2, 3}
    topic = unique_topic("cluster")
    values = [b"m%03d" % i for i in range(200)]
    produce(kafka_cluster, topic, values)  # the topic is auto-created with the broker defaults

    parts = kafka_cluster.admin().list_topics(topic=topic, timeout=5).topics[topic].partitions
    assert len(parts) == 4
    assert all(sorted(p.replicas) == [1, 2, 3] for p in parts.values())
    resource = ConfigResource(ResourceType.TOPIC, topic)
    configs = kafka_cluster.admin().describe_configs([resource])[resource].result(timeout=10)
    assert configs["min.insync.replicas"].value == "2"
    assert configs["unclean.leader.election.enable"].value == "false"

    assert sorted(read(kafka_cluster, topic, len(values))) == values


def test_acks_all_survives_a_killed_follower_which_then_rejoins_the_isr(kafka_cluster: KafkaCluster) -> None:
    from confluent_kafka.admin import NewTopic

    topic = unique_topic("cluster")
    kafka_cluster.admin().create_topics([NewTopic(topic, 1, 3)])[topic].result(timeout=15)
    kafka_cluster.wait_in_sync(topic, timeout=30)
    leader = kafka_cluster.leader_of(topic, 0)
    follower = next(i for i in (1, 2, 3) if i != leader)

    kafka_cluster.kill(follower)
    try:
        # Held until the controller fences the dead node and the ISR shrinks to 2 = min.insync.replicas.
        produce(kafka_cluster, topic, [b"a%02d" % i for i in range(50)])
    finally:
        kafka_cluster.restart(follower, topic=topic, timeout=60)

    kafka_cluster.wait_in_sync(topic, timeout=30)
    produce(kafka_cluster, topic, [b"b%02d" % i for i in range(50)])
    assert len(read(kafka_cluster, topic, 100)) == 100
