"""Scale-out: 1, 2, 4 relays (separate OS processes, as deployed) on ONE PostgreSQL outbox table.

Each run fills a fresh table with N messages (not timed), starts k ``zeroloss relay --drain``
processes together, each with its own ``--relay-id``, and times from their start until every
message is in ``success`` (or every relay exited). The time includes each relay's start-up
(interpreter, imports, Kafka producer), as a real restart would. Afterwards the topic is read
back: duplicates are reported (the relay is at-least-once; a crash-free run should have none)
and lost messages fail the benchmark. The table also shows how many messages each relay
process delivered (from ``claimed_by``), so a relay that sat idle shows.

Keys: message i gets key ``k<i % K>`` (``--keys``, default 10,000, like entity ids). Per-key
order means a key's messages are claimable by one relay at a time; with fewer keys than a
batch (e.g. relay_throughput's 100) the first relay's claim covers every key and the others
find nothing to claim, which ``--keys 100`` shows.

Baseline: the 1-relay figure of the same run; ratio = k relays / 1 relay.

Usage: python -m bench.scale_out [--messages N] [--relays 1,2,4] [--reps R] [--keys K]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass

import sqlalchemy as sa

from bench.common import PG, VALUE, Row, machine, report, say
from zeroloss.embedded_broker import EmbeddedBroker
from zeroloss.outbox.base import State
from zeroloss.outbox.sql import SqlOutbox
from zeroloss.readback import read_topic


@dataclass
class Run:
    rate: float
    duplicates: int
    lost: int
    split: list[int]  # messages each relay process delivered, most first


def fill(outbox: SqlOutbox, topic: str, n: int, keys: int) -> list[str]:
    """N messages, keyed like relay_throughput (``k<i % keys>``; keys=0: no key), in chunks."""
    ids: list[str] = []
    for start in range(0, n, 5000):
        rows = [
            {"topic": topic, "value": VALUE, **({"key": b"k%d" % (i % keys)} if keys else {})}
            for i in range(start, min(n, start + 5000))
        ]
        with outbox.engine.begin() as conn:
            ids += outbox.add_many(conn, rows)
    return ids


def delivered_by(outbox: SqlOutbox) -> list[int]:
    """How many messages each relay process marked delivered (``claimed_by`` holds its token)."""
    t = outbox.table
    with outbox.engine.connect() as conn:
        q = sa.select(sa.func.count()).where(t.c.state == State.SUCCESS.value).group_by(t.c.claimed_by)
        return sorted(conn.scalars(q), reverse=True)


def plural(k: int) -> str:
    return f"{k} relay" if k == 1 else f"{k} relays"


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def run_relays(broker_url: str, k: int, n: int, keys: int, batch_size: int, timeout_s: float) -> Run:
    run_id = uuid.uuid4().hex[:8]
    outbox = SqlOutbox(PG, table=f"bench_{run_id}")
    outbox.create_schema()
    topic = f"scale-{run_id}"
    procs: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(outbox.close)
        cleanup.callback(outbox.drop_schema)
        cleanup.callback(stop, procs)  # runs first: relays gone before their table is dropped
        logs = [cleanup.enter_context(tempfile.TemporaryFile()) for _ in range(k)]
        ids = fill(outbox, topic, n, keys)
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
            "--batch-size",
            str(batch_size),
        ]
        t = time.perf_counter()
        procs += [
            subprocess.Popen([*cmd, "--relay-id", f"r{i + 1}-{run_id}"], stdout=log, stderr=log)
            for i, log in enumerate(logs)
        ]
        deadline = t + timeout_s
        while True:
            done = outbox.stats().counts[State.SUCCESS] >= n
            exited = all(p.poll() is not None for p in procs)
            if done or exited:
                elapsed = time.perf_counter() - t
                break
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{k} relays did not deliver {n} messages within {timeout_s}s")
            time.sleep(0.1)  # stats() is a few scans: polling faster would steal the relays' CPU
        for p, log in zip(procs, logs, strict=True):
            if p.wait(timeout=120) != 0:
                log.seek(0)
                say(log.read().decode(errors="replace")[-4000:])
                raise RuntimeError(f"a relay exited {p.returncode}")
        counts = outbox.stats().counts
        if counts[State.SUCCESS] != n:
            raise RuntimeError(f"relays exited with the outbox at {counts}")
        split = delivered_by(outbox)
        say(f"  {plural(k)}: {n / elapsed:,.0f} msg/s, split {'/'.join(map(str, split))}; reading back ...")
        back = read_topic(broker_url, topic, expect=ids, timeout_s=max(60.0, n / 1000))
        lost = sum(1 for i in ids if i not in back.ids)
        return Run(n / elapsed, back.duplicates, lost, split)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--relays", default="1,2,4", help="comma-separated relay counts; the first is the baseline")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--keys",
        type=int,
        default=10_000,
        help="distinct message keys, message i gets key i %% K (0: unkeyed). Per-key order lets "
        "only one relay hold a key's messages: with fewer keys than a batch, one relay "
        "takes them all and the others wait",
    )
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--timeout-s", type=float, default=1800.0)
    args = ap.parse_args()
    n, reps = args.messages, args.reps
    counts = [int(x) for x in args.relays.split(",")]
    print(f"machine: {machine()}")
    print(
        f"messages: {n} x 200-byte values, {args.keys or 'no'} keys, batch {args.batch_size}, "
        f"one PostgreSQL outbox table, relays as separate processes, median of {reps}"
    )
    results: dict[int, list[Run]] = {}
    with EmbeddedBroker() as broker:
        for k in counts:
            say(f"{plural(k)} ...")
            results[k] = [run_relays(broker.url, k, n, args.keys, args.batch_size, args.timeout_s) for _ in range(reps)]
    rate = {k: statistics.median(r.rate for r in runs) for k, runs in results.items()}
    base = counts[0]
    rows = []
    for k in counts:
        runs = results[k]
        dup, lost = sum(r.duplicates for r in runs), sum(r.lost for r in runs)
        split = ", ".join("/".join(map(str, r.split)) for r in runs)
        rows.append(
            Row(
                f"{plural(k)}, one PostgreSQL outbox → Kafka ({lost} lost, {dup} duplicates; split {split})",
                rate[k],
                plural(base),
                rate[base],
                target=f"≥ 1.00x {plural(base)}; 0 lost, 0 duplicates",
                min_ratio=1.0,
                ok=lost == 0 and dup == 0,
            )
        )
    report(rows)
    print()
    print("| relays | duplicates (all reps) | lost (all reps) | messages per relay (each rep) |")
    print("| --- | --- | --- | --- |")
    for k, runs in results.items():
        split = ", ".join("/".join(map(str, r.split)) for r in runs)
        print(f"| {k} | {sum(r.duplicates for r in runs)} | {sum(r.lost for r in runs)} | {split} |")
    lost = sum(r.lost for runs in results.values() for r in runs)
    if lost:
        sys.exit(f"LOST {lost} messages")


if __name__ == "__main__":
    main()
