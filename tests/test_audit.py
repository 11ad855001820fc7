"""`zeroloss audit`: the success ledger against a real broker that loses everything, and against
a consumer group's inbox; `--repair` sends the missing ones again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.conftest import OutboxHarness, unique_topic
from zeroloss.brokers.kafka import KafkaBroker
from zeroloss.cli import main
from zeroloss.embedded_broker import EmbeddedBroker, free_port
from zeroloss.outbox.base import Delivered, State
from zeroloss.relay import Relay, RelaySettings

FAST = RelaySettings(batch_size=100, backoff_base_s=0.01, max_backoff_s=0.05, idle_wait_s=0.01)


def source(h: OutboxHarness) -> list[str]:
    if h.kind == "spool":
        return ["--source", f"spool://{h.store.root}"]
    return ["--source", h.store.url, "--table", h.store.table.name]


def audit(*args: str) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(main, ["audit", *args, "--json"])
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


def drain(h: OutboxHarness, broker: EmbeddedBroker, name: str) -> None:
    kafka = KafkaBroker(broker.url, transactional_id=f"audit-{name}-{unique_topic()}", timeout_s=15)
    try:
        Relay(h.store, kafka, FAST).drain(timeout_s=120)
    finally:
        kafka.close()


@pytest.mark.kafka
@pytest.mark.slow
def test_audit_finds_what_a_restarted_broker_lost_and_repair_resends_it(outbox: OutboxHarness, tmp_path: Path) -> None:
    broker = EmbeddedBroker(free_port()).start()  # memory storage: a restart loses everything
    topic = unique_topic("audit")
    try:
        old = [outbox.add(topic=topic, value=b"%d" % i, key=b"k%d" % (i % 3)) for i in range(40)]
        drain(outbox, broker, "first")
        code, doc = audit(*source(outbox), "--target", broker.url)
        assert code == 0, doc
        assert (doc["checked"], doc["broker"]["confirmed"], doc["missing"]) == (40, 40, [])

        broker.stop()
        broker.start()  # a fresh, empty broker on the same port
        code, doc = audit(*source(outbox), "--target", broker.url)
        assert code == 1
        assert doc["missing"] == old and doc["loss_rate"] == {"broker": 1.0}
        assert all("does not exist" in why for why in doc["broker"]["missing"].values())

        # New traffic recreates the topic and reuses the lost offsets: still missing, by position.
        new = [outbox.add(topic=topic, value=b"new%d" % i, key=b"k%d" % i) for i in range(6)]
        drain(outbox, broker, "second")
        prom = tmp_path / "audit.prom"
        code, doc = audit(*source(outbox), "--target", broker.url, "--repair", "--prom-file", str(prom))
        assert code == 1
        assert doc["missing"] == old and doc["broker"]["confirmed"] == len(new) and doc["repaired"] == len(old), doc
        assert any("holds" in why for why in doc["broker"]["missing"].values()), doc["broker"]["missing"]
        assert 'zeroloss_audit_missing_messages{where="broker"} 40.0' in prom.read_text()
        counts = outbox.store.stats().counts
        assert (counts[State.PENDING], counts[State.SUCCESS]) == (40, 6)

        drain(outbox, broker, "third")  # the relay sends them again, same ids
        code, doc = audit(*source(outbox), "--target", broker.url, "--prom-file", str(prom))
        assert code == 0, doc
        assert (doc["checked"], doc["broker"]["confirmed"]) == (46, 46)
        text = prom.read_text()
        assert 'zeroloss_audit_loss_ratio{where="broker"} 0.0' in text
        assert "zeroloss_audit_checked_messages 46.0" in text
    finally:
        broker.stop()


@pytest.mark.kafka
def test_records_without_a_usable_position_are_missing_with_the_reason(kafka: EmbeddedBroker, tmp_path: Path) -> None:
    from zeroloss.outbox.sql import SqlOutbox

    url = f"sqlite:///{tmp_path / 'o.db'}"
    store = SqlOutbox(url)
    store.create_schema()
    with store.engine.begin() as conn:
        ids = [store.add(conn, topic=unique_topic("gone"), value=b"x") for _ in range(2)]
    a, b = store.claim(2, lease_s=30)
    store.succeed([Delivered(a, ""), Delivered(b, f"{b.topic}/0/5")])
    code, doc = audit("--source", url, "--target", kafka.url, "--since-s", "3600")
    assert code == 1
    assert doc["broker"]["missing"] == {
        ids[0]: "no broker position recorded ('')",
        ids[1]: f"topic {b.topic} does not exist on the broker",
    }
    store.close()


def test_audit_against_a_consumer_groups_inbox(tmp_path: Path) -> None:
    from zeroloss.inbox import SqlInbox
    from zeroloss.outbox.sql import SqlOutbox

    url, inbox_url = f"sqlite:///{tmp_path / 'o.db'}", f"sqlite:///{tmp_path / 'inbox.db'}"
    store = SqlOutbox(url)
    store.create_schema()
    with store.engine.begin() as conn:
        ids = [store.add(conn, topic="t", value=b"%d" % i) for i in range(10)]
    store.succeed([Delivered(m, f"t/0/{i}") for i, m in enumerate(store.claim(10, lease_s=30))])
    inbox = SqlInbox(inbox_url)
    inbox.create_schema()
    for mid in ids[:7]:
        with inbox.transaction() as tx:
            inbox.claim(tx, "billing", mid)
    with inbox.transaction() as tx:
        inbox.claim(tx, "shipping", ids[9])  # another group's claim counts for nothing here
    inbox.close()

    args = ["--source", url, "--inbox", inbox_url, "--group", "billing"]
    code, doc = audit(*args)  # everything is younger than the default grace: not judged yet
    assert code == 0 and doc["inbox"]["too_recent"] == 10
    code, doc = audit(*args, "--grace-s", "0")
    assert code == 1
    assert (doc["inbox"]["consumed"], doc["inbox"]["missing"]) == (7, ids[7:])
    assert doc["loss_rate"] == {"inbox": pytest.approx(0.3)}
    code, doc = audit(*args, "--grace-s", "0", "--repair")
    assert doc["repaired"] == 3
    assert [m.id for m in store.list(State.PENDING)] == ids[7:]
    store.close()


def test_audit_needs_somewhere_to_look(tmp_path: Path) -> None:
    assert CliRunner().invoke(main, ["init", "--source", f"spool://{tmp_path / 's'}"]).exit_code == 0
    result = CliRunner().invoke(main, ["audit", "--source", f"spool://{tmp_path / 's'}"])
    assert result.exit_code == 2 and "--target" in result.output
    result = CliRunner().invoke(main, ["audit", "--source", f"spool://{tmp_path / 's'}", "--inbox", "sqlite://"])
    assert result.exit_code == 2 and "--group" in result.output


def test_an_unreachable_broker_is_an_error_even_with_nothing_to_check(tmp_path: Path) -> None:
    """An empty ledger against a broker that does not answer must not read as "0 missing, fine"."""
    assert CliRunner().invoke(main, ["init", "--source", f"spool://{tmp_path / 's'}"]).exit_code == 0
    result = CliRunner().invoke(
        main,
        [
            "audit",
            "--source",
            f"spool://{tmp_path / 's'}",
            "--target",
            f"kafka://127.0.0.1:{free_port()}",
            "--timeout-s",
            "3",
        ],
    )
    assert result.exit_code == 1, result.output
    assert "cannot read the broker's metadata" in result.output


@pytest.mark.rocketmq
@pytest.mark.parametrize("outbox", ["sqlite"], indirect=True)
def test_rocketmq_audit_finds_each_message_by_its_id_and_what_no_consumer_can_reach(
    rocketmq: Any, outbox: OutboxHarness
) -> None:
    """Confirmed by message id (the broker's index) and the queue's readable offsets; after the
    topic is deleted and made again, the messages are still in the commit log and its index, but
    no consumer can read them: missing, saying so."""
    from zeroloss.brokers.rocketmq import RocketMQBroker

    topic = unique_topic("audit")
    broker = RocketMQBroker(rocketmq.zeroloss_url, timeout_s=10)
    try:
        broker.declare([topic])
        ids = [outbox.add(topic=topic, value=b"%d" % i, key=b"k%d" % (i % 3)) for i in range(20)]
        Relay(outbox.store, broker, FAST).drain(timeout_s=60)
        code, doc = audit(*source(outbox), "--target", rocketmq.zeroloss_url)
        assert code == 0 and doc["broker"]["confirmed"] == 20 and doc["missing"] == [], doc
        broker.delete([topic])
        broker.declare([topic])  # the same name, empty queues
        code, doc = audit(*source(outbox), "--target", rocketmq.zeroloss_url)
        assert code == 1 and doc["missing"] == sorted(ids), doc
        assert all("no consumer can read it" in why for why in doc["broker"]["missing"].values()), doc
    finally:
        broker.delete([topic])
        broker.close()


@pytest.mark.rocketmq
def test_rocketmq_audit_a_position_that_is_not_a_message_id_is_missing(rocketmq: Any, tmp_path: Path) -> None:
    from zeroloss.outbox.spool import FileSpool

    spool = FileSpool(tmp_path / "spool")
    with spool.transaction() as tx:
        mid = tx.add(topic="t", value=b"v")
    (claimed,) = spool.claim(10, 60)
    spool.succeed([Delivered(claimed, "t/0/17")])  # a Kafka-style position: no message id to look up
    code, doc = audit("--source", f"spool://{spool.root}", "--target", rocketmq.zeroloss_url)
    assert code == 1 and doc["missing"] == [mid]
    assert "no RocketMQ message id recorded" in doc["broker"]["missing"][mid]
