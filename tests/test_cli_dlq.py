"""zeroloss dlq list|show|replay against a real broker."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.broker_harness import harness
from tests.conftest import require_service, unique_topic
from tests.effects_db import make_db
from tests.waiting import wait_until
from zeroloss.brokers.base import Status
from zeroloss.cli import main
from zeroloss.consumer import Consumer
from zeroloss.consumer.dead_letters import DeadLetterPublisher, dead_letter
from zeroloss.dlq import list_dead_letters
from zeroloss.embedded_broker import EmbeddedBroker
from zeroloss.message import new_message, uuid7
from zeroloss.readback import read_topic


@pytest.fixture
def kafka(kafka_cluster: Any) -> Any:
    """The Kafka tests here run on the real three-broker Apache Kafka cluster (RF 3, min ISR 2)."""
    return kafka_cluster


@pytest.mark.kafka_cluster
def test_list_show_replay_and_bad_input(kafka: EmbeddedBroker) -> None:
    topic = unique_topic("orders")
    ids = [uuid7(), uuid7()]
    pub = DeadLetterPublisher(kafka.url)
    for n, mid in enumerate(ids):
        pub.publish(
            dead_letter(
                message_id=mid,
                topic=topic,
                partition=0,
                offset=n,
                key=b"k",
                value=b"v%d" % n,
                headers=(("trace", b"t"),),
                error=ValueError("bad total"),
                attempts=5,
                first_failure=time.time(),
            )
        )
    pub.close()
    run = CliRunner().invoke

    listed = run(main, ["dlq", "list", "--target", kafka.url, "--topic", topic, "--json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.output)
    assert [r["id"] for r in rows] == ids
    assert rows[0]["error_type"] == "ValueError" and rows[0]["attempts"] == 5

    shown = run(main, ["dlq", "show", "--target", kafka.url, "--topic", f"{topic}.dlq", ids[1]])
    assert shown.exit_code == 0 and "bad total" in shown.output and "v1" in shown.output

    unknown = run(main, ["dlq", "show", "--target", kafka.url, "--topic", topic, uuid7()])
    assert unknown.exit_code == 2 and "no dead letter" in unknown.output

    neither = run(main, ["dlq", "replay", "--target", kafka.url, "--topic", topic])
    assert neither.exit_code == 2 and "--all" in neither.output

    replayed = run(main, ["dlq", "replay", "--target", kafka.url, "--topic", topic, "--all"])
    assert replayed.exit_code == 0 and "replayed 2" in replayed.output, replayed.output
    back = read_topic(kafka.url, topic, expect=ids)
    assert set(back.ids) == set(ids)  # with their original ids: the inbox runs each at most once


@pytest.mark.kafka_cluster
def test_a_slow_leader_delays_the_list_but_never_shortens_it(kafka: Any) -> None:
    """The list ends at the end of every partition, not after a quiet spell: with the dead
    letters' leader frozen for longer than the old 2 s idle rule, it still lists them all."""
    from confluent_kafka.admin import NewTopic

    topic = unique_topic("orders")
    kafka.admin().create_topics([NewTopic(f"{topic}.dlq", 1, 3)])[f"{topic}.dlq"].result(30)
    kafka.wait_in_sync(f"{topic}.dlq")
    pub = DeadLetterPublisher(kafka.url)
    ids = [uuid7() for _ in range(5)]
    for n, mid in enumerate(ids):
        pub.publish(
            dead_letter(
                message_id=mid,
                topic=topic,
                partition=0,
                offset=n,
                key=b"k",
                value=b"v",
                headers=(),
                error=ValueError("x"),
                attempts=1,
                first_failure=time.time(),
            )
        )
    pub.close()
    leader = kafka.leader_of(f"{topic}.dlq", 0)
    got: list[list[str]] = []
    kafka.pause(leader)
    try:
        lister = threading.Thread(target=lambda: got.append([d.id for d in list_dead_letters(kafka.url, topic)]))
        lister.start()
        lister.join(4.0)  # the frozen leader's fault lasts this long: past the old idle rule
        assert not got, "the list ended while the partition's leader could not answer"
    finally:
        kafka.resume(leader)
    lister.join(60)
    assert got == [ids]


