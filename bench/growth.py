"""Growth: relay throughput (SqlOutbox on PostgreSQL → Kafka, as relay_throughput's PG figure)
as the table grows, two ways:

* history: the table already holds no (``--small-history``) vs a large history of delivered
  (``success``) rows, kept for audit; N new messages relayed;
* backlog: ``--small-pending`` (20k) vs ``--large-pending`` (1M) messages pending, each drained
  whole (filled through ``add_many`` and ``VACUUM ANALYZE``d, not timed).

Each repetition makes a fresh table, fills the history with one server-side
``INSERT … SELECT … generate_series`` (rows as the relay leaves them: UUIDv7 ids older than the
new messages, same topic and keys, ``done_at``, ``location``, ``claimed_by``), runs
``VACUUM ANALYZE``, adds N new messages (not timed) and times a relay drain. ``--aged`` (the
default) measures the large history a second way, as a relay's own table holds it: each row
inserted new, claimed and recorded by UPDATEs, with a VACUUM at autovacuum's default threshold
(1M rows: a primary key of 14.4k pages instead of 7.2k, a heap 13% larger, the new messages in
the space VACUUM freed rather than after the history). Both are what autovacuum leaves: analyzed
while the table held history only, so to the planner every partial index looks empty.

Baseline: the small figure; ratio = large / small; target ≥ 0.8 for both. After an untimed
warm-up drain, each repetition measures one of each in turn (small, large, aged), so a load that
drifts on a shared machine falls on both sides of a ratio instead of on one block of them. Below
it, the script prints ``EXPLAIN (ANALYZE, BUFFERS)`` of each statement of one claim on the
large-history table (captured from ``SqlOutbox.claim`` itself, so it stays what the relay runs).

Usage: python -m bench.growth [--messages N] [--small-history H] [--large-history H]
                              [--small-pending P] [--large-pending P] [--reps R] [--no-aged]
"""

from __future__ import annotations

import argparse
import hashlib
import re
import socket
import statistics
import time
import uuid
from typing import Any

import sqlalchemy as sa

from bench.common import PG, VALUE, Row, machine, report, say
from bench.relay_throughput import fill_sql, relay_run
from zeroloss.embedded_broker import EmbeddedBroker
from zeroloss.outbox.base import State
from zeroloss.outbox.sql import SqlOutbox
from zeroloss.outbox.sql.table import key_hash

KEYS = 100  # relay_throughput's keys: b"k%d" % (i % 100)
SPAN_S = 6 * 86400.0  # history spread over the last 6 days: inside the relay's default 7-day retention

# One row per g.i in [lo, hi). The id is a UUIDv7 string: 48-bit millisecond time (distinct per
# row while span_ms >= n), version 7, variant 8, the rest from md5. {fill}: DELIVERED (the row as
# SqlOutbox.succeed leaves it) or NEW (as add leaves it).
HISTORY_SQL = """
INSERT INTO {table} (id, topic, msg_key, key_hash, value, headers, state, attempts, not_before,
                     lease_until, claimed_by, created_at, last_error, location, done_at)
SELECT substr(h.ts, 1, 8) || '-' || substr(h.ts, 9, 4) || '-7' || substr(h.r, 1, 3) || '-8'
         || substr(h.r, 4, 3) || '-' || substr(h.r, 7, 12),
       %(topic)s::text, (%(keys)s::bytea[])[g.i %% {nkeys} + 1], (%(hashes)s::text[])[g.i %% {nkeys} + 1],
       %(value)s, NULL, {fill}
FROM generate_series(%(lo)s, %(hi)s - 1) AS g(i)
CROSS JOIN LATERAL (
    SELECT %(base_ms)s::bigint + g.i::bigint * %(span_ms)s / %(n)s AS ms,
           lpad(to_hex(%(base_ms)s::bigint + g.i::bigint * %(span_ms)s / %(n)s), 12, '0') AS ts,
           md5(g.i::text || %(salt)s) AS r
) AS h
"""
#        state, attempts, not_before, lease_until, claimed_by, created_at, last_error, location, done_at
DELIVERED = """'success', 0, 0.0, NULL, %(claimed_by)s, h.ms / 1000.0, NULL,
       %(topic)s::text || '/' || g.i %% 3 || '/' || g.i / 3, h.ms / 1000.0 + 0.05"""
NEW = "'pending', 0, 0.0, NULL, NULL, h.ms / 1000.0, NULL, NULL, NULL"
# --aged: each message of the history written as the relay writes it, claimed then recorded.
CLAIMED_SQL = (
    "UPDATE {table} SET state = 'sending', lease_until = created_at + 120, claimed_by = %(claimed_by)s "
    "WHERE state = 'pending'"
)
RECORDED_SQL = (
    "UPDATE {table} SET state = 'success', lease_until = NULL, done_at = created_at + 0.05, "
    "location = topic || '/' || (created_at * 1000)::bigint %% 3 || '/' "
    "|| (created_at * 1000)::bigint / 3 %% 1000000000 "
    "WHERE state = 'sending'"
)
AGED_CHUNK = 50_000


