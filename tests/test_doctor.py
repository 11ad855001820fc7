"""`zeroloss doctor` against the embedded broker, the local Redis and an outbox.

The embedded broker has one node, so no topic on it can have replication factor 3: doctor
recognises it and those checks warn, saying replication 1 is expected there and what production
needs; the tests assert exactly which checks warn for that reason, and that weak settings still fail.
"""

from __future__ import annotations

import json
import time
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
    return {c["name"][len(prefix) :]: c["verdict"] for c in doc["checks"] if c["name"].startswith(prefix)}


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
        "replication.factor": "warn",  # one node: expected here, and said so
        "min.insync.replicas": "warn",
        "min.insync.replicas < replication.factor": "warn",  # 1 = 1: one broker down stops writes
        "unclean.leader.election.enable": "fail",
        "replicas": "ok",  # its one replica is on the one live broker, in sync
    }
    fixes = {c["name"]: c["fix"] for c in doc["checks"]}
    assert "unclean.leader.election.enable=false" in fixes[f"topic {topic} unclean.leader.election.enable"]


@pytest.mark.kafka
def test_a_well_configured_topic_warns_only_for_what_one_node_cannot_give(kafka: EmbeddedBroker) -> None:
    topic = create_topic(kafka, {"min.insync.replicas": "2", "unclean.leader.election.enable": "false"})
    code, doc = run("doctor", "--target", kafka.url, "--topic", topic)
    assert code == 0 and doc["verdict"] == "warn"
    warning = {name for name, v in verdicts(doc).items() if v == "warn"}
    assert warning == {
        "broker kind",
        "broker default.replication.factor",
        f"topic {topic} replication.factor",
        f"topic {topic} min.insync.replicas < replication.factor",
    }
    got = verdicts(doc, f"topic {topic} ")
    assert got["min.insync.replicas"] == got["unclean.leader.election.enable"] == "ok"
    # With a replication factor the broker can give, only min.insync.replicas > RF remains: honest.
    code, doc = run("doctor", "--target", kafka.url, "--topic", topic, "--min-replication", "1")
    warning = {name for name, v in verdicts(doc).items() if v == "warn"}
    assert warning == {
        "broker kind",
        "broker default.replication.factor",
        f"topic {topic} min.insync.replicas < replication.factor",
    }


@pytest.mark.kafka
def test_replication_factor_3_on_a_one_broker_cluster_counts_as_one(kafka: EmbeddedBroker) -> None:
    """The embedded broker accepts RF 3 and lists its one node three times as the replicas."""
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = unique_topic("doctor")
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    admin.create_topics([NewTopic(topic, 1, 3)])[topic].result(30)
    _, doc = run("doctor", "--target", kafka.url, "--topic", topic)
    details = {c["name"]: (c["verdict"], c["detail"]) for c in doc["checks"]}
    assert details[f"topic {topic} replication.factor"] == (
        "warn",
        "1 (need >= 3); expected on the embedded broker (one node, replication 1)",
    )


@pytest.mark.kafka
def test_settings_the_broker_does_not_report_are_warnings_with_the_kafka_default(kafka: EmbeddedBroker) -> None:
    topic = create_topic(kafka)
    code, doc = run("doctor", "--target", kafka.url, "--topic", topic, "--min-replication", "1")
    assert code == 0 and doc["verdict"] == "warn"
    details = {c["name"]: (c["verdict"], c["detail"]) for c in doc["checks"]}
    assert details[f"topic {topic} min.insync.replicas"] == (
        "warn",
        "not reported; Kafka's default is 1 (need >= "
        "2 for acks=all); expected on the embedded broker "
        "(one node, replication 1)",
    )
    assert details[f"topic {topic} unclean.leader.election.enable"][0] == "warn"
    assert "false" in details[f"topic {topic} unclean.leader.election.enable"][1]


@pytest.mark.kafka
def test_client_settings_are_checked_and_a_missing_topic_fails(kafka: EmbeddedBroker) -> None:
    code, doc = run("doctor", "--target", kafka.url, "--topic", unique_topic("absent"))
    assert code == 1
    got = verdicts(doc)
    for name in (
        "producer acks",
        "producer enable.idempotence",
        "producer retries",
        "producer transactional.id",
        "producer max.in.flight.requests.per.connection",
        "consumer enable.auto.commit",
        "consumer isolation.level",
        "broker reachable",
    ):
        assert got[name] == "ok", name
    assert [v for n, v in got.items() if n.startswith("topic ")] == ["fail"]


@pytest.mark.kafka
def test_the_embedded_broker_is_named_and_production_is_described(kafka: EmbeddedBroker) -> None:
    """A new user's first doctor run, on `zeroloss broker`: no bare failure, but what it is and
    what to run in production; exit 0."""
    result = CliRunner().invoke(main, ["doctor", "--target", kafka.url, "--topic", create_topic(kafka)])
    assert result.exit_code == 0, result.output
    kind = next(line for line in result.output.splitlines() if "broker kind" in line)
    assert kind.startswith("warn") and "embedded" in kind and "replication 1 is expected here" in kind, kind
    assert "--replication-factor 3" in kind and "min.insync.replicas=2" in kind
    assert "fail " not in result.output and result.output.rstrip().endswith("verdict: warn")


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
    assert "zeroloss init" in doc["checks"][0]["fix"] and not (tmp_path / "app.db").exists()  # not made
    assert CliRunner().invoke(main, ["init", "--source", url]).exit_code == 0
    code, doc = run("doctor", "--source", url)
    assert code == 0 and verdicts(doc) == {"outbox reachable": "ok"}
    spool = f"spool://{tmp_path / 'spool'}"
    code, doc = run("doctor", "--source", spool)
    assert code == 1 and verdicts(doc) == {"outbox reachable": "fail"}  # not there: not made either
    assert "zeroloss init" in doc["checks"][0]["fix"] and not (tmp_path / "spool").exists()
    assert CliRunner().invoke(main, ["init", "--source", spool]).exit_code == 0
    code, doc = run("doctor", "--source", spool)
    assert set(verdicts(doc)) == {"outbox reachable", "spool disk"}


