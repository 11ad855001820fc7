"""The PostgreSQL statements of the relay's hot path alone (no broker, no relay process), to
price the candidates of issue 14's "narrow hot path" before building one. Each variant drains
N pending rows (VACUUM ANALYZE before) in batches, the way the relay would, and the figure is
rows/s of the database work alone:

* ``main``: today's path — one transaction per batch recording the last batch (UPDATE →
  ``success``) and claiming the next (blocked keys, candidate scan ``FOR UPDATE SKIP LOCKED``,
  per-key re-check, UPDATE → ``sending``), as ``SqlOutbox.succeed_and_claim`` does it;
* ``hold`` (candidate A, claim without writing): one transaction per batch held open across the
  publish — the same reads and locks, no UPDATE → ``sending``, then UPDATE → ``success``, COMMIT;
* ``lease`` (candidate B, HOT-able lease): as ``main`` but the claim writes only the
  non-indexed ``lease_until``/``claimed_by`` (``state`` stays ``pending``; fillfactor 70), the
  candidate scan skips rows with a live lease;
* ``hold-ledger`` (candidate C with A): as ``hold``, but a delivered row is DELETEd and its id,
  location and time INSERTed into a narrow ledger table (no wide row written again);
* ``*+async``: the same with ``SET LOCAL synchronous_commit = off`` in each transaction;
* ``hand``: the hand-written relay's statements (SKIP LOCKED LIMIT n, DELETE) on its narrow table.

It also reports each variant's HOT updates (``pg_stat_user_tables.n_tup_hot_upd``) and WAL bytes.

Usage: python -m bench.pg_hot_path [--messages N] [--keys K] [--batch B] [--pairs P] [--variants a,b]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from collections import Counter
from typing import Any

import sqlalchemy as sa

from bench.common import PG, VALUE, say
from bench.scale_out import fill
from zeroloss.outbox.base import State
from zeroloss.outbox.sql import SqlOutbox
from zeroloss.outbox.sql.table import message_of

VARIANTS = ("main", "hold", "lease", "hold-ledger", "main+async", "hold+async", "hand")


def _claim_rows(outbox: SqlOutbox, conn: sa.Connection, limit: int, *, lease_free: bool) -> list[Any]:
    """The claim's reads and locks as ``SqlRelaySide._claim`` does them, without its UPDATE."""
    t = outbox.table
    now = outbox.now()
    conn.execute(outbox._claim_plan_pg)
    stmt = outbox.claim_statement(now, limit, tuple(outbox._blocked_keys(conn, now, True)))
    if lease_free:
        stmt = stmt.where(sa.or_(t.c.lease_until.is_(None), t.c.lease_until < now))
    rows = conn.execute(stmt).all()
    keyed = [r for r in rows if r.key_hash is not None]
    blockers: dict[str, str] = {}
    if keyed:
        candidates = {r.id for r in rows}
        per_key = Counter(r.key_hash for r in keyed)
        found = conn.execute(
            outbox._recheck_pg,
            {"keys": list(per_key), "n": [c + 1 for c in per_key.values()], "max": max(r.id for r in keyed)},
        )
        for h, i in found:
            if i not in candidates and (h not in blockers or i < blockers[h]):
                blockers[h] = i
    return [r for r in rows if r.key_hash not in blockers or r.id < blockers[r.key_hash]]


def _drain(variant: str, outbox: SqlOutbox, batch: int) -> int:
    t = outbox.table
    done = 0
    base = variant.split("+")[0]
    sync_off = variant.endswith("+async")
    last: list[str] = []
    while True:
        with outbox.engine.connect() as conn, conn.begin():
            if sync_off:
                conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
            if base == "main":
                if last:
                    outbox._record(conn, {i: "t/0/1" for i in last})
                    done += len(last)
                rows = _claim_rows(outbox, conn, batch, lease_free=False)
                if rows:
                    conn.execute(
                        sa.update(t)
                        .where(outbox._among(t.c.id, [r.id for r in rows]))
                        .values(state=State.SENDING.value, lease_until=outbox.now() + 60, claimed_by="bench")
                    )
                msgs = [message_of(r) for r in rows]
                last = [m.id for m in msgs]
                if not rows:
                    return done
            elif base == "lease":
                if last:
                    outbox._record(conn, {i: "t/0/1" for i in last})
                    done += len(last)
                rows = _claim_rows(outbox, conn, batch, lease_free=True)
                if rows:
                    conn.execute(
                        sa.update(t)
                        .where(outbox._among(t.c.id, [r.id for r in rows]))
                        .values(lease_until=outbox.now() + 60, claimed_by="bench")
                    )
                msgs = [message_of(r) for r in rows]
                last = [m.id for m in msgs]
                if not rows:
                    return done
            else:  # hold: the locks are the claim; the broker would be called here
                rows = _claim_rows(outbox, conn, batch, lease_free=False)
                if not rows:
                    return done
                msgs = [message_of(r) for r in rows]
                if base == "hold-ledger":
                    ids = [m.id for m in msgs]
                    conn.execute(sa.text(f"DELETE FROM {t.name} WHERE id = ANY(:ids)"), {"ids": ids})
                    conn.execute(
                        sa.text(
                            f"INSERT INTO {t.name}_ledger (id, location, done_at) SELECT id, loc, :now "
                            "FROM unnest(CAST(:ids AS text[]), CAST(:locs AS text[])) AS v(id, loc)"
                        ),
                        {"ids": ids, "locs": ["t/0/1"] * len(ids), "now": time.time()},
                    )
                else:
                    outbox._record(conn, {m.id: "t/0/1" for m in msgs})
                done += len(msgs)


