"""``zeroloss init --target URL --topic NAME``: declares on the real broker, idempotently, what the
relay and the consumer need; the result is checked with each broker's own client, not our adapters."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.broker_harness import AMQP_URL, NATS_URL, harness
from tests.broker_inspect import amqp_queue, kafka_partitions, nats_subjects, with_redis
from tests.conftest import REDIS_URL, require_service, unique_topic
from zeroloss.cli import main


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


# -- the tests ----------------------------------------------------------------------------------


@pytest.fixture
def topic() -> str:
    return unique_topic("init")


@pytest.mark.kafka_cluster
def test_on_the_cluster_init_reports_what_it_created_not_metadata_still_on_its_way(
    kafka_cluster: Any, topic: str
) -> None:
    """Seen once against the cluster: 'created topic (0 partitions, replication factor 0)' from
    metadata read before the new topic reached it. Defaults: the cluster's RF 3, 4 partitions."""
    code, out = run("init", "--target", kafka_cluster.url, "--topic", topic)
    assert code == 0, out
    assert f"created         topic {topic}  (4 partitions, replication factor 3)" in out, out
    assert f"created         topic {topic}.dlq  (4 partitions, replication factor 3)" in out, out


@pytest.mark.kafka
def test_kafka_topics_are_created_once_with_the_partitions_asked_for(kafka: Any, topic: str) -> None:
    args = ["init", "--target", kafka.url, "--topic", topic, "--partitions", "2"]
    code, out = run(*args)
    assert code == 0, out
    assert f"created         topic {topic}  (2 partitions" in out
    assert f"created         topic {topic}.dlq  (2 partitions" in out
    code, out = run(*args)  # idempotent: exists, nothing changed
    assert code == 0, out
    assert f"exists          topic {topic}  (2 partitions" in out
    assert kafka_partitions(kafka.bootstrap, topic) == kafka_partitions(kafka.bootstrap, topic + ".dlq") == 2


@pytest.mark.rabbitmq
def test_rabbitmq_quorum_queues_are_declared_once(topic: str) -> None:
    with harness("rabbitmq") as h:
        h.topics.append(topic)
        code, out = run("init", "--target", AMQP_URL, "--topic", topic)
        assert code == 0, out
        assert f"created         queue {topic}  (quorum" in out and f"created         queue {topic}.dlq" in out
        code, out = run("init", "--target", AMQP_URL, "--topic", topic)
        assert code == 0, out
        assert f"exists          queue {topic}  (quorum" in out
        assert asyncio.run(amqp_queue(topic)) == 0
        assert asyncio.run(amqp_queue(topic + ".dlq")) == 0


@pytest.mark.rabbitmq
def test_rabbitmq_a_queue_declared_otherwise_is_a_configuration_error(topic: str) -> None:
    import aio_pika

    async def classic_queue() -> None:
        conn = await aio_pika.connect(AMQP_URL)
        try:
            await (await conn.channel()).declare_queue(topic, durable=True)  # classic, no dead-lettering
        finally:
            await conn.close()

    with harness("rabbitmq") as h:
        h.topics.append(topic)
        asyncio.run(classic_queue())
        code, out = run("init", "--target", AMQP_URL, "--topic", topic)
        assert code == 2, out
        assert f"RabbitMQ already has {topic!r}" in out and "PRECONDITION_FAILED" in out


@pytest.mark.nats
def test_nats_streams_are_created_once(topic: str) -> None:
    with harness("nats") as h:
        h.topics.append(topic)
        for action in ("created", "exists"):
            code, out = run("init", "--target", NATS_URL, "--topic", topic)
            assert code == 0, out
            assert f"{action:<15} stream ZL_{topic}  (subject {topic}, file storage" in out
        assert asyncio.run(nats_subjects(topic)) == [topic]
        assert asyncio.run(nats_subjects(topic + ".dlq")) == [topic + ".dlq"]


@pytest.mark.redis
def test_redis_needs_nothing_without_a_group_and_creates_stream_and_group_with_one(topic: str) -> None:
    with harness("redis") as h:
        h.topics.append(topic)
        code, out = run("init", "--target", REDIS_URL, "--topic", topic)
        assert code == 0, out
        assert f"nothing needed  stream {topic}  (made by the first XADD" in out
        assert with_redis(lambda r: r.exists(topic)) == 0  # honest: nothing was made
        for action in ("created", "exists"):
            code, out = run("init", "--target", REDIS_URL, "--topic", topic, "--group", "billing")
            assert code == 0, out
            assert f"{action:<15} consumer group billing  (on stream {topic}" in out
        assert with_redis(lambda r: r.type(topic)) == b"stream"
        assert [g["name"] for g in with_redis(lambda r: r.xinfo_groups(topic))] == [b"billing"]