def test_bad_usage_exits_2() -> None:
    result = CliRunner().invoke(main, ["doctor", "--target", "mqtt://localhost/"])  # amqp:// and nats:// are known now
    assert result.exit_code == 2 and "kafka://, nats://, amqp://, redis:// and rocketmq://" in result.output
    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code == 2 and "nothing to check" in result.output


# -- on the three-broker Apache Kafka cluster: where the durability settings are real ----------


def cluster_topic(cluster: Any, replication: int = 3, config: dict[str, str] | None = None) -> str:
    from confluent_kafka.admin import NewTopic

    topic = unique_topic("doctor")
    cluster.admin().create_topics([NewTopic(topic, 2, replication, config=config or {})])[topic].result(30)
    cluster.wait_in_sync(topic) if replication == 3 else None
    return topic


@pytest.mark.kafka_cluster
def test_a_strong_topic_on_the_cluster_passes(kafka_cluster: Any) -> None:
    topic = cluster_topic(kafka_cluster)
    code, doc = run("doctor", "--target", kafka_cluster.url, "--topic", topic)
    assert code == 0 and doc["verdict"] == "ok", doc
    got = verdicts(doc, f"topic {topic} ")
    assert got == {
        "replication.factor": "ok",
        "min.insync.replicas": "ok",
        "min.insync.replicas < replication.factor": "ok",
        "unclean.leader.election.enable": "ok",
        "replicas": "ok",
    }
    assert verdicts(doc)["broker default.replication.factor"] == "ok"


@pytest.mark.kafka_cluster
@pytest.mark.parametrize(
    ("replication", "config", "failing", "fix"),
    [
        # RF 1 under the cluster's min.insync.replicas=2: every write refused as well.
        (1, {}, ("replication.factor", "min.insync.replicas < replication.factor"), "3 replicas"),
        (3, {"min.insync.replicas": "1"}, ("min.insync.replicas",), "min.insync.replicas=2"),
        (
            3,
            {"unclean.leader.election.enable": "true"},
            ("unclean.leader.election.enable",),
            "unclean.leader.election.enable=false",
        ),
    ],
    ids=["replication-1", "min-isr-1", "unclean-election"],
)
def test_a_weak_topic_on_the_cluster_fails_naming_the_setting_and_the_fix(
    kafka_cluster: Any, replication: int, config: dict[str, str], failing: tuple[str, ...], fix: str
) -> None:
    topic = cluster_topic(kafka_cluster, replication, config)
    code, doc = run("doctor", "--target", kafka_cluster.url, "--topic", topic)
    assert code == 1 and doc["verdict"] == "fail"
    bad = {c["name"]: c for c in doc["checks"] if c["verdict"] == "fail"}
    assert set(bad) == {f"topic {topic} {name}" for name in failing}, bad
    assert fix in bad[f"topic {topic} {failing[0]}"]["fix"]


def doctor_until(cluster: Any, topic: str, node: int, verdict: str) -> dict[str, Any]:
    """Run doctor against ``node`` until the topic's live replicas check says ``verdict``."""
    deadline = time.monotonic() + 60
    while True:
        _, doc = run(
            "doctor", "--target", f"kafka://127.0.0.1:{cluster.nodes[node].port}", "--topic", topic, "--timeout-s", "5"
        )
        if verdicts(doc, f"topic {topic} ").get("replicas") == verdict:
            break
        assert time.monotonic() < deadline, [c for c in doc["checks"] if c["name"].endswith("replicas")]
        time.sleep(0.2)
    return next(c for c in doc["checks"] if c["name"] == f"topic {topic} replicas")


@pytest.mark.kafka_cluster
def test_replicas_out_of_sync_are_seen_live_not_as_configured(kafka_cluster: Any) -> None:
    """The configuration says RF 3 and min ISR 2 whatever happens to the brokers; doctor reads
    the in-sync set. (Two of three combined nodes down would also take the controller quorum
    with them and freeze the metadata, so a broker is taken from a topic of two replicas.)"""
    from confluent_kafka.admin import NewTopic

    topic = cluster_topic(kafka_cluster)
    leader = kafka_cluster.leader_of(topic, 0)
    follower = next(n for n in (1, 2, 3) if n != leader)
    pair = unique_topic("doctor")
    kafka_cluster.admin().create_topics(
        [NewTopic(pair, num_partitions=1, replica_assignment=[[leader, follower]], config={"min.insync.replicas": "2"})]
    )[pair].result(30)
    kafka_cluster.wait_in_sync(topic)
    kafka_cluster.kill(follower)
    try:
        check = doctor_until(kafka_cluster, topic, leader, "warn")
        assert "under-replicated" in check["detail"]
        check = doctor_until(kafka_cluster, pair, leader, "fail")
        assert "NOT_ENOUGH_REPLICAS" in check["detail"] and "min.insync.replicas=2" in check["detail"]
    finally:
        kafka_cluster.restart(follower)
    kafka_cluster.wait_in_sync(topic)
    _, doc = run("doctor", "--target", kafka_cluster.url, "--topic", topic)
    assert verdicts(doc, f"topic {topic} ")["replicas"] == "ok"
