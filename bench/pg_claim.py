"""The PostgreSQL claim transaction alone (``SqlOutbox.succeed_and_claim``, no broker), per
statement: client time of each statement, round trips, and at one claim EXPLAIN (ANALYZE,
BUFFERS) of each statement (run in a savepoint rolled back just before the real one).

Two shapes (issue 14): ``drain`` (N pending over K keys, VACUUM ANALYZE, claims of ``--batch``
recording the previous batch, as ``relay --drain`` does) and ``trickle`` (the 1,000 msg/s
latency case: ``--trickle`` new messages committed before each claim, after ``--history``
messages of which at most 10,000 (one claim's cap) are delivered before the VACUUM ANALYZE and the
rest drained by the first claims: the statistics still see a backlog that is gone, as after a burst).

Usage: python -m bench.pg_claim [--mode drain|trickle] [--messages N] [--keys K] [--batch B]
[--explain-at I] [--trickle T] [--history H] [--cycles C]
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections import defaultdict
from typing import Any

import sqlalchemy as sa

from bench.common import PG, VALUE, say
from bench.scale_out import fill
from zeroloss.message import Message
from zeroloss.outbox.base import Delivered
from zeroloss.outbox.sql import SqlOutbox
from zeroloss.sqlurl import make_engine


def kind(statement: str) -> str:
    s = " ".join(statement.split())
    if s.startswith("EXPLAIN") or s.startswith("SAVEPOINT") or s.startswith("ROLLBACK"):
        return "explain"
    if "'success'" in s and s.startswith("UPDATE"):
        return "record"
    if s.startswith("UPDATE"):
        return "to sending"
    if "set_config" in s and "FOR UPDATE" not in s:
        return "plan settings"
    if "LATERAL" in s and "FOR UPDATE" not in s:
        return "re-check"
    if "FOR UPDATE" in s:
        return "candidates"
    if "UNION" in s:
        return "blocked keys"
    return "other: " + s[:60]


class Probe:
    """Times every statement of the outbox's engine by kind; at ``explain`` claim index, EXPLAINs each."""

    def __init__(self, engine: sa.Engine) -> None:
        self.times: dict[str, list[float]] = defaultdict(list)
        self.per_claim: list[int] = []  # statements per claim transaction
        self.plans: dict[str, str] = {}
        self.explain = False
        self._t0 = 0.0
        self._n = 0
        sa.event.listen(engine, "before_cursor_execute", self._before)
        sa.event.listen(engine, "after_cursor_execute", self._after)
        dialect = engine.dialect
        for name, what in (("do_commit", "COMMIT"), ("do_ping", "pre-ping"), ("do_rollback", "rollback")):
            setattr(dialect, name, self._timed(getattr(dialect, name), what))

    def _timed(self, fn: Any, what: str) -> Any:
        def run(*args: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.times[what].append(time.perf_counter() - t)

        return run

    def _before(self, conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        k = kind(statement)
        if self.explain and k != "explain":
            c2 = cursor.connection.cursor()
            c2.execute("SAVEPOINT zl_explain")
            c2.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, params)
            self.plans[k] = "\n".join(r[0] if len(r[0]) < 200 else r[0][:200] + " …" for r in c2.fetchall())
            c2.execute("ROLLBACK TO SAVEPOINT zl_explain")
            c2.close()
        self._n += 1
        self._t0 = time.perf_counter()

    def _after(self, conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        took = time.perf_counter() - self._t0
        self.times[kind(statement)].append(took)
        if self.explain and kind(statement) != "explain":
            self.plans[kind(statement)] += f"\n(the statement itself, just before: {1000 * took:.2f} ms)"

    def claimed(self) -> None:
        self.per_claim.append(self._n)
        self._n = 0


def report(probe: Probe, totals: list[float], wall: float, n: int) -> None:
    say(f"{n} messages in {wall:.2f} s = {n / wall:,.0f} msg/s; {len(totals)} claim transactions")
    say(f"statements per claim transaction: {statistics.median(probe.per_claim)} (median)")
    stmt_sum = 0.0
    say("| part | total s | share | mean ms | p50 ms | p99 ms | count |")
    say("| --- | --- | --- | --- | --- | --- | --- |")
    tx_total = sum(totals)
    for k, xs in sorted(probe.times.items(), key=lambda kv: -sum(kv[1])):
        s = sorted(xs)
        stmt_sum += sum(xs)
        say(
            f"| {k} | {sum(xs):.3f} | {sum(xs) / tx_total:.0%} | {1000 * statistics.mean(xs):.2f} "
            f"| {1000 * s[len(s) // 2]:.2f} | {1000 * s[min(len(s) - 1, int(0.99 * len(s)))]:.2f} | {len(xs)} |"
        )
    rest = tx_total - stmt_sum
    say(
        f"| the rest (BEGIN, checkout, Python) | {rest:.3f} | {rest / tx_total:.0%} | "
        f"{1000 * rest / len(totals):.2f} | | | {len(totals)} |"
    )
    s = sorted(totals)
    say(
        f"claim transaction: mean {1000 * statistics.mean(s):.2f} ms, p50 {1000 * s[len(s) // 2]:.2f}, "
        f"p99 {1000 * s[min(len(s) - 1, int(0.99 * len(s)))]:.2f}"
    )
    for k, plan in probe.plans.items():
        say(f"--- EXPLAIN {k}\n{plan}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("drain", "trickle"), default="drain")
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--keys", type=int, default=100)
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--explain-at", type=int, default=0, help="EXPLAIN the statements of this claim (0: none)")
    ap.add_argument("--trickle", type=int, default=20, help="trickle: new messages before each claim")
    ap.add_argument("--history", type=int, default=20_000, help="trickle: delivered rows before")
    ap.add_argument("--cycles", type=int, default=500, help="trickle: claims")
    ap.add_argument("--prepare-threshold", default="5", help="psycopg's (5, its default; none: never prepare)")
    args = ap.parse_args()
    threshold = None if args.prepare_threshold == "none" else int(args.prepare_threshold)
    engine = make_engine(PG, connect_args={"prepare_threshold": threshold})
    outbox = SqlOutbox(engine, table=f"prof_{uuid.uuid4().hex[:8]}")
    outbox.create_schema()
    try:
        topic = "prof"
        delivered: list[Delivered] = []
        if args.mode == "trickle":
            fill(outbox, topic, args.history, args.keys)
            history = outbox.claim(args.history, 30)
            outbox.succeed([Delivered(m, "prof/0/0") for m in history])
        else:
            fill(outbox, topic, args.messages, args.keys)
        with outbox.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.exec_driver_sql(f"VACUUM ANALYZE {outbox.table.name}")
        probe = Probe(outbox.engine)
        totals: list[float] = []
        n = 0
        i = 0
        start = time.perf_counter()
        while True:
            if args.mode == "trickle":
                if i >= args.cycles:
                    break
                rows = [
                    {"topic": topic, "value": VALUE, "key": b"k%d" % ((i * args.trickle + j) % args.keys)}
                    for j in range(args.trickle)
                ]
                t = time.perf_counter()
                with outbox.engine.begin() as conn:
                    outbox.add_many(conn, rows)
                start += time.perf_counter() - t  # the app's commits are not the relay's time
            i += 1
            probe.explain = i == args.explain_at
            t = time.perf_counter()
            got: list[Message] = outbox.succeed_and_claim(delivered, args.batch, 30)
            totals.append(time.perf_counter() - t)
            probe.explain = False
            probe.claimed()
            n += len(delivered)
            delivered = [Delivered(m, "prof/0/1") for m in got]
            if args.mode == "drain" and not got:
                break
        report(probe, totals, time.perf_counter() - start, n)
    finally:
        outbox.drop_schema()
        outbox.close()
        engine.dispose()


if __name__ == "__main__":
    main()
