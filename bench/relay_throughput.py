"""Relay throughput (outbox → Kafka, the relay in-process) from PostgreSQL, MariaDB, SQLite and a
FileSpool against a bare confluent-kafka producer with the same
durability settings (acks=all, idempotence) sending the same messages, in the same run.

Usage: python bench/relay_throughput.py [--messages N] [--reps R]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from bench.common import MARIADB, PG, VALUE, Row, machine, median_rate, report, say
from zeroloss.brokers.kafka import KafkaBroker, kafka_module
from zeroloss.embedded_broker import EmbeddedBroker
from zeroloss.outbox.base import OutboxStore
from zeroloss.outbox.spool import FileSpool
from zeroloss.outbox.sql import SqlOutbox
from zeroloss.relay import Relay, RelaySettings


def bare_producer(bootstrap: str, n: int) -> int:
    ck = kafka_module()
    p = ck.Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True, "linger.ms": 5})
    topic = f"bare-{uuid.uuid4().hex[:8]}"
    acked = 0

    def cb(err: object, msg: object) -> None:
        nonlocal acked
        if err is None:
            acked += 1

    for i in range(n):
        while True:
            try:
                p.produce(
                    topic, value=VALUE, key=b"k%d" % (i % 100), headers=[("zeroloss-id", b"x" * 36)], on_delivery=cb
                )
                break
            except BufferError:
                p.poll(0.01)
    p.flush(60)
    assert acked == n, f"bare producer: {acked} of {n} acked"
    return n


def naive_producer(bootstrap: str, n: int) -> int:
    """What many services write: produce, then flush, per message."""
    ck = kafka_module()
    p = ck.Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True})
    topic = f"naive-{uuid.uuid4().hex[:8]}"
    for i in range(n):
        p.produce(topic, value=VALUE, key=b"k%d" % (i % 100))
        p.flush(10)
    return n


def fill_sql(outbox: SqlOutbox, topic: str, n: int) -> None:
    rows = [{"topic": topic, "value": VALUE, "key": b"k%d" % (i % 100)} for i in range(n)]
    for start in range(0, n, 5000):
        with outbox.engine.begin() as conn:
            outbox.add_many(conn, rows[start : start + 5000])


def fill_spool(spool: FileSpool, topic: str, n: int) -> None:
    for start in range(0, n, 1000):
        with spool.transaction() as tx:
            for i in range(start, min(n, start + 1000)):
                tx.add(topic=topic, value=VALUE, key=b"k%d" % (i % 100))


def relay_run(store: OutboxStore, url: str, n: int, timeout_s: float = 600) -> int:
    broker = KafkaBroker(url, transactional_id=f"bench-{uuid.uuid4().hex[:8]}", timeout_s=30)
    relay = Relay(store, broker, RelaySettings(batch_size=1000, idle_wait_s=0.001, success_retention_s=None))
    relay.drain(timeout_s=timeout_s)
    broker.close()
    assert relay.counters.delivered == n, relay.counters
    return n


def time_relay(url: str, reps: int, make: Callable[[], tuple[OutboxStore, Callable[[], None]]], n: int) -> float:
    """Median msgs/s of the relay alone: each repetition fills a fresh store (not timed)."""
    rates = []
    for _ in range(reps):
        store, cleanup = make()
        try:
            t = time.perf_counter()
            relay_run(store, url, n)
            rates.append(n / (time.perf_counter() - t))
        finally:
            cleanup()
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    n, reps = args.messages, args.reps
    print(f"machine: {machine()}")
    print(f"messages: {n} x 200-byte values, median of {reps}")
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        say("bare producer ...")
        bare = median_rate(lambda: bare_producer(broker.bootstrap, n), reps)
        say("naive producer ...")
        naive_n = max(200, n // 100)
        naive = median_rate(lambda: naive_producer(broker.bootstrap, naive_n), reps)

        def sql(url: str) -> Callable[[], tuple[OutboxStore, Callable[[], None]]]:
            def make() -> tuple[OutboxStore, Callable[[], None]]:
                outbox = SqlOutbox(url, table=f"bench_{uuid.uuid4().hex[:8]}")
                outbox.create_schema()
                fill_sql(outbox, f"b-{uuid.uuid4().hex[:8]}", n)

                def cleanup() -> None:
                    outbox.drop_schema()
                    outbox.close()

                return outbox, cleanup

            return make

        def spool() -> tuple[OutboxStore, Callable[[], None]]:
            path = Path(tmp) / f"spool-{uuid.uuid4().hex[:6]}"
            filler = FileSpool(path, fsync=False)  # the fill is not timed: 100k fsyncs would take minutes
            fill_spool(filler, f"b-{uuid.uuid4().hex[:8]}", n)
            filler.close()
            store = FileSpool(path)

            def cleanup() -> None:
                store.close()
                shutil.rmtree(path)

            return store, cleanup

        say("relay from PostgreSQL ...")
        pg = time_relay(broker.url, reps, sql(PG), n)
        say("relay from MariaDB ...")
        maria = time_relay(broker.url, reps, sql(MARIADB), n)
        say("relay from SQLite ...")
        lite = time_relay(broker.url, reps, sql(f"sqlite:///{Path(tmp) / 'bench.db'}"), n)
        say("relay from the spool ...")
        spool_rate = time_relay(broker.url, reps, spool, n)
    rows = [
        Row(
            "relay in-process, SqlOutbox on PostgreSQL → Kafka, 100 keys",
            pg,
            "bare idempotent producer",
            bare,
            min_value=30_000,
            min_ratio=0.25,
        ),
        Row(
            "relay in-process, SqlOutbox on MariaDB → Kafka, 100 keys",
            maria,
            "bare idempotent producer",
            bare,
            min_value=10_000,
        ),
        Row("relay in-process, SqlOutbox on SQLite → Kafka, 100 keys", lite, "bare idempotent producer", bare),
        Row("relay in-process, FileSpool → Kafka", spool_rate, "bare idempotent producer", bare, min_value=30_000),
        Row("relay in-process, PostgreSQL vs the naive way", pg, "produce+flush per message", naive, min_ratio=20),
    ]
    report(rows)


if __name__ == "__main__":
    main()
