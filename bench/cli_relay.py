"""The relay as deployed: ``zeroloss relay --drain`` (a separate process, start-up included) from a
PostgreSQL outbox with N messages pending, against two baselines measured in the same run:

* the bare idempotent producer (acks=all) sending the same messages — the broker's ceiling;
* a careful hand-written relay, as the blog posts write it: one transaction per batch of
  ``SELECT … ORDER BY id LIMIT n FOR UPDATE SKIP LOCKED`` → produce → flush → ``DELETE``, on a
  narrow table of its own (bigserial id, topic, key, value), idempotent producer, no broker
  transaction, no per-key guard across relays, no ledger.

Keys: message i gets key ``k<i % K>`` for each K of ``--keys`` (0: no key). Each figure is the
median of ``--reps`` runs, each on a fresh table filled beforehand (not timed).

``--profile DIR`` runs the relay under ``py-spy record`` (``pip install py-spy``, in the dev extra)
and writes one flame graph per key count, plus a ``--format raw`` text of collapsed stacks.

Usage: python -m bench.cli_relay [--messages N] [--keys 100,10000,0] [--reps R] [--batch-size B]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

from bench.common import PG, VALUE, Row, machine, median_rate, report, say
from bench.relay_throughput import bare_producer
from bench.scale_out import fill
from zeroloss.brokers.kafka import kafka_module
from zeroloss.embedded_broker import EmbeddedBroker
from zeroloss.outbox.base import State
from zeroloss.outbox.sql import SqlOutbox
from zeroloss.sqlurl import make_engine

HAND_DDL = """CREATE TABLE {t} (id bigserial PRIMARY KEY, topic text NOT NULL, key bytea, value bytea NOT NULL,
                              created_at timestamptz NOT NULL DEFAULT now())"""


def keys_name(keys: int) -> str:
    return f"{keys:,} keys" if keys else "no keys"


def cli_relay(
    broker_url: str,
    n: int,
    keys: int,
    batch_size: int | None,
    profile: Path | None,
    analyze: bool,
    src: Path | None = None,
) -> float:
    """msgs/s of one ``zeroloss relay --drain`` process over N pending messages; ``src``: another
    zeroloss source tree (e.g. ``git archive main src``) makes the table and runs the relay."""
    run_id = uuid.uuid4().hex[:8]
    env = None if src is None else {**os.environ, "PYTHONPATH": str(src)}
    outbox = SqlOutbox(PG, table=f"bench_{run_id}")
    if src is None:
        outbox.create_schema()
    else:  # that version's table and indexes
        subprocess.run(
            [sys.executable, "-m", "zeroloss", "init", "--source", PG, "--table", outbox.table.name],
            env=env,
            check=True,
            capture_output=True,
        )
    try:
        fill(outbox, f"cli-{run_id}", n, keys)
        if analyze:  # as autovacuum leaves a table in steady use; without: a backlog that just arrived
            with outbox.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql(f"VACUUM ANALYZE {outbox.table.name}")
        cmd = [
            sys.executable,
            "-m",
            "zeroloss",
            "relay",
            "--source",
            PG,
            "--table",
            outbox.table.name,
            "--target",
            broker_url,
            "--drain",
            "--relay-id",
            f"cli-{run_id}",
        ]
        if batch_size:
            cmd += ["--batch-size", str(batch_size)]
        if profile is not None:
            profile.mkdir(parents=True, exist_ok=True)
            out = profile / f"relay-{keys}keys-{run_id}"
            cmd = ["py-spy", "record", "--native", "-r", "50", "--idle", "-f", "raw", "-o", f"{out}.txt", "--", *cmd]
        t = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, timeout=3600, env=env)
        elapsed = time.perf_counter() - t
        if done.returncode != 0:
            say(done.stderr.decode(errors="replace")[-4000:])
            raise RuntimeError(f"zeroloss relay exited {done.returncode}")
        counts = outbox.stats().counts
        if counts[State.SUCCESS] != n:
            raise RuntimeError(f"relay exited with the outbox at {counts}")
        say(
            f"  zeroloss relay{'' if src is None else ' from ' + str(src)}, {keys_name(keys)}: "
            f"{n / elapsed:,.0f} msg/s ({elapsed:.1f} s)"
        )
        return n / elapsed
    finally:
        outbox.drop_schema()
        outbox.close()


def hand_relay(bootstrap: str, n: int, keys: int, batch: int) -> float:
    """msgs/s of the hand-written relay draining N rows of its own table (filled untimed)."""
    engine = make_engine(PG)
    name = f"hand_{uuid.uuid4().hex[:8]}"
    topic = f"hand-{name}"
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(HAND_DDL.format(t=name))
            rows = [{"topic": topic, "key": (b"k%d" % (i % keys)) if keys else None, "value": VALUE} for i in range(n)]
            for start in range(0, n, 5000):
                conn.execute(
                    sa.text(f"INSERT INTO {name} (topic, key, value) VALUES (:topic, :key, :value)"),
                    rows[start : start + 5000],
                )
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(f"VACUUM ANALYZE {name}")
        ck = kafka_module()
        producer = ck.Producer(
            {"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True, "linger.ms": 5}
        )
        failed: list[object] = []

        def on_delivery(err: object, msg: object) -> None:
            if err is not None:
                failed.append(err)

        select = f"SELECT id, topic, key, value FROM {name} ORDER BY id LIMIT %(n)s FOR UPDATE SKIP LOCKED"
        delete = f"DELETE FROM {name} WHERE id = ANY(%(ids)s)"
        sent = 0
        t = time.perf_counter()
        with engine.connect() as conn:
            while True:
                with conn.begin():
                    got = conn.exec_driver_sql(select, {"n": batch}).all()
                    if not got:
                        break
                    for row in got:
                        while True:
                            try:
                                producer.produce(
                                    row.topic,
                                    value=bytes(row.value),
                                    key=None if row.key is None else bytes(row.key),
                                    headers=[("id", str(row.id).encode())],
                                    on_delivery=on_delivery,
                                )
                                break
                            except BufferError:
                                producer.poll(0.01)
                    if producer.flush(30) or failed:
                        raise RuntimeError(f"hand-written relay: broker did not acknowledge ({failed[:1]})")
                    conn.exec_driver_sql(delete, {"ids": [row.id for row in got]})
                sent += len(got)
        elapsed = time.perf_counter() - t
        assert sent == n, f"hand-written relay sent {sent} of {n}"
        say(f"  hand-written relay, {keys_name(keys)}: {n / elapsed:,.0f} msg/s")
        return n / elapsed
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
        engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--keys", default="100,10000,0", help="comma-separated key counts (0: unkeyed)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=None, help="zeroloss relay --batch-size (default: its own)")
    ap.add_argument("--hand-batch", type=int, default=1000, help="the hand-written relay's LIMIT")
    ap.add_argument("--profile", type=Path, default=None, help="py-spy the relay; collapsed stacks to this dir")
    ap.add_argument(
        "--compare-src",
        type=Path,
        default=None,
        help="also run the relay of another zeroloss source tree (before/after in one run), e.g. "
        "mkdir /tmp/old && git archive main src | tar -x -C /tmp/old, then /tmp/old/src",
    )
    ap.add_argument(
        "--no-analyze",
        dest="analyze",
        action="store_false",
        help="relay a backlog that just arrived: no VACUUM ANALYZE of the outbox before the relay starts",
    )
    args = ap.parse_args()
    n, reps = args.messages, args.reps
    key_counts = [int(k) for k in args.keys.split(",")]
    print(f"machine: {machine()}")
    print(
        f"messages: {n} x 200-byte values pending in PostgreSQL, `zeroloss relay --drain` as a process "
        f"(start-up included), {'VACUUM ANALYZE before' if args.analyze else 'no ANALYZE before'}, "
        f"batch {args.batch_size or 'default'}; hand-written relay LIMIT {args.hand_batch}; "
        f"median of {reps}"
    )
    rows: list[Row] = []
    with EmbeddedBroker() as broker:
        say("bare producer ...")
        bare = median_rate(lambda: bare_producer(broker.bootstrap, n), reps)
        for keys in key_counts:
            say(f"{keys_name(keys)} ...")
            mine: list[float] = []
            theirs: list[float] = []
            for _ in range(reps):  # interleaved, so a load that comes and goes falls on both
                mine.append(cli_relay(broker.url, n, keys, args.batch_size, args.profile, args.analyze))
                if args.compare_src is not None:
                    theirs.append(cli_relay(broker.url, n, keys, args.batch_size, None, args.analyze, args.compare_src))
                    load = os.getloadavg()[0]
                    a, b = mine[-1], theirs[-1]
                    say(f"  pair: ours {a:,.0f} vs theirs {b:,.0f} msg/s = {a / b:.2f}x (load {load:.1f})")
            ours = statistics.median(mine)
            if args.compare_src is not None:
                old = statistics.median(theirs)
                rows.append(
                    Row(
                        f"`zeroloss relay` vs {args.compare_src}'s, {keys_name(keys)}",
                        ours,
                        f"{args.compare_src}'s relay",
                        old,
                    )
                )
            hand = statistics.median(hand_relay(broker.bootstrap, n, keys, args.hand_batch) for _ in range(reps))
            rows += [
                Row(
                    f"`zeroloss relay`, PostgreSQL → Kafka, {keys_name(keys)}",
                    ours,
                    "bare idempotent producer",
                    bare,
                    min_value=30_000,
                    min_ratio=0.25,
                ),
                Row(
                    f"`zeroloss relay` vs hand-written relay, {keys_name(keys)}",
                    ours,
                    "SKIP LOCKED → produce → flush → DELETE",
                    hand,
                    min_ratio=3,
                ),
            ]
    report(rows)


if __name__ == "__main__":
    main()
