"""Broker faults on a real three-node Apache Kafka cluster (tests/kafka_cluster.py: KRaft, each
node both broker and controller, RF 3, ``min.insync.replicas=2``): the partition leader killed,
the ISR below ``min.insync.replicas``, the whole cluster killed, an unclean leader election that
truncates acknowledged records, and a broker hung (SIGSTOP) past its session timeout. The relay
and the consumer run throughout; each scenario returns a :class:`Ledger` counted from the
consumer's effects and the topic, and leaves all three nodes running and unpaused (:func:`heal`).

The cluster is whatever :class:`KafkaCluster` finds from the environment (``ZEROLOSS_KAFKA_PORT``,
``ZEROLOSS_KAFKA_CONTROLLER_PORT``, ``ZEROLOSS_KAFKA_DIR``); ``python -m tests.chaos`` starts it
when it is not up and stops it afterwards if it started it.

Every node is also a controller, so with two nodes down there is no controller quorum: the ISR
cannot shrink and no leader can be elected until one comes back. An unclean election therefore
needs the stale replicas *alive* (they are the quorum) yet out of the ISR: the scenario keeps
them from catching up with a replication throttle (``*.replication.throttled.rate=1`` byte/s),
which Kafka applies only to replicas that are out of the ISR.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tests.chaos.pipeline import Ledger, Pipeline, Size, wait_until, zeroloss_cli
from tests.kafka_cluster import KafkaCluster
from zeroloss.embedded_broker import free_port
from zeroloss.outbox.base import State
from zeroloss.readback import read_topic

PARTITIONS = 4
UNCLEAN_LOG = "using an unclean election"  # what the KRaft controller logs (INFO) when it elects one


def _rng() -> random.Random:
    return random.Random(int(os.environ.get("ZEROLOSS_SEED", time.time())))


def _quiet(cond: Callable[[], bool]) -> Callable[[], bool]:
    """``cond`` for :func:`wait_until`, with an exception (metadata not answering yet) meaning "not yet"."""

    def check() -> bool:
        try:
            return cond()
        except Exception:
            return False

    return check


# -- the cluster ---------------------------------------------------------------------------------


def heal(cluster: KafkaCluster) -> None:
    """Every node running and unpaused and all three serving; a dead node restarts on its data."""
    for node_id in cluster.nodes:
        if cluster.paused(node_id):
            cluster.resume(node_id)
    cluster.start()


def _partitions(cluster: KafkaCluster, topic: str) -> dict[int, tuple[int, list[int]]]:
    """partition → (leader, ISR) from the metadata of the nodes that run."""
    md = cluster.metadata(topic).topics[topic]
    if md.error is not None:
        raise RuntimeError(f"topic {topic}: {md.error}")
    return {i: (int(p.leader), sorted(p.isrs)) for i, p in md.partitions.items()}


def _led_without(cluster: KafkaCluster, topic: str, node_id: int) -> bool:
    """Every partition of ``topic`` has a live leader other than ``node_id``."""
    parts = _partitions(cluster, topic)
    return bool(parts) and all(leader >= 0 and leader != node_id for leader, _ in parts.values())


def _out_of_isr(cluster: KafkaCluster, topic: str, node_id: int) -> bool:
    parts = _partitions(cluster, topic)
    return bool(parts) and all(node_id not in isr for _, isr in parts.values())


def _admin(cluster: KafkaCluster) -> Any:
    """A fresh AdminClient: a long-lived one keeps dead connections to nodes that were restarted."""
    from confluent_kafka.admin import AdminClient

    return AdminClient(cluster.client_config())


def _alter(cluster: KafkaCluster, resources: list[Any], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = _admin(cluster)  # held until the results are in: a dropped client fails its futures
            for fut in admin.incremental_alter_configs(resources).values():
                fut.result(timeout=15)
            return
        except Exception as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"could not {what} within {timeout_s:.0f}s: {exc}") from exc
            time.sleep(0.5)


def _throttle(cluster: KafkaCluster, topic: str, nodes: Iterable[int], on: bool) -> None:
    """Replication of ``topic``'s out-of-sync replicas to 1 byte/s on ``nodes`` (leader and follower
    side), or back to unlimited. In-sync replicas are never throttled."""
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType

    op = AlterConfigOpType.SET if on else AlterConfigOpType.DELETE

    def entries(keys: Iterable[str], value: str) -> list[Any]:
        return [ConfigEntry(k, value, incremental_operation=op) for k in keys]

    what = f"{'set' if on else 'remove'} the replication throttle"
    _alter(
        cluster,
        [
            ConfigResource(
                ResourceType.TOPIC,
                topic,
                incremental_configs=entries(
                    ("leader.replication.throttled.replicas", "follower.replication.throttled.replicas"), "*"
                ),
            )
        ],
        what,
    )
    for n in nodes:  # one broker per request: the client sends it to that broker
        _alter(
            cluster,
            [
                ConfigResource(
                    ResourceType.BROKER,
                    str(n),
                    incremental_configs=entries(
                        ("leader.replication.throttled.rate", "follower.replication.throttled.rate"), "1"
                    ),
                )
            ],
            f"{what} on {n}",
        )


def _unclean_lines(cluster: KafkaCluster) -> int:
    """How many unclean elections the controllers have logged so far (all nodes' logs)."""
    total = 0
    for node in cluster.nodes.values():
        if node.log.exists():
            with node.log.open(errors="replace") as f:
                total += sum(1 for line in f if UNCLEAN_LOG in line)
    return total


# -- the pipeline --------------------------------------------------------------------------------


def _declare(p: Pipeline, cluster: KafkaCluster) -> None:
    """The pipeline's topic, RF 3, as an operator creates it: ``zeroloss init --target --topic``."""
    code, _, err = zeroloss_cli(
        "init",
        "--target",
        cluster.url,
        "--topic",
        p.topic,
        "--partitions",
        str(PARTITIONS),
        "--replication-factor",
        "3",
    )
    if code != 0:
        raise AssertionError(f"zeroloss init exited {code}: {err.strip()[-2000:]}")
    cluster.wait_in_sync(p.topic)


def _spent(p: Pipeline) -> tuple[int, int, int]:
    """(highest attempts, messages with attempts > 0, messages in ``failed``) of the outbox."""
    t = p.outbox.table
    q = sa.select(
        sa.func.coalesce(sa.func.max(t.c.attempts), 0),
        sa.func.count().filter(t.c.attempts > 0),
        sa.func.count().filter(t.c.state == State.FAILED.value),
    )
    with p.outbox.engine.connect() as conn:
        top, spent, failed = conn.execute(q).one()
    return int(top), int(spent), int(failed)


def _success_ids(p: Pipeline) -> set[str]:
    t = p.outbox.table
    with p.outbox.engine.connect() as conn:
        return set(conn.scalars(sa.select(t.c.id).where(t.c.state == State.SUCCESS.value)))


def _settled(p: Pipeline) -> bool:
    """Every committed message is in ``success`` and nothing is pending or being sent."""
    counts = p.outbox.stats().counts
    return counts[State.SUCCESS] >= len(p.committed) and counts[State.PENDING] == counts[State.SENDING] == 0


_OUTAGE = re.compile(r"broker unavailable \((.*)\); \d+ messages back to pending")
_ERROR_NAME = re.compile(r"\b_?[A-Z][A-Z_]{3,}\b")


def _outages(p: Pipeline) -> Counter[str]:
    """The relay's "broker unavailable" lines (batches put back without spending an attempt), by
    the Kafka error they name ("no progress" for a producer that got no answer in time)."""
    kinds: Counter[str] = Counter()
    if not p.relay_log.exists():
        return kinds
    for line in p.relay_log.read_text(errors="replace").splitlines():
        m = _OUTAGE.search(line)
        if m:
            names = [n for n in _ERROR_NAME.findall(m.group(1)) if n != "FATAL"]
            kinds[names[0] if names else "no progress" if "no progress" in m.group(1) else m.group(1)[:60]] += 1
    return kinds


def _relay_summary(p: Pipeline) -> str:
    kinds = _outages(p)
    top, spent, failed = _spent(p)
    what = ", ".join(f"{k} x{n}" for k, n in kinds.most_common())
    return (
        f"relay put {sum(kinds.values())} batches back unspent ({what or 'none'}); attempts spent on "
        f"{spent} message(s) (max {top}), {failed} failed"
    )


def _audit(p: Pipeline, *extra: str) -> tuple[int, dict[str, Any]]:
    """``zeroloss audit --target --json`` as an operator runs it: (exit code, the JSON report)."""
    code, out, err = zeroloss_cli("audit", *p.source_args, "--target", p.broker_url, "--json", *extra)
    if code not in (0, 1):
        raise AssertionError(f"zeroloss audit exited {code}: {err.strip()[-2000:]}")
    return code, json.loads(out)


def _readyz(port: int) -> tuple[int, str]:
    """(HTTP status, body) of the relay's /readyz; status 0 if it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=3) as r:
            return int(r.status), r.read().decode(errors="replace").strip()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace").strip()
    except OSError as exc:
        return 0, str(exc)


def _pad(size: Size) -> bytes:
    """Padding for the values of the throttled scenarios: records big enough that the traffic a
    throttled replica misses is several MiB per partition, more than the one fetch (up to
    ``replica.fetch.max.bytes``, 1 MiB per partition) its quota lets through every ~11 s once no
    in-sync follower keeps the leader's throttle busy."""
    return b":" + b"x" * max(1000, 16 * 2**20 // size.messages)


def _deliver(p: Pipeline, n: int, pad: bytes, what: str) -> None:
    """The app commits ``n`` more messages; wait until the relay has delivered everything."""
    p.produce(n, pad=pad)
    wait_until(lambda: p.delivered() >= len(p.committed), 300, what)


def _with_problems(ledger: Ledger, problems: list[str]) -> Ledger:
    ledger.notes += "".join(f"; PROBLEM: {x}" for x in problems)
    ledger.violations += len(problems)
    return ledger


# -- the scenarios -------------------------------------------------------------------------------


def leader_killed(cluster: KafkaCluster, work: Path, size: Size) -> Ledger:
    """SIGKILL the leader of partition 0 mid-stream (``size.kills`` times), let the relay carry on
    without it, restart it and wait until it is back in the ISR."""
    p = Pipeline(cluster.url, work)
    rng = _rng()
    killed: list[int] = []
    resumed_s: list[float] = []
    try:
        _declare(p, cluster)
        p.start_consumer()
        producer = p.produce_in_background(size.messages)
        p.start_relay()
        points = sorted(rng.sample(range(size.messages // 10, size.messages * 8 // 10), size.kills))
        for point in points:
            wait_until(lambda: p.delivered() >= point, 300, "relay progress")  # noqa: B023
            leader = cluster.leader_of(p.topic, 0)
            assert leader is not None, "partition 0 has no leader before the kill"
            cluster.kill(leader)
            killed.append(leader)
            t = time.monotonic()
            wait_until(_quiet(lambda: _led_without(cluster, p.topic, leader)), 60, "new leaders")  # noqa: B023
            target = min(size.messages, p.delivered() + size.messages // 20)
            wait_until(lambda: p.delivered() >= target, 120, "relay progress without the dead leader")  # noqa: B023
            resumed_s.append(time.monotonic() - t)
            cluster.restart(leader, topic=p.topic)
        producer.join()
        t = time.monotonic()
        p.wait_drained()
        drain = time.monotonic() - t
        notes = (
            f"SIGKILLed the leader of partition 0 {len(killed)}x (nodes {killed}), restarted each once "
            f"the relay had delivered {size.messages // 20} more without it (took "
            f"{', '.join(f'{s:.1f}' for s in resumed_s)} s); {_relay_summary(p)}"
        )
        return p.ledger(
            f"cluster: partition leader SIGKILLed x{len(killed)} mid-stream, restarted", len(killed), drain, notes
        )
    finally:
        p.close()
        heal(cluster)


def _outage(p: Pipeline, port: int, hold_s: float) -> tuple[list[tuple[int, str]], int, float]:
    """Hold a fault for ``hold_s`` (its length, not a synchronisation) and at least until /readyz
    has said 503 (at most 90 s), sampling /readyz: (samples, delivered meanwhile, seconds)."""
    t0 = time.monotonic()
    delivered = p.delivered()
    samples: list[tuple[int, str]] = []
    while time.monotonic() - t0 < 90 and (time.monotonic() - t0 < hold_s or all(c != 503 for c, _ in samples)):
        samples.append(_readyz(port))
        time.sleep(0.5)
    return samples, p.delivered() - delivered, time.monotonic() - t0


def _said(samples: list[tuple[int, str]], bootstrap: str) -> str:
    """What /readyz said: how often 503, and its distinct reasons (failure counts and the
    bootstrap list left out), the most frequent first."""
    reasons = Counter(
        re.sub(r"\(\d+ consecutive failures\)", "(N consecutive failures)", text).replace(bootstrap, "B")
        for code, text in samples
        if code == 503
    )
    said = " / ".join(f'"{text}" x{n}' for text, n in reasons.most_common())
    return f"/readyz 503 in {sum(reasons.values())} of {len(samples)} samples (B = the bootstrap list): {said or '-'}"


def isr_below_min(cluster: KafkaCluster, work: Path, size: Size) -> Ledger:
    """The topic's ISR below ``min.insync.replicas=2``, in two steps. (1) With the controller quorum
    alive: node B SIGKILLed, traffic it misses, B restarted under a replication throttle (so it
    stays out of the ISR), node C SIGKILLed: the ISR is the survivor alone and every acks=all
    write is refused with NOT_ENOUGH_REPLICAS while the app goes on committing. (2) B SIGKILLed
    too: two of three nodes down and (every node being a controller) no quorum: nothing can be
    acknowledged. Throughout, the relay must put its batches back without spending attempts and
    /readyz must say 503 and why; then C and B return and everything is delivered."""
    p = Pipeline(cluster.url, work)
    port = free_port()
    problems: list[str] = []
    throttled = False
    pad = _pad(size)
    chunks = [size.messages * 3 // 10, size.messages * 3 // 10]
    chunks.append(size.messages - sum(chunks))  # before, while B is down, during the outage
    try:
        _declare(p, cluster)
        p.start_consumer()
        p.start_relay(extra=["--metrics-port", str(port), "--metrics-host", "127.0.0.1"])
        _deliver(p, chunks[0], pad, "traffic before the fault")
        wait_until(lambda: _readyz(port)[0] == 200, 60, "/readyz 200 before the outage")
        survivor = cluster.leader_of(p.topic, 0)
        assert survivor is not None, "partition 0 has no leader before the fault"
        b, c = (i for i in cluster.nodes if i != survivor)
        before = _spent(p)
        _throttle(cluster, p.topic, cluster.nodes, on=True)
        throttled = True
        cluster.kill(b)
        wait_until(_quiet(lambda: _out_of_isr(cluster, p.topic, b)), 60, f"node {b} out of the ISR")
        _deliver(p, chunks[1], pad, f"traffic node {b} misses")
        cluster.restart(b)  # broker and controller again, but throttled: out of the topic's ISR
        cluster.kill(c)
        wait_until(
            _quiet(lambda: all(isr == [survivor] for _, isr in _partitions(cluster, p.topic).values())),
            60,
            f"the ISR down to node {survivor}",
        )
        producer = p.produce_in_background(chunks[2], pad=pad)  # the app goes on committing
        samples1, delivered1, held1 = _outage(p, port, size.outage_s)
        isr_after = {i: isr for i, (_, isr) in _partitions(cluster, p.topic).items()}
        if any(isr != [survivor] for isr in isr_after.values()):
            problems.append(f"the ISR grew back during the outage ({isr_after}): node {b} caught up")
        doctor_code, doctor_out, doctor_err = zeroloss_cli(
            "doctor", "--target", cluster.url, "--topic", p.topic, "--json"
        )
        doctor = json.loads(doctor_out) if doctor_out.startswith("{") else {"checks": []}
        replicas = next(
            (
                f"'{ch['verdict']}: {ch['detail']}'"
                for ch in doctor["checks"]
                if ch["name"] == f"topic {p.topic} replicas"
            ),
            "no check of the live replicas",
        )
        doctor_said = f"exit {doctor_code}, verdict {doctor.get('verdict')}, {replicas} {doctor_err.strip()[-300:]}"
        status_code, status_out, _ = zeroloss_cli("status", *p.source_args, "--json")
        status = json.loads(status_out) if status_out.startswith("{") else {}
        spent1 = _spent(p)
        cluster.kill(b)
        samples2, delivered2, held2 = _outage(p, port, size.outage_s / 2)
        spent2 = _spent(p)
        cluster.restart(c)  # with it the quorum is back
        cluster.restart(b)
        _throttle(cluster, p.topic, cluster.nodes, on=False)
        throttled = False
        cluster.wait_in_sync(p.topic, timeout=120)
        wait_until(lambda: _readyz(port)[0] == 200, 120, "/readyz 200 after the outage")
        producer.join()
        t = time.monotonic()
        p.wait_drained(timeout_s=300)
        drain = time.monotonic() - t
        after = _spent(p)
        for step, samples in (("the ISR below min", samples1), ("two nodes down", samples2)):
            if all(code != 503 for code, _ in samples):
                problems.append(f"/readyz never said 503 with {step} ({Counter(code for code, _ in samples)})")
        if spent1 != before or spent2 != before or after[2]:
            problems.append(
                f"attempts spent: (max, messages with attempts, failed) {before} before, {spent1} with "
                f"the ISR below min, {spent2} with two nodes down, {after} at the end"
            )
        said1, said2 = _said(samples1, cluster.bootstrap), _said(samples2, cluster.bootstrap)
        notes = (
            f"(1) node {b} SIGKILLed, {chunks[1]} messages it missed, restarted throttled; node {c} SIGKILLed: "
            f"ISR [{survivor}] < 2 for {held1:.0f}s while the app committed {chunks[2]} more, relay delivered "
            f"{delivered1}; {said1}; zeroloss doctor --topic meanwhile: {doctor_said.strip()}; "
            f"zeroloss status: exit {status_code}, verdict {status.get('verdict')}, reasons "
            f'{status.get("reasons")}, oldest pending\'s last error "{status.get("oldest_pending_error")}". '
            f"(2) node {b} SIGKILLed again: only node {survivor} up, no controller "
            f"quorum, for {held2:.0f}s, relay delivered {delivered2}; {said2}. (max attempts, "
            f"messages with attempts, failed): {before} before, {spent1} and {spent2} during, {after} after; "
            f"{_relay_summary(p)}"
        )
        ledger = p.ledger(
            "cluster: ISR below min.insync.replicas, then 2 of 3 brokers down, back later", 3, drain, notes
        )
        return _with_problems(ledger, problems)
    finally:
        p.close()
        heal(cluster)
        if throttled:  # dynamic configs persist: the throttle must not outlive the scenario
            _throttle(cluster, p.topic, cluster.nodes, on=False)


def all_killed(cluster: KafkaCluster, work: Path, size: Size) -> Ledger:
    """SIGKILL all three nodes mid-stream and restart them on their data: ``zeroloss audit`` must
    find every message the relay had marked ``success`` on the broker."""
    p = Pipeline(cluster.url, work)
    problems: list[str] = []
    try:
        _declare(p, cluster)
        p.start_consumer()
        producer = p.produce_in_background(size.messages)
        p.start_relay()
        wait_until(lambda: p.delivered() >= size.messages // 3, 300, "traffic before the crash")
        for node_id in cluster.nodes:
            cluster.kill(node_id)
        acked = _success_ids(p)  # nothing can be acknowledged any more: this is what the relay had
        t0 = time.monotonic()
        cluster.start()
        restart_s = time.monotonic() - t0
        producer.join()
        wait_until(lambda: _settled(p), 300, "the relay to deliver everything after the restart")
        code, found = _audit(p)
        missing = set(found["missing"])
        if code != 0 or missing:
            problems.append(
                f"audit exit {code}, {len(missing)} missing, {len(missing & acked)} of them success before the crash"
            )
        if found["checked"] != len(p.committed):
            problems.append(f"audit checked {found['checked']} of {len(p.committed)} success messages")
        t = time.monotonic()
        p.wait_drained(timeout_s=300)
        drain = time.monotonic() - t
        notes = (
            f"all 3 nodes SIGKILLed with {len(acked)} messages in success, restarted on their data in "
            f"{restart_s:.0f}s; zeroloss audit after the relay finished: exit {code}, {found['checked']} "
            f"success messages checked on the broker, {len(missing)} missing; {_relay_summary(p)}"
        )
        ledger = p.ledger("cluster: all 3 brokers SIGKILLed mid-stream and restarted", len(cluster.nodes), drain, notes)
        return _with_problems(ledger, problems)
    finally:
        p.close()
        heal(cluster)


def partition(cluster: KafkaCluster, work: Path, size: Size) -> Ledger:
    """SIGSTOP the leader of partition 0 (a broker cut off: sockets open, no answers) past its
    session timeout: the controller fences it, leadership moves, the relay and the consumer
    carry on; then SIGCONT it (the partition heals) and it rejoins the ISR."""
    p = Pipeline(cluster.url, work)
    try:
        _declare(p, cluster)
        p.start_consumer()
        producer = p.produce_in_background(size.messages)
        p.start_relay()
        wait_until(lambda: p.delivered() >= size.messages // 3, 300, "traffic before the partition")
        node = cluster.leader_of(p.topic, 0)
        assert node is not None, "partition 0 has no leader before the fault"
        cluster.pause(node)
        t0 = time.monotonic()
        fenced_s = wait_until(
            _quiet(lambda: node not in cluster.broker_ids() and _led_without(cluster, p.topic, node)),
            60,
            "the controller to fence the hung broker and move its leaders",
        )
        target = min(size.messages, p.delivered() + size.messages // 20)
        moved_on_s = wait_until(lambda: p.delivered() >= target, 120, "relay progress without the hung broker")
        # The partition lasts at least outage_s: the fault's length, not a synchronisation.
        time.sleep(max(0.0, size.outage_s - (time.monotonic() - t0)))
        hung_s = time.monotonic() - t0
        cluster.resume(node)
        cluster.wait_in_sync(p.topic, timeout=120, node_id=node)
        producer.join()
        t = time.monotonic()
        p.wait_drained()
        drain = time.monotonic() - t
        notes = (
            f"node {node} (leader of partition 0) SIGSTOPped for {hung_s:.0f}s: fenced and its partitions "
            f"led elsewhere after {fenced_s:.1f}s, the relay delivered {size.messages // 20} more "
            f"{moved_on_s:.1f}s later; SIGCONT, back in the ISR; {_relay_summary(p)}"
        )
        return p.ledger(
            "cluster: network partition of the leader (SIGSTOP past session timeout, SIGCONT)", 1, drain, notes
        )
    finally:
        p.close()
        heal(cluster)


def _create_weak_topic(cluster: KafkaCluster, topic: str, a: int, b: int, c: int) -> None:
    """Two partitions led by ``a``: replicas [a, b, c] and [a, c, b] (an unclean election picks the
    first live replica, so ``b`` takes the first and ``c`` the second); unclean leader election on
    and ``min.insync.replicas=1`` on the topic, as a careless operator would have it."""
    from confluent_kafka.admin import NewTopic

    new = NewTopic(
        topic,
        num_partitions=2,
        replica_assignment=[[a, b, c], [a, c, b]],
        config={"unclean.leader.election.enable": "true", "min.insync.replicas": "1"},
    )
    admin = _admin(cluster)
    admin.create_topics([new], operation_timeout=30)[topic].result(timeout=40)


def unclean_election(cluster: KafkaCluster, work: Path, size: Size) -> Ledger:
    """A topic with ``unclean.leader.election.enable=true`` and ``min.insync.replicas=1``, led by A
    with followers B and C; ``zeroloss doctor`` must flag it first. B is SIGKILLed, misses traffic,
    comes back throttled (stale, out of the ISR); C likewise, and what the relay marks ``success``
    while C is down exists on A alone. A is SIGKILLed: a stale replica is elected (unclean, by
    the controller itself or, failing that within 30 s, on AdminClient.elect_leaders(UNCLEAN)); A
    comes back and truncates its log to the new leader's. ``zeroloss audit`` must report exactly
    the acknowledged messages the topic no longer has, ``audit --repair`` resends them, and the
    consumer's effects end up covering every committed message."""
    a, b, c = 1, 2, 3
    p = Pipeline(cluster.url, work)
    problems: list[str] = []
    throttled = False
    pad = _pad(size)
    chunks = [size.messages * k // 10 for k in (2, 3, 3)]  # before, while B is down, while C is down
    chunks.append(size.messages - sum(chunks))  # after the election
    try:
        _create_weak_topic(cluster, p.topic, a, b, c)
        cluster.wait_in_sync(p.topic)
        doctor_code, out, err = zeroloss_cli("doctor", "--target", cluster.url, "--topic", p.topic, "--json")
        checks = {ch["name"]: ch for ch in json.loads(out)["checks"]} if out.strip().startswith("{") else {}
        flagged = checks.get(f"topic {p.topic} unclean.leader.election.enable", {})
        if doctor_code != 1 or flagged.get("verdict") != "fail":
            problems.append(
                f"doctor exit {doctor_code} before the fault, unclean.leader.election.enable check "
                f"{flagged or err.strip()[-500:]}"
            )
        p.start_consumer()
        p.start_relay()
        _deliver(p, chunks[0], pad, "traffic before the fault")
        _throttle(cluster, p.topic, cluster.nodes, on=True)
        throttled = True
        cluster.kill(b)
        wait_until(_quiet(lambda: _out_of_isr(cluster, p.topic, b)), 60, f"node {b} out of the ISR")
        acked_b = _success_ids(p)  # B has these: it was in the ISR when they were acknowledged
        _deliver(p, chunks[1], pad, f"traffic node {b} misses")
        cluster.restart(b)  # a broker and a controller again, but throttled: stays out of the ISR
        cluster.kill(c)
        wait_until(_quiet(lambda: _out_of_isr(cluster, p.topic, c)), 60, f"node {c} out of the ISR")
        _deliver(p, chunks[2], pad, f"traffic only node {a} has")
        cluster.restart(c)  # throttled too
        for internal in ("__consumer_offsets", "__transaction_state"):
            cluster.wait_in_sync(internal, timeout=120)  # so that the group and the transactions survive A
        isrs = {i: isr for i, (_, isr) in _partitions(cluster, p.topic).items()}
        if any(isr != [a] for isr in isrs.values()):
            problems.append(f"ISR {isrs} before the kill, not [{a}]: a stale replica caught up")
        acked_a = _success_ids(p)
        window = acked_a - acked_b  # acknowledged while B was out of the ISR
        cluster.kill(a)
        t = time.monotonic()
        how = "by the controller itself"
        try:
            wait_until(_quiet(lambda: _led_without(cluster, p.topic, a)), 30, "an unclean election")
        except AssertionError:
            from confluent_kafka import ElectionType, TopicPartition

            how = "on AdminClient.elect_leaders(UNCLEAN), none within 30 s by itself"
            admin = _admin(cluster)
            admin.elect_leaders(
                ElectionType.UNCLEAN, [TopicPartition(p.topic, i) for i in range(2)], operation_timeout=30
            ).result(timeout=40)
            wait_until(_quiet(lambda: _led_without(cluster, p.topic, a)), 30, "the unclean election asked for")
        elected_s = time.monotonic() - t
        leaders = {i: leader for i, (leader, _) in _partitions(cluster, p.topic).items()}
        _throttle(cluster, p.topic, (b, c), on=False)
        cluster.restart(a, topic=p.topic)  # A follows the new leader: it truncates its log to the leader's
        _throttle(cluster, p.topic, (a,), on=False)
        throttled = False
        _deliver(p, chunks[3], pad, "traffic after the election")
        wait_until(lambda: _settled(p), 300, "the relay to finish")

        # Ground truth: every committed message is in success now; which of them the topic still has.
        ids = [mid for mid, _ in p.committed]
        on_topic = read_topic(p.broker_url, p.topic, expect=ids, idle_s=3).ids
        truth = {mid for mid in ids if not on_topic[mid]}
        if not truth:
            problems.append("the broker lost nothing: no stale replica was elected, or it was not stale")
        if truth - window:
            problems.append(f"{len(truth - window)} lost that were acknowledged outside the window")
        t = time.monotonic()
        audit_code, found = _audit(p)
        lost = set(found["broker"]["missing"])
        if audit_code != 1 or lost != truth:
            problems.append(
                f"audit exit {audit_code} reported {len(lost)} missing, {len(lost & truth)} of the "
                f"{len(truth)} really lost"
            )
        _, fixed = _audit(p, "--repair")
        if fixed["repaired"] != len(lost) or set(fixed["broker"]["missing"]) != lost:
            problems.append(f"repair resent {fixed['repaired']} of {len(lost)}")
        wait_until(lambda: _settled(p), 300, "the relay to resend the repaired ones")
        p.wait_drained(timeout_s=300)
        final_code, final = _audit(p)
        if final_code != 0 or final["missing"]:
            problems.append(f"final audit exit {final_code}, {len(final['missing'])} missing")
        drain = time.monotonic() - t
        notes = (
            f"doctor before the fault: exit {doctor_code}, '{flagged.get('name')}' {flagged.get('verdict')} "
            f"({flagged.get('detail')}); nodes {b} then {c} SIGKILLed, each missing traffic, restarted throttled "
            f"(out of the ISR): {len(window)} messages acknowledged while {b} was out, the last {chunks[2]} by "
            f"node {a} alone; {a} SIGKILLed: unclean election {how} after {elected_s:.1f}s, leaders {leaders} "
            f"(ISR was [{a}]); {a} restarted and truncated its log. Ground truth: {len(truth)} acknowledged "
            f"messages no longer on the topic, all among the {len(window)}; audit (exit {audit_code}) found "
            f"{len(lost)}, {'the same ones' if lost == truth else 'NOT the same'}; --repair resent "
            f"{fixed['repaired']}; final audit exit {final_code}; key order not judged for the resent ones; "
            f"{_relay_summary(p)}"
        )
        ledger = p.ledger(
            "cluster: unclean leader election truncates acknowledged records, audit --repair",
            3,
            drain,
            notes,
            unordered=lost,
        )
        return _with_problems(ledger, problems)
    finally:
        p.close()
        heal(cluster)
        if throttled:  # dynamic configs persist: the throttle must not outlive the scenario
            _throttle(cluster, p.topic, cluster.nodes, on=False)


ClusterScenario = Callable[[KafkaCluster, Path, Size], Ledger]

CLUSTER_SCENARIOS: dict[str, ClusterScenario] = {
    "cluster-leader-killed": leader_killed,
    "cluster-isr-below-min": isr_below_min,
    "cluster-all-killed": all_killed,
    "cluster-unclean-election": unclean_election,
    "cluster-partition": partition,
}

FULL_SIZES: dict[str, Size] = {
    "cluster-leader-killed": Size(messages=50_000, kills=3, outage_s=20),
}
SHORT_SIZES: dict[str, Size] = {
    "cluster-leader-killed": Size(messages=1500, kills=1, outage_s=4),
}
