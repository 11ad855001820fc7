"""`zeroloss doctor` against the embedded broker, the local Redis and an outbox.

The embedded broker has one node, so no topic on it can have replication factor 3: the tests
assert exactly which checks fail for that reason, and that nothing else does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.conftest import REDIS_URL, require_service, unique_topic
from zeroloss.cli import main
from zeroloss.embedded_broker import EmbeddedBroker, free_port


def run(*args: str) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.output)


def verdicts(doc: dict[str, Any], prefix: str = "") -> dict[str, str]:
    return {c["name"][len(prefix):]: c["verdict"] for c in doc["checks"] if c["name"].startswith(prefix)}


def create_topic(kafka: EmbeddedBroker, config: dict[str, str] | None = None) -> str:
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = unique_topic("doctor")
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    admin.create_topics([NewTopic(topic, 1, 1, config=config or {})])[topic].result(30)
    return topic


@pytest.mark.kafka
def test_a_weak_topic_is_flagged(kafka: EmbeddedBroker) -> None:
    topic = create_topic(kafka, {"min.insync.replicas": "1", "unclean.leader.election.enable": "true"})
    code, doc = run("doctor", "--target", kafka.url, "--topic", topic)
    assert code == 1 and doc["verdict"] == "fail"
    got = verdicts(doc, f"topic {topic} ")
    assert got == {
        "replication.factor": "fail",
        "min.insync.replicas": "fail",
        "min.insync.replicas < replication.factor": "warn",  # 1 = 1: one broker down stops writes
        "unclean.leader.election.enable": "fail",
    }
    fixes = {c["name"]: c["fix"] for c in doc["checks"]}
    assert "unclean.leader.election.enable=false" in fixes[f"topic {topic} unclean.leader.election.enable"]


@pytest.mark.kafka
def test_a_well_configured_topic_fails_only_for_what_one_node_cannot_give(kafka: EmbeddedBroker) -> None:
    topic = create_topic(kafka, {"min.insync.replicas": "2", "unclean.leader.election.enable": "false"})
    code, doc = run("doctor", "--target", kafka.url, "--topic", topic)
    assert code == 1
    failing = {name for name, v in verdicts(doc).items() if v == "fail"}
    assert failing == {f"topic {topic} replication.factor", f"topic {topic} min.insync.replicas < replication.factor"}
    got = verdicts(doc, f"topic {topic} ")
    assert got["min.insync.replicas"] == got["unclean.leader.election.enable"] == "ok"
    # With a replication factor the broker can give, only min.insync.replicas > RF remains: honest.
    code, doc = run("doctor", "--target", kafka.url, "--topic", topic, "--min-replication", "1")
    failing = {name for name, v in verdicts(doc).items() if v == "fail"}
    assert failing == {f"topic {topic} min.insync.replicas < replication.factor"}


@pytest.mark.kafka
def test_settings_the_broker_does_not_report_are_warnings_with_the_kafka_default(kafka: EmbeddedBroker) -> None:
    topic = create_topic(kafka)
    code, doc = run("doctor", "--target", kafka.url, "--topic", topic, "--min-replication", "1")
    assert code == 0 and doc["verdict"] == "warn"
    details = {c["name"]: (c["verdict"], c["detail"]) for c in doc["checks"]}
    assert details[f"topic {topic} min.insync.replicas"] == ("warn", "not reported; Kafka's default is 1 "
                                                             "(need >= 2 for acks=all)")
    assert details[f"topic {topic} unclean.leader.election.enable"][0] == "warn"
    assert "false" in details[f"topic {topic} unclean.leader.election.enable"][1]


@pytest.mark.kafka
def test_client_settings_are_checked_and_a_missing_topic_fails(kafka: EmbeddedBroker) -> None:
    code, doc = run("doctor", "--target", kafka.url, "--topic", unique_topic("absent"))
    assert code == 1
    got = verdicts(doc)
    for name in ("producer acks", "producer enable.idempotence", "producer retries", "producer transactional.id",
                 "producer max.in.flight.requests.per.connection", "consumer enable.auto.commit",
                 "consumer isolation.level", "broker reachable"):
        assert got[name] == "ok", name
    assert [v for n, v in got.items() if n.startswith("topic ")] == ["fail"]


def test_an_unreachable_broker_fails_without_a_traceback() -> None:
    code, doc = run("doctor", "--target", f"kafka://127.0.0.1:{free_port()}", "--timeout-s", "1")
    assert code == 1
    assert verdicts(doc)["broker reachable"] == "fail"


@pytest.mark.redis
def test_redis_persistence_is_checked_against_the_real_server() -> None:
    require_service("redis")
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    conf = {**client.config_get("appendonly"), **client.config_get("appendfsync")}
    client.close()
    code, doc = run("doctor", "--target", REDIS_URL)
    got = verdicts(doc, "redis ")
    assert got["reachable"] == "ok"
    if conf["appendonly"] == "no":  # how the development machines run it
        assert got["appendonly"] == "fail" and code == 1
    aof, fsync = conf["appendonly"], conf["appendfsync"]
    expect = "ok" if aof == "yes" and fsync == "always" else "warn" if fsync == "everysec" else "fail"
    assert got["appendfsync"] == expect
    everysec = next(c for c in doc["checks"] if c["name"] == "redis appendfsync")
    if conf["appendfsync"] == "everysec":
        assert "1 s" in everysec["detail"]


def test_the_outbox_is_checked(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    code, doc = run("doctor", "--source", url)
    assert code == 1 and verdicts(doc)["outbox reachable"] == "fail"
    assert "zeroloss init" in doc["checks"][0]["fix"]
    assert CliRunner().invoke(main, ["init", "--source", url]).exit_code == 0
    code, doc = run("doctor", "--source", url)
    assert code == 0 and verdicts(doc) == {"outbox reachable": "ok"}
    code, doc = run("doctor", "--source", f"spool://{tmp_path / 'spool'}")
    assert set(verdicts(doc)) == {"outbox reachable", "spool disk"}


def test_bad_usage_exits_2() -> None:
    result = CliRunner().invoke(main, ["doctor", "--target", "amqp://guest@localhost/"])
    assert result.exit_code == 2 and "kafka:// and redis://" in result.output
    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code == 2 and "nothing to check" in result.output
