"""RocketMQ broker faults for ``make chaos``: the broker (with its gRPC proxy) SIGKILLed and
restarted while a relay publishes; with ``flushDiskType=SYNC_FLUSH`` nothing acknowledged is lost.

The scenario runs its own RocketMQ server (tests/rocketmq_server.py) in its work directory, on ports
of its own, and wipes it afterwards: the shared one on 19876/10911/18081 is used by other tests
and must never be killed. Ports: ``ZEROLOSS_CHAOS_ROCKETMQ_PORTS`` = ``NAMESRV,BROKER,PROXY``
(default 23876,23911,23881; the broker also takes BROKER-2 and BROKER+1, the proxy PROXY-1).

Counted from the broker itself (every queue of the topic read back with the remoting protocol's
pull, not through zeroloss's publishing code): committed ids missing (lost), copies (duplicates
on the broker: a send in flight at the kill may be stored and sent again), per-key order of first
copies against commit order, ids that were never committed.
"""

from __future__ import annotations

import os
import random
import signal
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from tests.chaos.pipeline import Ledger, Size, start_relay, wait_until
from tests.rocketmq_server import RocketMQServer
from zeroloss.brokers._batch import value_bytes
from zeroloss.brokers.rocketmq_admin import RocketMQAdmin
from zeroloss.message import ID_HEADER
from zeroloss.outbox.base import State
from zeroloss.outbox.sql import SqlOutbox

KEYS = 13


def _ports() -> tuple[int, int, int]:
    raw = os.environ.get("ZEROLOSS_CHAOS_ROCKETMQ_PORTS", "23876,23911,23881")
    namesrv, broker, proxy = (int(p) for p in raw.split(","))
    return namesrv, broker, proxy


def _own_server(work: Path) -> RocketMQServer:
    namesrv, broker, proxy = _ports()
    return RocketMQServer(work / "rocketmq", namesrv_port=namesrv, broker_port=broker, proxy_port=proxy)


def broker_killed(_: Any, work: Path, size: Size) -> Ledger:
    """SIGKILL the broker ``size.kills`` times at random points of the relay's progress, each time
    down for ``size.outage_s`` seconds, then restarted on its data; the relay keeps running."""
    rng = random.Random(int(os.environ.get("ZEROLOSS_SEED", time.time())))
    server = _own_server(work)
    server.start()
    relay = None
    outbox = None
    try:
        topic = f"chaos-{uuid.uuid4().hex[:10]}"
        server.create_topics({topic: "FIFO", f"{topic}_dlq": "FIFO"})
        outbox_url = f"sqlite:///{work / 'outbox.db'}"
        outbox = SqlOutbox(outbox_url)
        outbox.create_schema()
        committed: list[tuple[str, bytes]] = []
        with outbox.engine.begin() as conn:
            for i in range(size.messages):
                key = b"k%d" % (i % KEYS)
                committed.append((outbox.add(conn, topic=topic, value=b"%d" % i, key=key), key))

        def delivered() -> int:
            assert outbox is not None
            return outbox.stats().counts[State.SUCCESS]

        log = work / "relay.log"
        relay = start_relay(["--source", outbox_url], server.zeroloss_url, f"chaos-rmq-{uuid.uuid4().hex[:6]}", log)
        points = sorted(rng.sample(range(size.messages // 10, size.messages * 9 // 10), size.kills))
        restarts: list[float] = []
        for point in points:
            wait_until(lambda: delivered() >= point or relay.poll() is not None, 300, "relay progress")  # noqa: B023
            assert relay.poll() is None, log.read_text()[-3000:]
            server.kill("broker")
            time.sleep(size.outage_s)  # the outage itself: the relay must ride it out
            began = time.monotonic()
            server.restart("broker")
            restarts.append(time.monotonic() - began)
        t = time.monotonic()
        wait_until(lambda: delivered() == size.messages or relay.poll() is not None, 600, "full delivery")
        drain_s = time.monotonic() - t
        relay.send_signal(signal.SIGTERM)
        relay.wait(60)
        stats = outbox.stats()
        problems = [] if stats.counts[State.FAILED] == 0 else [f"{stats.counts[State.FAILED]} failed in the outbox"]
        notes = (
            f"own RocketMQ 5.5.0 server, SYNC_FLUSH, ASYNC_MASTER without slave; broker down "
            f"{size.outage_s:g}s each time, restart until a message goes through "
            f"{', '.join(f'{r:.0f}s' for r in restarts)}"
        )
        return _ledger(server, topic, committed, size.kills, drain_s, notes, problems)
    finally:
        if relay is not None and relay.poll() is None:
            relay.kill()
            relay.wait()
        if outbox is not None:
            outbox.close()
        server.stop(wipe=True)


def _ledger(
    server: RocketMQServer,
    topic: str,
    committed: list[tuple[str, bytes]],
    faults: int,
    drain_s: float,
    notes: str,
    problems: list[str],
) -> Ledger:
    admin = RocketMQAdmin(server.namesrv_addr)
    seen: Counter[str] = Counter()
    order: dict[bytes, list[str]] = {}
    for m in admin.read_topic(topic, group="zl-chaos-reader"):
        mid = m.properties.get(ID_HEADER, "")
        seen[mid] += 1
        key = m.properties.get("zeroloss-key")
        if seen[mid] == 1 and key is not None:
            order.setdefault(value_bytes(key), []).append(mid)
    ids = [mid for mid, _ in committed]
    known = set(ids)
    lost = sum(1 for mid in ids if not seen[mid])
    strangers = [mid for mid in seen if mid not in known]
    if strangers:
        problems.append(f"{len(strangers)} never-committed message(s) on the broker")
    by_key: dict[bytes, list[str]] = {}
    for mid, committed_key in committed:
        if seen[mid]:
            by_key.setdefault(committed_key, []).append(mid)
    out_of_order = sum(1 for key, mids in by_key.items() if [m for m in order.get(key, []) if m in known] != mids)
    notes += "".join(f"; PROBLEM: {p}" for p in problems)
    return Ledger(
        "RocketMQ broker SIGKILL + restart mid-stream",
        len(ids),
        faults,
        lost,
        sum(seen.values()) - len(seen),
        None,
        out_of_order,
        drain_s,
        notes,
        violations=len(problems),
    )


ROCKETMQ_SCENARIOS = {"rocketmq-broker-killed": broker_killed}
FULL_SIZES = {"rocketmq-broker-killed": Size(messages=20_000, kills=3, outage_s=5)}