@pytest.mark.redis
def test_redis_a_key_that_is_not_a_stream_is_a_configuration_error(topic: str) -> None:
    with harness("redis") as h:
        h.topics.append(topic)
        with_redis(lambda r: r.set(topic, "x"))
        code, out = run("init", "--target", REDIS_URL, "--topic", topic)
        assert code == 2, out
        assert f"Redis key {topic!r} holds a string, not a stream" in out


def test_source_and_target_together(tmp_path: Path, topic: str) -> None:
    require_service("redis")
    url = f"sqlite:///{tmp_path / 'app.db'}"
    code, out = run("init", "--source", url, "--target", REDIS_URL, "--topic", topic)
    assert code == 0, out
    assert f"outbox ready at {url}" in out and "broker ready at redis://" in out
    assert run("status", "--source", url)[0] == 0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--target", "ftp://h", "--topic", "t"], "unknown target scheme 'ftp'"),
        (["--target", "kafka://nohostport", "--topic", "t"], "is not HOST:PORT"),
        (["--target", "redis://127.0.0.1:6379/orders", "--topic", "t"], "the database 'orders' is not a number"),
        (["--target", "amqp://guest:wrong@127.0.0.1/", "--topic", "t"], "refused the login in the URL"),
        (["--target", REDIS_URL], "--target needs at least one --topic"),
        (["--topic", "t"], "give --source URL (the outbox), --target URL (the broker), or both"),
        ([], "give --source URL"),
        (["--source", "sqlite:///x.db", "--topic", "t"], "need --target"),
        (["--target", REDIS_URL, "--topic", "t", "--partitions", "3"], "those options are for Kafka"),
    ],
)
def test_bad_input_exits_2_and_names_the_problem(
    args: list[str], needle: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if "amqp://" in " ".join(args):
        require_service("rabbitmq")
    monkeypatch.chdir(tmp_path)
    code, out = run("init", *args)
    assert code == 2, out
    assert needle in out
    assert not (tmp_path / "x.db").exists()  # refused before any work


@pytest.mark.nats
def test_an_unreachable_broker_is_reported_with_its_address() -> None:
    require_service("nats")
    code, out = run("init", "--target", "nats://127.0.0.1:4999", "--topic", "t", "--timeout-s", "2")
    assert code == 1, out  # the broker may just be down: a problem found, not bad usage
    assert "NATS at nats://127.0.0.1:4999" in out and "cannot connect" in out


def test_an_unreachable_rabbitmq_is_reported_once_in_our_words() -> None:
    """aiormq's own ERROR line ("error when creating transport") came before ours."""
    import subprocess
    import sys

    from zeroloss.embedded_broker import free_port

    port = free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "zeroloss", "init", "--target", f"amqp://guest:guest@127.0.0.1:{port}/", "--topic", "t"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr  # refused at once: no --timeout-s to wait out
    assert f"error: RabbitMQ at 127.0.0.1:{port}/: cannot connect" in proc.stderr
    assert "aiormq" not in proc.stderr and "creating transport" not in proc.stderr, proc.stderr


def test_an_unreachable_kafka_is_reported_with_what_to_check() -> None:
    """librdkafka's own words ("Failed while waiting for controller") name its wait, not the cause."""
    from zeroloss.embedded_broker import free_port

    port = free_port()
    code, out = run("init", "--target", f"kafka://127.0.0.1:{port}", "--topic", "t", "--timeout-s", "2")
    assert code == 1, out  # the broker may just be down: a problem found, not bad usage
    assert f"no Kafka broker answered at 127.0.0.1:{port} within 2 s" in out and "check that it runs" in out


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("ZEROLOSS_TARGET", raising=False)
    monkeypatch.delenv("ZEROLOSS_SOURCE", raising=False)
    yield


# -- --replication-factor: what the cluster can hold, or a clear error naming the option -----------


@pytest.mark.nats
def test_nats_replicas_asked_for_are_used_and_more_than_the_server_holds_is_refused(topic: str) -> None:
    with harness("nats") as h:
        h.topics.append(topic)
        code, out = run("init", "--target", NATS_URL, "--topic", topic, "--replication-factor", "3")
        assert code == 2, out
        assert "--replication-factor 3 is more than this NATS deployment can hold" in out
        assert "1 when not clustered" in out
        assert asyncio.run(nats_subjects(topic)) is None  # nothing created
        code, out = run("init", "--target", NATS_URL, "--topic", topic, "--replication-factor", "1")
        assert code == 0, out
        assert f"created         stream ZL_{topic}  (subject {topic}, file storage, 1 replica(s)" in out


@pytest.mark.kafka
def test_kafka_a_replication_factor_above_the_live_brokers_is_refused(kafka: Any, topic: str) -> None:
    code, out = run("init", "--target", kafka.url, "--topic", topic, "--replication-factor", "2")
    assert code == 2, out
    assert "--replication-factor 2 is more than the Kafka cluster at" in out and "1 live broker(s)" in out
    assert kafka_partitions(kafka.bootstrap, topic) == 0  # nothing created


@pytest.mark.rabbitmq
def test_rabbitmq_refuses_a_replication_factor_saying_why(topic: str) -> None:
    require_service("rabbitmq")
    code, out = run("init", "--target", AMQP_URL, "--topic", topic, "--replication-factor", "3")
    assert code == 2, out
    assert "--replication-factor is not taken for RabbitMQ" in out
    assert asyncio.run(amqp_queue(topic)) is None


def test_a_replication_factor_below_one_is_bad_usage(topic: str) -> None:
    code, out = run("init", "--target", NATS_URL, "--topic", topic, "--replication-factor", "0")
    assert code == 2 and "--replication-factor" in out and "0 is not in the range x>=1" in out


# -- RocketMQ: typed topics, made through the name server ------------------------------------------


def _rocketmq_topic_config(server: Any, name: str) -> dict[str, Any] | None:
    """The broker's own answer to GET_TOPIC_CONFIG (None: no such topic)."""
    import json

    header, body = server.remoting(server.broker_port, 351, {"topic": name})
    return json.loads(body) if header["code"] == 0 else None


@pytest.mark.rocketmq
def test_rocketmq_fifo_topics_dlq_and_group_are_created_once(rocketmq: Any, topic: str) -> None:
    from zeroloss.brokers.rocketmq import RocketMQBroker

    group = unique_topic("grp")
    args = ["init", "--target", rocketmq.zeroloss_url, "--topic", topic, "--partitions", "2", "--group", group]
    try:
        for action in ("created", "exists"):
            code, out = run(*args)
            assert code == 0, out
            assert f"{action:<15} topic {topic}  (FIFO, 2 queue(s) on 1 broker(s))" in out, out
            assert f"{action:<15} topic {topic}.dlq  (RocketMQ topic {topic}_dlq, FIFO, 2 queue(s)" in out, out
            assert f"{action:<15} consumer group {group}  (orderly True, retry max times 16" in out, out
        for name in (topic, f"{topic}_dlq"):
            config = _rocketmq_topic_config(rocketmq, name)
            assert config is not None and config["attributes"] == {"message.type": "FIFO"}
            assert config["writeQueueNums"] == config["readQueueNums"] == 2
    finally:
        broker = RocketMQBroker(rocketmq.zeroloss_url)
        try:
            broker.delete([topic])  # the demo's clean-up: both topics, from the broker and the name server
        finally:
            broker.close()
    assert _rocketmq_topic_config(rocketmq, topic) is None and _rocketmq_topic_config(rocketmq, f"{topic}_dlq") is None
    assert not rocketmq.routed(topic)


@pytest.mark.rocketmq
def test_rocketmq_a_transaction_topic_and_replicas_are_configuration_errors(rocketmq: Any, topic: str) -> None:
    with harness("rocketmq", rocketmq.zeroloss_url) as h:
        h.topics.append(topic)
        rocketmq.create_topic(topic, "TRANSACTION")
        code, out = run("init", "--target", rocketmq.zeroloss_url, "--topic", topic)
        assert code == 2, out
        assert f"RocketMQ topic {topic!r} exists with message type TRANSACTION" in out
        code, out = run("init", "--target", rocketmq.zeroloss_url, "--topic", topic, "--replication-factor", "2")
        assert code == 2, out
        assert "RocketMQ keeps copies per broker" in out


@pytest.mark.rocketmq
def test_rocketmq_an_unreachable_name_server_says_how_to_name_it(rocketmq: Any) -> None:
    code, out = run("init", "--target", f"rocketmq://{rocketmq.endpoint}", "--topic", "t", "--timeout-s", "2")
    assert code == 1, out
    assert f"RocketMQ name server {rocketmq.endpoint.split(':')[0]}:9876" in out and "?namesrv=HOST:PORT" in out