def fill_history(outbox: SqlOutbox, topic: str, n: int, *, aged: bool = False) -> None:
    """n delivered rows, then ``VACUUM ANALYZE``. Default: inserted as delivered, packed in
    pages with no free space. ``aged``: inserted new, claimed and recorded by UPDATEs, AGED_CHUNK
    at a time, with a VACUUM whenever the dead rows pass autovacuum's default threshold (20% of
    the table): the free space, the index entries and the page order a relay's own history leaves."""
    span_ms = int(SPAN_S * 1000)
    assert n <= span_ms, "history ids would repeat a millisecond"
    keys = [b"k%d" % i for i in range(KEYS)]
    params: dict[str, Any] = {
        "topic": topic,
        "keys": keys,
        "hashes": [key_hash(k) for k in keys],
        "value": VALUE,
        "claimed_by": f"{socket.gethostname()[:32]}:4242:{hashlib.md5(topic.encode()).hexdigest()[:12]}",
        "n": n,
        "lo": 0,
        "hi": n,
        "base_ms": int(time.time() * 1000) - span_ms - 60_000,
        "span_ms": span_ms,
        "salt": uuid.uuid4().hex,
    }
    table = outbox.table.name
    vacuum = f"VACUUM {table}"
    if n and not aged:
        with outbox.engine.begin() as conn:
            conn.exec_driver_sql(HISTORY_SQL.format(table=table, nkeys=KEYS, fill=DELIVERED), params)
    dead = 0
    for lo in range(0, n if aged else 0, AGED_CHUNK):
        params.update(lo=lo, hi=min(n, lo + AGED_CHUNK))
        with outbox.engine.begin() as conn:
            conn.exec_driver_sql(HISTORY_SQL.format(table=table, nkeys=KEYS, fill=NEW), params)
        for step in (CLAIMED_SQL, RECORDED_SQL):
            with outbox.engine.begin() as conn:
                dead += conn.exec_driver_sql(step.format(table=table), params).rowcount
        if dead > 50 + 0.2 * params["hi"]:  # autovacuum_vacuum_threshold + _scale_factor
            with outbox.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql(vacuum)
            dead = 0
    with outbox.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql(f"VACUUM ANALYZE {table}")


def capture_claim(outbox: SqlOutbox) -> list[tuple[str, Any]]:
    """Run one real claim, recording its statements; put the claimed messages back to pending."""
    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "UPDATE", "(SELECT")):
            seen.append((statement, parameters))

    sa.event.listen(outbox.engine, "before_cursor_execute", record)
    try:
        t = time.perf_counter()
        got = outbox.claim(1000, 60)
        say(f"  one claim of {len(got)} on the large history: {(time.perf_counter() - t) * 1000:.0f} ms")
    finally:
        sa.event.remove(outbox.engine, "before_cursor_execute", record)
    outbox.retry(got)  # attempts unchanged: back to pending exactly as they were
    return seen


_PARAM_LIST = re.compile(r"\((?:%\(\w+\)s(?:::\w+)?, )+%\(\w+\)s(?:::\w+)?\)")
_LONG_ARRAY = re.compile(r"'\{([^}]{80,})\}'")


def shorten(text: str) -> str:
    """Long IN (...) parameter lists and ANY ('{...}') arrays as their length."""
    text = _PARAM_LIST.sub(lambda m: f"(<{m.group(0).count('%(')} values>)", text)
    return _LONG_ARRAY.sub(lambda m: f"'{{<{m.group(1).count(',') + 1} values>}}'", text)


