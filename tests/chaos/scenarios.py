"""Fault-injection scenarios. Each runs a real workload through real processes, injects a real
fault, heals, drains, and returns a :class:`Ledger` counted from the broker and the effects.

Sizes: ``Size.short`` runs inside ``make test``; ``Size.full`` is ``make chaos``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tests.chaos import bad_input, broker_faults, rocketmq_faults, spool_faults
from tests.chaos.pipeline import Ledger, Pipeline, Size, wait_until, zeroloss_cli
from zeroloss.embedded_broker import EmbeddedBroker, free_port, port_open
from zeroloss.readback import read_topic


def _rng() -> random.Random:
    return random.Random(int(os.environ.get("ZEROLOSS_SEED", time.time())))


def _progress_points(rng: random.Random, total: int, k: int) -> list[int]:
    return sorted(rng.sample(range(total // 10, total * 9 // 10), k))


def relay_sigkill(broker: EmbeddedBroker, work: Path, size: Size, source: str) -> Ledger:
    p = Pipeline(broker.url, work, source=source)
    rng = _rng()
    try:
        p.start_consumer()
        producer = p.produce_in_background(size.messages)
        relay = p.start_relay()
        for point in _progress_points(rng, size.messages, size.kills):
            wait_until(lambda: p.delivered() >= point or relay.poll() is not None, 300, "relay progress")  # noqa: B023
            p.kill(relay)
            relay = p.start_relay()
        producer.join()
        t = time.monotonic()
        p.wait_drained()
        return p.ledger(f"relay SIGKILL x{size.kills} ({source} outbox)", size.kills, time.monotonic() - t)
    finally:
        p.close()


def consumer_sigkill(broker: EmbeddedBroker, work: Path, size: Size) -> Ledger:
    p = Pipeline(broker.url, work)
    rng = _rng()
    try:
        p.produce(size.messages)
        p.start_relay()
        consumer = p.start_consumer()
        for point in _progress_points(rng, size.messages, size.kills):
            wait_until(lambda: p.effects_done() >= point or consumer.poll() is not None, 300, "consumer progress")  # noqa: B023
            p.kill(consumer)
            consumer = p.start_consumer()
        t = time.monotonic()
        p.wait_drained()
        return p.ledger(f"consumer SIGKILL x{size.kills} mid-batch", size.kills, time.monotonic() - t)
    finally:
        p.close()


def group_member_killed(broker: EmbeddedBroker, work: Path, size: Size) -> Ledger:
    p = Pipeline(broker.url, work)
    try:
        p.produce(size.messages)
        p.start_relay()
        a = p.start_consumer()
        p.start_consumer()
        wait_until(lambda: p.effects_done() >= size.messages // 3, 300, "both consumers working")
        p.kill(a)
        t = time.monotonic()
        p.wait_drained()
        return p.ledger("two consumers in a group, one SIGKILLed", 1, time.monotonic() - t)
    finally:
        p.close()


def relays_share_one_outbox(broker: EmbeddedBroker, work: Path, size: Size, relays: int) -> Ledger:
    p = Pipeline(broker.url, work)
    try:
        p.start_consumer()
        producer = p.produce_in_background(size.messages)
        procs = [p.start_relay(relay_id=f"r{i}") for i in range(relays)]
        wait_until(lambda: p.delivered() >= size.messages // 3, 300, "relays working")
        p.kill(procs[0])
        # Work goes on without it; then it comes back under its own id (as an orchestrator
        # restarts it), which fences the transaction it left open.
        wait_until(lambda: p.delivered() >= size.messages * 2 // 3, 300, "the survivors to carry on")
        p.start_relay(relay_id="r0")
        producer.join()
        t = time.monotonic()
        p.wait_drained()
        name = f"{relays} relays on one PostgreSQL outbox, one SIGKILLed and restarted"
        return p.ledger(name, 1, time.monotonic() - t)
    finally:
        p.close()


def zombie_consumer(broker: EmbeddedBroker, work: Path, size: Size) -> Ledger:
    """SIGSTOP one consumer past its session timeout while the other takes its partitions over,
    then SIGCONT it: its late work and commits must be rejected or harmless."""
    p = Pipeline(broker.url, work)
    try:
        p.produce(size.messages)
        zombie = p.start_consumer()
        p.start_relay()
        wait_until(lambda: p.effects_done() > 0, 120, "first effects")
        p.start_consumer()
        zombie.send_signal(signal.SIGSTOP)
        # The session timeout is 2 s; wait for real progress by the survivor, not for a clock.
        before = p.effects_done()
        wait_until(
            lambda: p.effects_done() >= min(size.messages, before + size.messages // 4),
            300,
            "the survivor to take over",
        )
        zombie.send_signal(signal.SIGCONT)
        t = time.monotonic()
        p.wait_drained()
        return p.ledger("zombie consumer (SIGSTOP past session timeout, SIGCONT)", 1, time.monotonic() - t)
    finally:
        p.close()


def rebalance_storm(broker: EmbeddedBroker, work: Path, size: Size) -> Ledger:
    """Add or remove a consumer every time the group has made some progress.

    Each change waits until every live member has taken its assignment from the previous one:
    Tansu (unlike Kafka) wedges a group for good when its leader leaves between JoinGroup and
    SyncGroup — the others rejoin forever into a generation led by the departed member — so a
    member leaving mid-join would test the broker, not zeroloss."""
    p = Pipeline(broker.url, work)
    rng = _rng()
    faults = 0
    try:
        producer = p.produce_in_background(size.messages)
        p.start_relay()
        live = [p.start_consumer()]
        step = max(50, size.messages // (4 * size.kills))
        settled = p.assignments()
        while p.effects_done() < size.messages * 3 // 4 and faults < 4 * size.kills:
            target = p.effects_done() + step
            wait_until(
                lambda: p.effects_done() >= target or p.effects_done() >= size.messages * 3 // 4,  # noqa: B023
                300,
                "progress between rebalances",
            )
            wait_until(
                lambda: all(p.assignments()[c.pid] > settled[c.pid] for c in live),  # noqa: B023
                120,
                "every member's assignment after the last change",
            )
            settled = p.assignments()
            if len(live) > 1 and rng.random() < 0.5:
                p.kill(live.pop(rng.randrange(len(live))), signal.SIGTERM)
            else:
                live.append(p.start_consumer())
            faults += 1
        producer.join()
        t = time.monotonic()
        p.wait_drained()
        return p.ledger("rebalance storm (consumers added/removed)", faults, time.monotonic() - t)
    finally:
        p.close()


def s3_env(port: int) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT": f"http://127.0.0.1:{port}", "AWS_ALLOW_HTTP": "true",
    }  # fmt: skip


def start_moto(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    import shutil
    import sys
    import urllib.request

    port = free_port()
    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    with open(work / "moto.log", "ab") as out:
        proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    wait_until(lambda: port_open(port), 60, "moto S3 server")
    req = urllib.request.Request(f"http://127.0.0.1:{port}/tansu", method="PUT")
    urllib.request.urlopen(req, timeout=10).close()
    return proc, port


def broker_outage_durable(work: Path, size: Size) -> Ledger:
    """Stop a broker that keeps its data (Tansu on S3) mid-stream for ``outage_s`` and restart it:
    the relay keeps retrying, recreates its producer, and nothing committed is lost."""
    moto, s3_port = start_moto(work)
    broker = EmbeddedBroker(storage="s3://tansu/", env=s3_env(s3_port), log_path=work / "tansu.log").start()
    try:
        p = Pipeline(broker.url, work)
        try:
            p.start_consumer()
            producer = p.produce_in_background(size.messages)
            p.start_relay()
            wait_until(lambda: p.delivered() >= size.messages // 3, 300, "traffic before the outage")
            broker.stop()
            # The outage lasts while the app keeps committing: wait on the clock here on purpose,
            # it is the fault's length, not a synchronisation.
            time.sleep(size.outage_s)
            broker.start()
            producer.join()
            t = time.monotonic()
            p.wait_drained(timeout_s=300)
            return p.ledger(f"broker down {size.outage_s:.0f}s (durable storage)", 1, time.monotonic() - t)
        finally:
            p.close()
    finally:
        broker.stop()
        moto.terminate()
        moto.wait(30)


def postgres_restart(broker: EmbeddedBroker, work: Path, size: Size) -> Ledger:
    """Restart PostgreSQL (outbox and inbox both live there) under the relay and the consumer."""
    p = Pipeline(broker.url, work)
    try:
        p.start_consumer()
        p.produce(size.messages // 2)
        p.start_relay()
        wait_until(lambda: p.effects_done() >= size.messages // 6, 300, "traffic before the restart")
        version = sorted(os.listdir("/etc/postgresql"))[-1]
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        wait_until(lambda: port_open(5432), 60, "PostgreSQL back")
        p.produce(size.messages - size.messages // 2)
        t = time.monotonic()
        p.wait_drained()
        return p.ledger("PostgreSQL restarted under relay and consumer", 1, time.monotonic() - t)
    finally:
        p.close()


def _outbox_settled(p: Pipeline) -> bool:
    """The relay has nothing left: every committed message is in ``success``."""
    from zeroloss.outbox.base import State

    counts = p.outbox.stats().counts
    return counts[State.SUCCESS] >= len(p.committed) and counts[State.PENDING] == counts[State.SENDING] == 0


def _audit(p: Pipeline, *extra: str) -> tuple[int, dict[str, Any]]:
    code, out, err = zeroloss_cli("audit", *p.source_args, "--target", p.broker_url, "--json", *extra)
    if code not in (0, 1):
        raise AssertionError(f"zeroloss audit exited {code}: {err.strip()[-2000:]}")
    return code, json.loads(out)


def broker_lost_memory(work: Path, size: Size) -> Ledger:
    """A broker that keeps nothing (Tansu on memory storage) restarted mid-stream: everything it
    had acknowledged is gone. ``zeroloss audit`` reads every success position back and must
    report the loss (exit 1); ``audit --repair`` sends those messages again from the outbox's
    success ledger; the consumer's inbox drops the copies it had already applied."""
    broker = EmbeddedBroker(log_path=work / "tansu.log").start()  # memory:// by default
    try:
        p = Pipeline(broker.url, work)
        try:
            consumer = p.start_consumer()
            p.start_relay()
            producer = p.produce_in_background(size.messages // 2)
            # The consumer lags (frozen for a while), so some of what the broker loses was never
            # consumed: only the repair can bring those back.
            wait_until(lambda: p.effects_done() >= size.messages // 6, 300, "first effects")
            consumer.send_signal(signal.SIGSTOP)
            wait_until(lambda: p.delivered() >= size.messages // 3, 300, "traffic before the restart")
            broker.stop()
            applied = set(p.effect_counts())
            broker.start()  # same port, empty: topics, offsets and consumer group are gone
            consumer.send_signal(signal.SIGCONT)
            producer.join()
            p.produce(size.messages - size.messages // 2)  # and the app goes on
            wait_until(lambda: _outbox_settled(p), 300, "the relay to deliver the rest to the new broker")
            t = time.monotonic()
            code, found = _audit(p)
            lost = found["broker"]["missing"]
            problems = []
            if code != 1 or not lost:
                problems.append(f"audit exit {code} with {len(lost)} missing")
            ids = [mid for mid, _ in p.committed]
            really = set(ids) - set(read_topic(p.broker_url, p.topic, expect=ids, idle_s=3).ids)
            if really != set(lost):
                problems.append(f"{len(really)} not on the broker, audit said {len(lost)}")
            code, fixed = _audit(p, "--repair")
            if fixed["repaired"] != len(lost) or set(fixed["broker"]["missing"]) != set(lost):
                problems.append(f"repair resent {fixed['repaired']} of {len(lost)}")
            p.wait_drained(timeout_s=300)
            wait_until(lambda: _outbox_settled(p), 300, "the relay to resend the repaired ones")
            code, final = _audit(p)
            if code != 0 or final["missing"]:
                problems.append(f"final audit exit {code}, {len(final['missing'])} missing")
            drain = time.monotonic() - t
            notes = (
                f"broker lost {len(really)} acknowledged messages on restart, {len(really - applied)} of "
                f"them not yet consumed; audit (exit 1) reported {len(lost)}, the same ones; --repair resent "
                f"{fixed['repaired']} from the success ledger, the inbox dropped the copies already applied; "
                f"final audit exit {code}; key order not judged for the resent ones (a resend goes after later "
                f"messages of its key, as documented)"
            )
            ledger = p.ledger(
                "broker restarted on memory storage (loses all), audit --repair",
                1,
                drain,
                notes + "".join(f"; PROBLEM: {x}" for x in problems),
                unordered=set(lost),
            )
            ledger.violations += len(problems)
            return ledger
        finally:
            p.close()
    finally:
        broker.stop()


def handler_failures(broker: EmbeddedBroker, work: Path, size: Size) -> Ledger:
    """Handlers that fail: some messages fail twice then succeed (retried in place), some are
    poison (dead-lettered at once); everything else keeps flowing past them."""
    from tests.consumer_child import is_poison, is_transient
    from zeroloss.dlq import list_dead_letters

    n = size.messages
    transient_mod, poison_mod = max(7, n // 50), max(11, n // 25)  # about 50 and 25 of them
    p = Pipeline(broker.url, work)
    try:
        p.produce(n)  # one call: the value of the i-th committed message is i
        values = {mid: i for i, (mid, _) in enumerate(p.committed)}
        poison = {mid for mid, v in values.items() if is_poison(v, poison_mod)}
        transient = {mid for mid, v in values.items() if is_transient(v, transient_mod) and mid not in poison}
        p.start_relay()
        p.start_consumer(options=[f"transient={transient_mod}", f"poison={poison_mod}"])
        t = time.monotonic()
        p.wait_drained(expect=n - len(poison))
        letters: dict[str, int] = {}

        def all_dead_lettered() -> bool:
            letters.clear()
            for dl in list_dead_letters(p.broker_url, p.topic, limit=10 * n):
                letters[dl.id] = letters.get(dl.id, 0) + 1
            return poison <= set(letters)

        with contextlib.suppress(AssertionError):  # what is not there is counted below, as lost
            wait_until(all_dead_lettered, 120, "every poison message in the dead-letter topic")
        drain = time.monotonic() - t
        with p.inbox.engine.connect() as conn:
            attempts = dict(conn.execute(sa.select(p.effects.c.msg_id, p.effects.c.attempts)).all())
        not_third = sum(1 for mid in transient if attempts.get(mid) not in (None, 3))
        strays = len(set(letters) - poison)  # dead letters of messages that were not poison
        notes = (
            f"{len(transient)} failed twice then took effect on attempt 3 ({not_third} not), "
            f"{len(poison)} poison: {len(poison & set(letters))} in {p.topic}.dlq, none with an effect; "
            f"{strays} other dead letters"
        )
        name = "handler failures: transient (2 fails) and poison (dead letter)"
        ledger = p.ledger(name, len(transient) + len(poison), drain, notes, no_effect=poison)
        ledger.lost += len(poison - set(letters))
        ledger.violations += not_third + strays
        return ledger
    finally:
        p.close()


Scenario = Callable[[EmbeddedBroker, Path, Size], Ledger]  # the cluster-* ones take a KafkaCluster instead

# `make chaos` must finish within 15 minutes on a 2-core machine; these take longest per message
# (S3-backed broker, a 25k-message repair, retries in place, a frozen group member), so they run
# smaller. The relay and consumer SIGKILL scenarios keep the full 50k.
FULL_SIZES: dict[str, Size] = {
    "broker-outage-durable": Size(messages=20_000, kills=10, outage_s=20),
    "broker-lost-memory": Size(messages=20_000, kills=10, outage_s=20),
    "handler-failures": Size(messages=20_000, kills=10, outage_s=20),
    "zombie-consumer": Size(messages=25_000, kills=10, outage_s=20),
    **broker_faults.FULL_SIZES,
    **rocketmq_faults.FULL_SIZES,
}
SHORT_SIZES: dict[str, Size] = dict(broker_faults.SHORT_SIZES)


def full_size(name: str) -> Size:
    return FULL_SIZES.get(name, Size.full())


def short_size(name: str) -> Size:
    return SHORT_SIZES.get(name, Size.short())


SCENARIOS: dict[str, Any] = {
    "relay-sigkill-postgresql": lambda b, w, s: relay_sigkill(b, w, s, "postgresql"),
    "relay-sigkill-sqlite": lambda b, w, s: relay_sigkill(b, w, s, "sqlite"),
    "consumer-sigkill": consumer_sigkill,
    "group-member-killed": group_member_killed,
    "two-relays": lambda b, w, s: relays_share_one_outbox(b, w, s, 2),
    "four-relays": lambda b, w, s: relays_share_one_outbox(b, w, s, 4),
    "zombie-consumer": zombie_consumer,
    "rebalance-storm": rebalance_storm,
    "broker-outage-durable": lambda b, w, s: broker_outage_durable(w, s),
    "postgres-restart": postgres_restart,
    "broker-lost-memory": lambda b, w, s: broker_lost_memory(w, s),
    "handler-failures": handler_failures,
    "spool-disk-full": spool_faults.disk_full,
    "spool-corrupted-files": spool_faults.corrupted_files,
    "spool-crash-before-promotion": spool_faults.crash_before_promotion,
    "bad-input": bad_input.bad_input,
    **broker_faults.CLUSTER_SCENARIOS,  # on the three-node Apache Kafka cluster, not on Tansu
    **rocketmq_faults.ROCKETMQ_SCENARIOS,  # each on a RocketMQ server of its own, never the shared one
}