def _hand(n: int, keys: int, batch: int) -> float:
    engine = sa.create_engine(PG)
    name = f"hand_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"CREATE TABLE {name} (id bigserial PRIMARY KEY, topic text NOT NULL, key bytea, value bytea NOT NULL)"
        )
        for start in range(0, n, 5000):
            conn.execute(
                sa.text(f"INSERT INTO {name} (topic, key, value) VALUES (:t, :k, :v)"),
                [
                    {"t": "t", "k": (b"k%d" % (i % keys)) if keys else None, "v": VALUE}
                    for i in range(start, min(n, start + 5000))
                ],
            )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql(f"VACUUM ANALYZE {name}")
    try:
        started = time.perf_counter()
        done = 0
        while True:
            with engine.connect() as conn, conn.begin():
                rows = conn.exec_driver_sql(
                    f"SELECT id, topic, key, value FROM {name} ORDER BY id LIMIT {batch} FOR UPDATE SKIP LOCKED"
                ).all()
                if not rows:
                    break
                conn.execute(sa.text(f"DELETE FROM {name} WHERE id = ANY(:ids)"), {"ids": [r.id for r in rows]})
                done += len(rows)
        return done / (time.perf_counter() - started)
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE {name}")
        engine.dispose()


def _wal_lsn(conn: sa.Connection) -> int:
    return int(conn.exec_driver_sql("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").scalar_one())


def run(variant: str, n: int, keys: int, batch: int) -> tuple[float, int, int, int]:
    """rows/s, updates, HOT updates, WAL bytes of one drain of N rows."""
    if variant == "hand":
        return _hand(n, keys, batch), 0, 0, 0
    outbox = SqlOutbox(PG, table=f"hp_{uuid.uuid4().hex[:8]}")
    outbox.create_schema()
    name = outbox.table.name
    try:
        with outbox.engine.begin() as conn:
            if variant.startswith("lease"):
                conn.exec_driver_sql(f"ALTER TABLE {name} SET (fillfactor = 70)")
            if variant.startswith("hold-ledger"):
                conn.exec_driver_sql(
                    f'CREATE TABLE {name}_ledger (id varchar(36) COLLATE "C" PRIMARY KEY, '
                    "location varchar(255), done_at double precision NOT NULL)"
                )
        fill(outbox, f"hp-{name}", n, keys)
        with outbox.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(f"VACUUM ANALYZE {name}")
            wal0 = _wal_lsn(conn)
        started = time.perf_counter()
        done = _drain(variant, outbox, batch)
        elapsed = time.perf_counter() - started
        outbox.engine.dispose()  # a backend reports its table statistics when it closes
        with outbox.engine.connect() as conn:
            wal = _wal_lsn(conn) - wal0  # the whole server's: other helpers' writes count too
            upd, hot = conn.exec_driver_sql(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = %(t)s", {"t": name}
            ).one()
        if done != n:
            raise RuntimeError(f"{variant}: drained {done} of {n}")
        return n / elapsed, int(upd), int(hot), wal
    finally:
        with outbox.engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}_ledger")
        outbox.drop_schema()
        outbox.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--keys", type=int, default=100)
    p.add_argument("--batch", type=int, default=2000)
    p.add_argument("--pairs", type=int, default=3, help="rounds; each round runs every variant once, interleaved")
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args()
    variants = args.variants.split(",")
    rates: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.pairs):
        for v in variants:
            rate, upd, hot, wal = run(v, args.messages, args.keys, args.batch)
            rates[v].append(rate)
            say(
                f"round {r + 1} {v:>11}: {rate:8,.0f} rows/s  updates {upd:,} HOT {hot:,}  "
                f"WAL {wal / 1e6:.0f} MB  load {os.getloadavg()[0]:.1f}"
            )
    base = statistics.median(rates[variants[0]])
    for v in variants:
        m = statistics.median(rates[v])
        each = ", ".join(f"{x:,.0f}" for x in rates[v])
        say(f"{v:>11}: median {m:8,.0f} rows/s = {m / base:.2f}x {variants[0]}  ({each})")


if __name__ == "__main__":
    main()
