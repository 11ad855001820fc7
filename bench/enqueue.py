"""Enqueue overhead: what writing the message costs the app's transaction.

* SQL: a business INSERT + ``outbox.add`` in one transaction vs the business INSERT alone
  (PostgreSQL, MariaDB, SQLite), one order per transaction as an app writes them.
* Spool: ``FileSpool`` transaction (write + fsync + promote + directory fsyncs) vs a bare
  write+fsync of the same bytes; one writer, and 16 concurrent writers (group commit).

Usage: python -m bench.enqueue [--txns N] [--reps R]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import uuid
from pathlib import Path

import sqlalchemy as sa

from bench.common import MARIADB, PG, VALUE, Row, machine, median_rate, report, say
from zeroloss.message import encode, new_message
from zeroloss.outbox.spool import FileSpool
from zeroloss.outbox.sql import SqlOutbox

MAX_TIME_RATIO = 1.3


def sql_pair(url: str, n: int, reps: int) -> tuple[float, float]:
    outbox = SqlOutbox(url, table=f"bench_{uuid.uuid4().hex[:8]}")
    outbox.create_schema()
    md = sa.MetaData()
    orders = sa.Table(
        f"bench_orders_{uuid.uuid4().hex[:8]}",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("body", sa.LargeBinary),
    )
    md.create_all(outbox.engine)
    try:

        def insert_only() -> int:
            for _ in range(n):
                with outbox.engine.begin() as conn:
                    conn.execute(orders.insert().values(body=VALUE))
            return n

        def insert_and_add() -> int:
            for _ in range(n):
                with outbox.engine.begin() as conn:
                    conn.execute(orders.insert().values(body=VALUE))
                    outbox.add(conn, topic="orders", value=VALUE, key=b"k")
            return n

        base = median_rate(insert_only, reps)
        ours = median_rate(insert_and_add, reps)
    finally:
        md.drop_all(outbox.engine)
        outbox.drop_schema()
        outbox.close()
    return ours, base


def overhead_row(db: str, ours: float, base: float) -> Row:
    """The issue's target is on time per transaction (≤ 1.3x the INSERT alone's): on rates, ≥ 1/1.3."""
    return Row(
        f"INSERT + outbox.add, {db}",
        ours,
        "INSERT alone",
        base,
        "txn/s",
        target=f"≤ {MAX_TIME_RATIO}x the time (≥ {1 / MAX_TIME_RATIO:.2f}x the rate)",
        min_ratio=1 / MAX_TIME_RATIO,
    )


def spool_pair(root: Path, n: int, reps: int, writers: int) -> tuple[float, float]:
    data = encode(new_message("orders", VALUE, key=b"k"))

    def run_threads(work: object) -> int:
        per = n // writers
        threads = [threading.Thread(target=work, args=(per,)) for _ in range(writers)]  # type: ignore[arg-type]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return per * writers

    bare_dir = root / f"bare-{uuid.uuid4().hex[:6]}"
    bare_dir.mkdir()

    def bare(per: int) -> None:
        for _ in range(per):
            fd = os.open(bare_dir / uuid.uuid4().hex, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)

    spool = FileSpool(root / f"spool-{uuid.uuid4().hex[:6]}")

    def ours(per: int) -> None:
        for _ in range(per):
            with spool.transaction() as tx:
                tx.add(topic="orders", value=VALUE, key=b"k")

    base = median_rate(lambda: run_threads(bare), reps)
    mine = median_rate(lambda: run_threads(ours), reps)
    return mine, base


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--txns", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    n, reps = args.txns, args.reps
    print(f"machine: {machine()}")
    print(f"transactions: {n}, one 200-byte message each, median of {reps}")
    rows: list[Row] = []
    say("PostgreSQL ...")
    ours, base = sql_pair(PG, n, reps)
    rows.append(overhead_row("PostgreSQL", ours, base))
    say("MariaDB ...")
    ours, base = sql_pair(MARIADB, n, reps)
    rows.append(overhead_row("MariaDB", ours, base))
    with tempfile.TemporaryDirectory(dir=os.environ.get("ZEROLOSS_BENCH_DIR")) as tmp:
        say("SQLite ...")
        ours, base = sql_pair(f"sqlite:///{Path(tmp) / 'bench.db'}", n, reps)
        rows.append(overhead_row("SQLite", ours, base))
        say("spool, 1 writer ...")
        one, bare_one = spool_pair(Path(tmp), n, reps, 1)
        rows.append(Row("FileSpool add, 1 writer", one, "bare write+fsync", bare_one, "msg/s"))
        say("spool, 16 writers ...")
        many, bare_many = spool_pair(Path(tmp), n, reps, 16)
        rows.append(
            Row("FileSpool add, 16 writers", many, "bare write+fsync, 16 writers", bare_many, "msg/s", min_ratio=0.7)
        )
        rows.append(Row("FileSpool 16 writers vs 1 writer", many, "FileSpool 1 writer", one, "msg/s", min_ratio=5))
        # The filesystem's own ceiling: how far 16 concurrent bare fsyncs get over one.
        rows.append(
            Row(
                "bare write+fsync, 16 writers vs 1",
                bare_many,
                "bare write+fsync, 1 writer",
                bare_one,
                "msg/s",
                "(report: the disk's ceiling)",
            )
        )
    report(rows)


if __name__ == "__main__":
    main()
