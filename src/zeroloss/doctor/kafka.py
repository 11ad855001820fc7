"""``zeroloss doctor`` on Kafka: the relay's producer settings (acks=all, idempotence, a
transactional id), the consumer's (no auto commit, read_committed), and the broker and topic
through the AdminClient (replication factor, min.insync.replicas, unclean leader election). What
each check means: docs/design.md, "doctor/checks.py"."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from zeroloss.doctor.base import Check, Verdict

if TYPE_CHECKING:
    pass

log = logging.getLogger("zeroloss.doctor.checks")  # doctor's logger name, as before the split

EMBEDDED_CLUSTER_ID = "tansu_cluster"
"""The cluster id the embedded broker (Tansu, ``zeroloss broker``) reports: how doctor knows it."""

PRODUCTION_KAFKA = (
    "in production, point --target at a Kafka cluster of 3 or more brokers, create each topic with "
    "`zeroloss init --target kafka://HOST:9092 --topic T --replication-factor 3`, set "
    "min.insync.replicas=2 and unclean.leader.election.enable=false on it, and run doctor there"
)

_ONE_NODE = ("replication.factor", "min.insync.replicas")
"""Endings of the checks whose verdict on one node is decided by having one node, not by a
setting (replication factor, default replication factor, min.insync.replicas, and the two compared)."""

KAFKA_DEFAULTS = {
    "min.insync.replicas": "1",
    "unclean.leader.election.enable": "false",
    "default.replication.factor": "1",
}
"""What Apache Kafka uses when nothing is configured (reported when a broker does not say)."""


def producer_checks(bootstrap: str) -> list[Check]:
    from zeroloss.brokers.kafka_client import producer_config

    conf = producer_config(bootstrap, "zeroloss-relay-doctor", 30.0)
    fix = "zeroloss sets this itself; remove the override from the relay's producer config"

    def check(name: str, good: bool, why: str) -> Check:
        return Check(
            f"producer {name}",
            Verdict.OK if good else Verdict.FAIL,
            f"{name}={conf.get(name)}{'' if good else ': ' + why}",
            "" if good else fix,
        )

    inflight = int(conf.get("max.in.flight.requests.per.connection", 1_000_000))
    return [
        check("acks", str(conf.get("acks")) in ("all", "-1"), "the leader alone acknowledges; a failover loses it"),
        check(
            "enable.idempotence",
            str(conf.get("enable.idempotence")).lower() == "true",
            "retries can duplicate and reorder",
        ),
        check("retries", int(conf.get("retries", 0)) > 0, "a transient error fails the message"),
        check("max.in.flight.requests.per.connection", inflight <= 5, "idempotence keeps order only up to 5"),
        check("transactional.id", bool(conf.get("transactional.id")), "no fencing of a zombie relay"),
    ]


def consumer_checks() -> list[Check]:
    try:
        from zeroloss.consumer import consumer_config
    except ImportError as exc:
        return [Check("consumer settings", Verdict.SKIP, f"zeroloss.consumer is not available ({exc})")]
    conf = consumer_config("doctor:9092", "doctor")
    auto = str(conf.get("enable.auto.commit")).lower() in ("false", "0")
    committed = conf.get("isolation.level") == "read_committed"
    return [
        Check(
            "consumer enable.auto.commit",
            Verdict.OK if auto else Verdict.FAIL,
            f"enable.auto.commit={conf.get('enable.auto.commit')}",
            "" if auto else "set enable.auto.commit=false: offsets must be committed after the work is done",
        ),
        Check(
            "consumer isolation.level",
            Verdict.OK if committed else Verdict.WARN,
            f"isolation.level={conf.get('isolation.level')}",
            "" if committed else "set isolation.level=read_committed so aborted relay batches are not consumed",
        ),
    ]


def _admin_module() -> Any:
    from zeroloss.brokers.kafka_client import admin_module

    return admin_module()


def _admin(bootstrap: str, timeout_s: float) -> Any:
    return _admin_module().AdminClient(
        {
            "bootstrap.servers": bootstrap,
            "socket.timeout.ms": int(timeout_s * 1000),
            "logger": logging.getLogger("zeroloss.librdkafka"),
        }
    )


def _describe(admin: Any, kind: str, name: str, timeout_s: float) -> tuple[dict[str, str], str | None]:
    """(key → value of what the broker reports, error) for a topic or broker resource."""
    resource = _admin_module().ConfigResource
    res = resource(getattr(resource.Type, kind), name)
    try:
        entries = admin.describe_configs([res], request_timeout=timeout_s)[res].result(timeout_s)
    except Exception as exc:  # translated into a warn line: the check could not read it
        return {}, f"{type(exc).__name__}: {exc}"
    return {k: str(e.value) for k, e in entries.items() if e.value is not None}, None


def _setting(key: str, topic_conf: dict[str, str], broker_conf: dict[str, str]) -> tuple[str | None, str]:
    """(value, where it came from) for a topic setting: the topic's, else the broker's default."""
    if key in topic_conf:
        return topic_conf[key], "topic"
    if key in broker_conf:
        return broker_conf[key], "broker default"
    return None, "not reported"


def kafka_checks(
    url: str, *, topic: str | None = None, min_replication: int = 3, timeout_s: float = 10.0
) -> list[Check]:
    """The Kafka checks. On the embedded broker a replication of 1 is what it is built for (one
    node, for trying out and tests): those checks warn, saying so and what production needs,
    instead of failing the run; a setting that is weak anywhere (unclean election) still fails."""
    checks = _kafka_checks(url, topic=topic, min_replication=min_replication, timeout_s=timeout_s)
    if not any(c.name == "broker kind" and c.verdict is Verdict.WARN for c in checks):
        return checks
    return [_on_one_node(c) if c.name.endswith(_ONE_NODE) else c for c in checks]


def _on_one_node(c: Check) -> Check:
    if c.verdict not in (Verdict.FAIL, Verdict.WARN):
        return c
    return Check(
        c.name, Verdict.WARN, f"{c.detail}; expected on the embedded broker (one node, replication 1)", PRODUCTION_KAFKA
    )


def _kafka_checks(url: str, *, topic: str | None, min_replication: int, timeout_s: float) -> list[Check]:
    from zeroloss.brokers.kafka_client import parse_bootstrap

    bootstrap = parse_bootstrap(url)
    checks = producer_checks(bootstrap) + consumer_checks()
    admin = _admin(bootstrap, timeout_s)
    try:
        md = admin.list_topics(timeout=timeout_s)
    except Exception as exc:  # the client's own error type; reported, not raised
        return [
            *checks,
            Check("broker reachable", Verdict.FAIL, f"{bootstrap}: {exc}", "start the broker or fix --target"),
        ]
    checks.append(Check("broker reachable", Verdict.OK, f"{bootstrap}: {len(md.brokers)} broker(s)"))
    if md.cluster_id == EMBEDDED_CLUSTER_ID:
        checks.append(
            Check(
                "broker kind",
                Verdict.WARN,
                "the embedded Kafka-compatible broker (Tansu, as `zeroloss "
                "broker` runs it): one node, so replication 1 is expected here, and its memory storage "
                "loses everything at a restart; it is for trying out and tests",
                PRODUCTION_KAFKA,
            )
        )
    broker_id = str(min(md.brokers)) if md.brokers else None
    broker_conf: dict[str, str] = {}
    if broker_id is not None:
        broker_conf, err = _describe(admin, "BROKER", broker_id, timeout_s)
        if err:
            checks.append(
                Check(
                    "broker config",
                    Verdict.WARN,
                    f"cannot read broker {broker_id}'s config: {err}",
                    "grant DescribeConfigs on the cluster to check the defaults",
                )
            )
    rf_default = broker_conf.get("default.replication.factor")
    checks.append(
        _min_count_check(
            "broker default.replication.factor",
            rf_default,
            min_replication,
            "topics the broker auto-creates",
            f"set default.replication.factor={min_replication} (or disable auto.create.topics.enable)",
        )
    )
    if topic is None:
        checks.append(Check("topic", Verdict.SKIP, "no --topic given", "pass --topic T to check a topic"))
        return checks
    if topic not in md.topics or md.topics[topic].error is not None:
        return [
            *checks,
            Check(
                f"topic {topic}",
                Verdict.FAIL,
                "does not exist",
                f"create it with replication factor {min_replication} and min.insync.replicas=2; "
                "do not rely on auto-creation",
            ),
        ]
    partitions = md.topics[topic].partitions
    # Distinct brokers: a one-node broker may list itself three times for "replication factor 3".
    rf = min((len(set(p.replicas)) for p in partitions.values()), default=0)
    topic_conf, err = _describe(admin, "TOPIC", topic, timeout_s)
    if err:
        checks.append(
            Check(f"topic {topic} config", Verdict.WARN, f"cannot read it: {err}", "grant DescribeConfigs on the topic")
        )
    checks.append(
        Check(
            f"topic {topic} replication.factor",
            Verdict.OK if rf >= min_replication else Verdict.FAIL,
            f"{rf} (need >= {min_replication})",
            ""
            if rf >= min_replication
            else f"reassign partitions to {min_replication} replicas (kafka-reassign-partitions) or recreate the topic",
        )
    )
    mis, src = _setting("min.insync.replicas", topic_conf, broker_conf)
    checks.append(
        _min_count_check(
            f"topic {topic} min.insync.replicas",
            mis,
            2,
            "acks=all",
            "set min.insync.replicas=2 on the topic (kafka-configs --alter)",
            source=src,
        )
    )
    checks += _replica_checks(topic, partitions, set(md.brokers), int(mis) if mis and mis.isdigit() else None)
    if mis is not None and mis.isdigit():
        n = int(mis)
        if n > rf:
            v, why = Verdict.FAIL, f"{n} > replication factor {rf}: every acks=all write is refused"
        elif n == rf:
            v, why = Verdict.WARN, f"{n} = replication factor {rf}: one broker down stops all writes"
        else:
            v, why = Verdict.OK, f"{n} < replication factor {rf}"
        checks.append(
            Check(
                f"topic {topic} min.insync.replicas < replication.factor",
                v,
                why,
                "" if v is Verdict.OK else "keep min.insync.replicas = replication.factor - 1",
            )
        )
    unclean, src = _setting("unclean.leader.election.enable", topic_conf, broker_conf)
    name = f"topic {topic} unclean.leader.election.enable"
    if unclean is None:
        checks.append(
            Check(
                name,
                Verdict.WARN,
                f"not reported; Kafka's default is {KAFKA_DEFAULTS['unclean.leader.election.enable']}",
                "set unclean.leader.election.enable=false explicitly to be sure",
            )
        )
    elif unclean.lower() == "false":
        checks.append(Check(name, Verdict.OK, f"false ({src})"))
    else:
        checks.append(
            Check(
                name,
                Verdict.FAIL,
                f"{unclean} ({src}): an out-of-sync replica can become leader and drop acknowledged records",
                "set unclean.leader.election.enable=false",
            )
        )
    return checks


def _replica_checks(topic: str, partitions: dict[int, Any], live: set[int], min_isr: int | None) -> list[Check]:
    """The replicas as they are, not as configured: a replication factor of 3 on a cluster
    with one live broker (or with two replicas out of sync) holds one copy."""
    name = f"topic {topic} replicas"
    offline = sorted(p for p, m in partitions.items() if m.leader < 0 or m.leader not in live)
    if offline:
        return [
            Check(
                name,
                Verdict.FAIL,
                f"partition(s) {offline} have no live leader: nothing can be written to or read from them",
                "bring their brokers back; do not enable unclean leader election",
            )
        ]
    in_sync = {p: len(set(m.isrs) & live) for p, m in partitions.items()}
    fewest = min(in_sync.values(), default=0)
    rf = min((len(set(m.replicas)) for m in partitions.values()), default=0)
    dead = sorted({r for m in partitions.values() for r in m.replicas} - live)
    if min_isr is not None and fewest < min_isr <= rf:  # min_isr > rf is reported by its own check
        starved = sorted(p for p, n in in_sync.items() if n < min_isr)
        return [
            Check(
                name,
                Verdict.FAIL,
                f"partition(s) {starved} have {fewest} in-sync replica(s), below "
                f"min.insync.replicas={min_isr}: every acks=all write is refused (NOT_ENOUGH_REPLICAS) "
                "and the relay waits" + (f"; broker(s) {dead} not alive" if dead else ""),
                "bring the lagging or stopped brokers back",
            )
        ]
    short = sorted(p for p, m in partitions.items() if in_sync[p] < len(set(m.replicas)))
    if short:
        return [
            Check(
                name,
                Verdict.WARN,
                f"partition(s) {short} are under-replicated ({fewest} of {rf} in sync"
                + (f"; broker(s) {dead} not alive" if dead else "")
                + "): one more broker lost and writes "
                "stop or copies are lost",
                "bring the stopped or lagging brokers back",
            )
        ]
    return [
        Check(
            name,
            Verdict.OK,
            f"all {len(partitions)} partition(s) have live leaders and every replica "
            f"in sync ({fewest} each; alive brokers {sorted(live)})",
        )
    ]


def _min_count_check(
    name: str, value: str | None, minimum: int, what: str, fix: str, *, source: str = "broker"
) -> Check:
    key = name.rsplit(" ", 1)[-1]
    if value is None or not value.isdigit():
        default = KAFKA_DEFAULTS.get(key, "?")
        return Check(
            name,
            Verdict.WARN,
            f"not reported; Kafka's default is {default}"
            + (f" (need >= {minimum} for {what})" if default.isdigit() and int(default) < minimum else ""),
            fix,
        )
    if int(value) >= minimum:
        return Check(name, Verdict.OK, f"{value} ({source})")
    return Check(name, Verdict.FAIL, f"{value} ({source}); need >= {minimum} for {what}", fix)