@pytest.mark.kafka_cluster
def test_a_topic_that_does_not_exist_is_bad_usage_not_zero_dead_letters(kafka: Any) -> None:
    from confluent_kafka.admin import NewTopic

    typo = CliRunner().invoke(main, ["dlq", "list", "--target", kafka.url, "--topic", unique_topic("typo")])
    assert typo.exit_code == 2 and "no topic" in typo.output and "check the name" in typo.output
    topic = unique_topic("orders")  # exists, has never dead-lettered anything: an honest zero
    kafka.admin().create_topics([NewTopic(topic, 1, 3)])[topic].result(30)

    # A topic just created reaches the other brokers' metadata a moment later: until then the one
    # that answers says "no topic" (it did in a CI check), so ask until the cluster agrees.
    def listed() -> Any:
        result = CliRunner().invoke(main, ["dlq", "list", "--target", kafka.url, "--topic", topic])
        return result if result.exit_code == 0 else None

    fine = wait_until(listed, 30, f"{topic} in every broker's metadata", interval=0.5)
    assert fine.exit_code == 0 and f"0 dead letter(s) in {topic}.dlq" in fine.output, fine.output


CONSUMER_CONFIG = {"nats": {"ack_wait_s": 2.0}, "redis": {"claim_idle_s": 1.0, "claim_every_s": 0.2}}


@pytest.mark.parametrize("name", [pytest.param(n, marks=getattr(pytest.mark, n)) for n in ("nats", "redis")])
def test_dead_letters_on_nats_and_redis_are_listed_shown_and_replayed_once(name: str, tmp_path: Path) -> None:
    """The operator's loop on a non-Kafka broker: a handler fails, its message is dead-lettered
    with the error; dlq list/show say why; the fixed handler gets it back through dlq replay and
    applies it exactly once. The replay happens well inside NATS's duplicate window, where a
    republish under the original Nats-Msg-Id would be dropped silently."""
    with harness(name) as h:
        topic = unique_topic("dlqcli")
        h.topics.append(topic)
        msgs = [new_message(topic, b"%d" % i, key=b"k", headers=[("trace", b"t-%d" % i)]) for i in range(5)]
        bad = msgs[2]
        b = h.make()
        try:
            assert {o.status for o in b.publish(msgs)} == {Status.DELIVERED}
        finally:
            b.close()
        dbs = make_db("sqlite", tmp_path)
        db = next(dbs)
        broken = True

        def consume() -> Consumer:
            c = Consumer(
                h.url,
                f"g-{topic}",
                [topic],
                db.inbox,
                config=dict(CONSUMER_CONFIG[name]),
                max_attempts=2,
                backoff_base_s=0.01,
                poll_s=0.2,
            )

            @c.handler
            def handle(msg: Any, tx: Any) -> None:
                if broken and msg.id == bad.id:
                    raise ValueError("total is negative")
                db.record(msg, tx)

            try:
                c.run_until_idle(idle_s=1.5, timeout_s=60)
            finally:
                c.close()
            return c

        try:
            assert consume().counters.dead_lettered == 1
            run = CliRunner().invoke

            listed = run(main, ["dlq", "list", "--target", h.url, "--topic", topic, "--json"])
            assert listed.exit_code == 0, listed.output
            rows = json.loads(listed.output)
            assert [r["id"] for r in rows] == [bad.id]
            assert rows[0]["error_type"] == "ValueError" and rows[0]["attempts"] == 2
            assert rows[0]["original_topic"] == topic and rows[0]["headers"] == [["trace", "t-2"]]

            shown = run(main, ["dlq", "show", "--target", h.url, "--topic", f"{topic}.dlq", bad.id])
            assert shown.exit_code == 0 and "total is negative" in shown.output, shown.output
            assert re.search(r"^first_failure +\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$", shown.output, re.M)
            assert run(main, ["dlq", "show", "--target", h.url, "--topic", topic, uuid7()]).exit_code == 2

            broken = False
            replayed = run(main, ["dlq", "replay", "--target", h.url, "--topic", topic, "--all"])
            assert replayed.exit_code == 0 and "replayed 1" in replayed.output, replayed.output
            assert [mid for mid, _ in h.read(topic)].count(bad.id) == 2  # the original and its replay
            again = consume()
            assert again.counters.processed == 1
            assert db.counts() == Counter({m.id: 1 for m in msgs})
            # replaying it twice has no second effect: the inbox knows the id
            assert run(main, ["dlq", "replay", "--target", h.url, "--topic", topic, bad.id]).exit_code == 0
            assert consume().counters.duplicates == 1
            assert db.counts() == Counter({m.id: 1 for m in msgs})
        finally:
            dbs.close()


@pytest.mark.rabbitmq
def test_rabbitmq_dead_letters_are_not_read_and_the_reason_is_given() -> None:
    require_service("rabbitmq")
    out = CliRunner().invoke(main, ["dlq", "list", "--target", "amqp://guest:guest@127.0.0.1/", "orders"])
    assert out.exit_code == 2, out.output
    assert "cannot be read without taking messages off it" in out.output
    assert "zeroloss dlq reads Kafka, NATS, Redis and RocketMQ" in out.output  # what it does read, all of it
