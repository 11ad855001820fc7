"""Consumer throughput: a zeroloss Consumer with a SqlInbox on PostgreSQL (one effect row per
message, written through ``tx``) against two baselines reading the same topic in the same run: a
hand-written consumer that writes the same effect rows per batch (one executemany, one commit,
then the offsets; no dedup: a crash between the two applies the batch twice), and a bare
confluent-kafka consumer that only commits offsets (what reading alone costs).

Usage: python -m bench.consumer [--messages N] [--reps R]
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from typing import Any

import sqlalchemy as sa

from bench.common import PG, VALUE, Row, machine, report, say
from zeroloss.brokers.kafka import kafka_module
from zeroloss.consumer import Consumer, ConsumerSettings, Received
from zeroloss.embedded_broker import EmbeddedBroker
from zeroloss.inbox import SqlInbox

GROUP_CONF = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}
TB = ConsumerSettings().transaction_batch  # the rows measure the default a user gets


def fill(bootstrap: str, topic: str, n: int) -> None:
    ck = kafka_module()
    p = ck.Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True, "linger.ms": 5})
    for i in range(n):
        while True:
            try:
                p.produce(
                    topic, value=VALUE, key=b"k%d" % (i % 100), headers=[("zeroloss-id", uuid.uuid4().hex.encode())]
                )
                break
            except BufferError:
                p.poll(0.01)
    assert p.flush(60) == 0, "messages left unflushed"


def plain_consumer(bootstrap: str, topic: str, prefix: str) -> Any:
    """A confluent-kafka consumer in a new group, offsets committed by hand, from the start."""
    c = kafka_module().Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"{prefix}-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            **GROUP_CONF,
        }
    )
    c.subscribe([topic])
    return c


def bare(bootstrap: str, topic: str, n: int) -> float:
    """Seconds for a bare consumer to read n messages, committing synchronously per batch."""
    c = plain_consumer(bootstrap, topic, "bare")
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


def hand_written(bootstrap: str, topic: str, n: int) -> float:
    """Seconds for the blog-post consumer: per batch of up to 500, INSERT the effect rows with one
    executemany, COMMIT, then commit the offsets synchronously. At-least-once, no dedup."""
    engine = sa.create_engine(PG)
    effects = sa.Table(
        f"bench_hand_{uuid.uuid4().hex[:8]}", sa.MetaData(), sa.Column("id", sa.String(64), nullable=False)
    )
    effects.create(engine)
    c = plain_consumer(bootstrap, topic, "hand")
    seen, started = 0, 0.0
    try:
        while seen < n:
            batch = [m for m in c.consume(500, 1.0) if m.error() is None]
            if not batch:
                continue
            if not started:
                started = time.perf_counter()
            rows = [{"id": dict(m.headers() or [])["zeroloss-id"].decode()} for m in batch]
            with engine.begin() as conn:
                conn.execute(effects.insert(), rows)
            c.commit(asynchronous=False)
            seen += len(batch)
        return time.perf_counter() - started
    finally:
        c.close()
        effects.drop(engine)
        engine.dispose()


def ours(url: str, topic: str, n: int, transaction_batch: int, batch: bool = False) -> float:
    """Seconds for a zeroloss Consumer (PostgreSQL inbox, one effect row per message) to handle n;
    ``batch``: a batch handler writing a run's effect rows with one executemany."""
    suffix = uuid.uuid4().hex[:8]
    inbox = SqlInbox(PG, table=f"bench_inbox_{suffix}")
    inbox.create_schema()
    effects = sa.Table(f"bench_effects_{suffix}", sa.MetaData(), sa.Column("id", sa.String(64), nullable=False))
    effects.create(inbox.engine)
    c = Consumer(url, f"zl-{suffix}", [topic], inbox, config=dict(GROUP_CONF), transaction_batch=transaction_batch)
    handled, started = 0, 0.0

    def count(k: int) -> None:
        nonlocal handled, started
        if not started:
            started = time.perf_counter()
        handled += k
        if handled >= n:
            c.stop()  # the loop commits what is done and leaves

    if batch:

        @c.handler(batch=True)
        def handle_many(msgs: list[Received], tx: Any) -> None:
            tx.execute(effects.insert(), [{"id": m.id} for m in msgs])
            count(len(msgs))
    else:

        @c.handler
        def handle(msg: Received, tx: Any) -> None:
            tx.execute(effects.insert(), {"id": msg.id})
            count(1)

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
        rates: dict[str, list[float]] = {"bare": [], "hand": [], "batch": [], "batched": [], "single": []}
        single_n = max(500, n // 10)  # one commit per message is slow: a tenth is enough to measure it
        for r in range(reps):
            say(f"rep {r + 1}: bare consumer ...")
            rates["bare"].append(n / bare(broker.bootstrap, topic, n))
            say(f"rep {r + 1}: hand-written consumer, effect rows per batch, no dedup ...")
            rates["hand"].append(n / hand_written(broker.bootstrap, topic, n))
            say(f"rep {r + 1}: zeroloss consumer, batch handler, {TB} messages per inbox transaction ...")
            rates["batch"].append(n / ours(broker.url, topic, n, TB, batch=True))
            say(f"rep {r + 1}: zeroloss consumer, {TB} messages per inbox transaction ...")
            rates["batched"].append(n / ours(broker.url, topic, n, TB))
            say(f"rep {r + 1}: zeroloss consumer, one inbox transaction per message ...")
            rates["single"].append(single_n / ours(broker.url, topic, single_n, 1))
    med = {k: statistics.median(v) for k, v in rates.items()}
    report(
        [
            Row(
                f"consumer + SqlInbox (PostgreSQL), batch handler (executemany), transaction_batch={TB}",
                med["batch"],
                "hand-written: effect rows per batch (executemany), then offsets, no dedup",
                med["hand"],
                min_value=15_000,
                min_ratio=0.5,
            ),
            Row(
                f"consumer + SqlInbox (PostgreSQL), handler per message, transaction_batch={TB}",
                med["batched"],
                "hand-written, per batch",
                med["hand"],
                target="(report: one INSERT per message)",
            ),
            Row(
                "consumer + SqlInbox (PostgreSQL), batch handler",
                med["batch"],
                "bare consumer, offsets only",
                med["bare"],
                target="(report: what reading alone costs)",
            ),
            Row(
                "consumer + SqlInbox (PostgreSQL), handler per message, transaction_batch=1",
                med["single"],
                "hand-written, per batch",
                med["hand"],
                target="(report: for contrast)",
            ),
        ]
    )


if __name__ == "__main__":
    main()
