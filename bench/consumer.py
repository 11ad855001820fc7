"""Consumer throughput: a zeroloss Consumer with a SqlInbox on PostgreSQL (one effect row per
message, written through ``tx``) against a bare confluent-kafka consumer committing per batch,
reading the same topic in the same run.

Usage: python -m bench.consumer [--messages N] [--reps R]
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from typing import Any

import sqlalchemy as sa

from bench.common import VALUE, Row, machine, say, table
from zeroloss.brokers.kafka import kafka_module
from zeroloss.consumer import Consumer, Received
from zeroloss.embedded_broker import EmbeddedBroker
from zeroloss.inbox import SqlInbox

PG = "postgresql://postgres@127.0.0.1:5432/test"
GROUP_CONF = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}


def fill(bootstrap: str, topic: str, n: int) -> None:
    ck = kafka_module()
    p = ck.Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True, "linger.ms": 5})
    for i in range(n):
        while True:
            try:
                p.produce(topic, value=VALUE, key=b"k%d" % (i % 100),
                          headers=[("zeroloss-id", uuid.uuid4().hex.encode())])
                break
            except BufferError:
                p.poll(0.01)
    assert p.flush(60) == 0, "messages left unflushed"


def bare(bootstrap: str, topic: str, n: int) -> float:
    """Seconds for a bare consumer to read n messages, committing synchronously per batch."""
    ck = kafka_module()
    c = ck.Consumer({"bootstrap.servers": bootstrap, "group.id": f"bare-{uuid.uuid4().hex[:8]}",
                     "enable.auto.commit": False, "auto.offset.reset": "earliest", **GROUP_CONF})
    c.subscribe([topic])
    seen, started = 0, 0.0
    try:
        while seen < n:
            batch = c.consume(500, 1.0)
            if batch and not started:
                started = time.perf_counter()  # from the first message: the group join is not the subject
            seen += sum(1 for m in batch if m.error() is None)
            if batch:
                c.commit(asynchronous=False)
        return time.perf_counter() - started
    finally:
        c.close()


def ours(url: str, topic: str, n: int, transaction_batch: int) -> float:
    """Seconds for a zeroloss Consumer (PostgreSQL inbox, one effect row per message) to handle n."""
    suffix = uuid.uuid4().hex[:8]
    inbox = SqlInbox(PG, table=f"bench_inbox_{suffix}")
    inbox.create_schema()
    effects = sa.Table(f"bench_effects_{suffix}", sa.MetaData(), sa.Column("id", sa.String(64), nullable=False))
    effects.create(inbox.engine)
    c = Consumer(url, f"zl-{suffix}", [topic], inbox, config=dict(GROUP_CONF), transaction_batch=transaction_batch)
    handled, started = 0, 0.0

    @c.handler
    def handle(msg: Received, tx: Any) -> None:
        nonlocal handled, started
        if not started:
            started = time.perf_counter()
        tx.execute(effects.insert(), {"id": msg.id})
        handled += 1
        if handled >= n:
            c.stop()  # the loop commits what is done and leaves

    try:
        c.run_until_idle(idle_s=30, timeout_s=600)
        elapsed = time.perf_counter() - started
        with inbox.engine.connect() as conn:
            rows = conn.execute(sa.select(sa.func.count()).select_from(effects)).scalar_one()
        assert rows == n, f"{rows} effects for {n} messages"
        return elapsed
    finally:
        c.close()
        effects.drop(inbox.engine)
        inbox.drop_schema()
        inbox.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    n, reps = args.messages, args.reps
    print(f"machine: {machine()}")
    print(f"consumer: {n} x 200-byte values, PostgreSQL inbox, median of {reps}")
    with EmbeddedBroker() as broker:
        topic = f"bench-c-{uuid.uuid4().hex[:8]}"
        say("filling the topic ...")
        fill(broker.bootstrap, topic, n)
        rates: dict[str, list[float]] = {"bare": [], "batched": [], "single": []}
        single_n = max(500, n // 10)  # one commit per message is slow: a tenth is enough to measure it
        for r in range(reps):
            say(f"rep {r + 1}: bare consumer ...")
            rates["bare"].append(n / bare(broker.bootstrap, topic, n))
            say(f"rep {r + 1}: zeroloss consumer, 100 messages per inbox transaction ...")
            rates["batched"].append(n / ours(broker.url, topic, n, 100))
            say(f"rep {r + 1}: zeroloss consumer, one inbox transaction per message ...")
            rates["single"].append(single_n / ours(broker.url, topic, single_n, 1))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(table([
        Row("consumer + SqlInbox (PostgreSQL), transaction_batch=100", med["batched"],
            "bare consumer, commit per batch", med["bare"], target="≥ 0.3x"),
        Row("consumer + SqlInbox (PostgreSQL), transaction_batch=1", med["single"],
            "bare consumer, commit per batch", med["bare"], target="(for contrast)"),
    ]))


if __name__ == "__main__":
    main()