def explain(outbox: SqlOutbox, statements: list[tuple[str, Any]]) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) each statement, all in one transaction rolled back afterwards:
    the claim's ``set_config(..., true)`` holds for its transaction only, so the statements after
    it must share it to be planned as the relay runs them."""
    out = []
    with outbox.engine.connect() as conn, conn.begin() as tx:
        for statement, params in statements:
            plan = conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + statement, params).scalars().all()
            out += ["```sql", shorten(" ".join(statement.split())), "```", "```", *map(shorten, plan), "```", ""]
        tx.rollback()
    return "\n".join(out)


def timed_run(broker_url: str, n: int, history: int, want_plan: bool, aged: bool = False) -> tuple[float, str | None]:
    outbox = SqlOutbox(PG, table=f"bench_{uuid.uuid4().hex[:8]}")
    outbox.create_schema()
    topic = f"g-{uuid.uuid4().hex[:8]}"
    try:
        t = time.perf_counter()
        fill_history(outbox, topic, history, aged=aged)
        say(f"  {history:,} {'aged ' if aged else ''}history rows + VACUUM ANALYZE: {time.perf_counter() - t:.1f} s")
        fill_sql(outbox, topic, n)
        plan = explain(outbox, capture_claim(outbox)) if want_plan else None
        t = time.perf_counter()
        relay_run(outbox, broker_url, n)
        rate = n / (time.perf_counter() - t)
        counts = outbox.stats().counts
        assert counts[State.SUCCESS] == history + n, counts
        say(f"  {rate:,.0f} msg/s")
        return rate, plan
    finally:
        outbox.drop_schema()
        outbox.close()


def backlog_run(broker_url: str, n: int) -> float:
    """msgs/s of one in-process relay draining a fresh table with n pending (filled untimed)."""
    outbox = SqlOutbox(PG, table=f"bench_{uuid.uuid4().hex[:8]}")
    outbox.create_schema()
    try:
        t = time.perf_counter()
        fill_sql(outbox, f"g-{uuid.uuid4().hex[:8]}", n)
        with outbox.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(f"VACUUM ANALYZE {outbox.table.name}")
        say(f"  {n:,} pending + VACUUM ANALYZE: {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        relay_run(outbox, broker_url, n, timeout_s=max(600.0, n / 500))
        rate = n / (time.perf_counter() - t)
        say(f"  {rate:,.0f} msg/s")
        return rate
    finally:
        outbox.drop_schema()
        outbox.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--small-history", type=int, default=0)
    ap.add_argument("--large-history", type=int, default=1_000_000)
    ap.add_argument("--small-pending", type=int, default=20_000)
    ap.add_argument("--large-pending", type=int, default=1_000_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--explain", action="store_true", help="print the claim's plans even when the ratio is met")
    ap.add_argument(
        "--aged",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also the large history as a relay leaves it (written 3 times, VACUUMed as autovacuum "
        "would): ~1 min per rep at 1M",
    )
    args = ap.parse_args()
    n, reps, small, large = args.messages, args.reps, args.small_history, args.large_history
    print(f"machine: {machine()}")
    print(
        f"messages: {n} x 200-byte values, {KEYS} keys, after {small:,} vs {large:,} rows already in success "
        f"(same topic and keys); then {args.small_pending:,} vs {args.large_pending:,} pending; median of {reps}"
    )
    plan: str | None = None
    with EmbeddedBroker() as broker:
        # Interleaved, one of each per repetition: on a shared machine the load drifts over the
        # minutes a block of repetitions takes, and blocks (all baselines first) measured the drift.
        say("warm-up (the broker's first topic and producer, not counted) ...")
        timed_run(broker.url, min(n, 2000), 0, False)
        bases: list[float] = []
        rates: list[float] = []
        aged_rates: list[float] = []
        for rep in range(reps):
            say(f"repetition {rep + 1}: {small:,} rows of history ...")
            bases.append(timed_run(broker.url, n, small, False)[0])
            say(f"repetition {rep + 1}: {large:,} rows of history ...")
            rate, p = timed_run(broker.url, n, large, rep == 0)
            rates.append(rate)
            plan = plan or p
            if args.aged:
                say(f"repetition {rep + 1}: {large:,} rows of aged history ...")
                aged_rates.append(timed_run(broker.url, n, large, False, aged=True)[0])
        base, ours = statistics.median(bases), statistics.median(rates)
        aged = statistics.median(aged_rates) if aged_rates else None
        small_backlogs: list[float] = []
        large_backlogs: list[float] = []
        for rep in range(reps):
            say(f"repetition {rep + 1}: {args.small_pending:,} pending ...")
            small_backlogs.append(backlog_run(broker.url, args.small_pending))
            say(f"repetition {rep + 1}: {args.large_pending:,} pending ...")
            large_backlogs.append(backlog_run(broker.url, args.large_pending))
        small_backlog, large_backlog = statistics.median(small_backlogs), statistics.median(large_backlogs)
    row = Row(
        f"relay in-process, PostgreSQL → Kafka, {n:,} new after {large:,} rows in success",
        ours,
        f"after {small:,} rows in success" if small else "no rows in success",
        base,
        min_ratio=0.8,
    )
    aged_rows = []
    if aged is not None:
        aged_rows.append(
            Row(
                f"relay in-process, PostgreSQL → Kafka, {n:,} new after {large:,} rows in success, each "
                "written as the relay writes it (insert, claim, record; VACUUMed at autovacuum's threshold)",
                aged,
                row.baseline_name,
                base,
                min_ratio=0.8,
            )
        )
    report(
        [
            row,
            *aged_rows,
            Row(
                f"relay in-process, PostgreSQL → Kafka, {args.large_pending:,} pending drained",
                large_backlog,
                f"{args.small_pending:,} pending drained",
                small_backlog,
                min_ratio=0.8,
            ),
        ]
    )
    if plan is not None and (row.ratio < 0.8 or args.explain):
        print()
        print(
            f"The claim's statements on the table with {large:,} success rows and {n} pending "
            f"(EXPLAIN ANALYZE, rolled back):"
        )
        print()
        print(plan)


if __name__ == "__main__":
    main()
