"""The relay's side of the SQL outbox (the :class:`~zeroloss.outbox.base.OutboxStore` protocol):
claim under a lease (``FOR UPDATE SKIP LOCKED``; SQLite: ``BEGIN IMMEDIATE``) keeping per-key
order, extend, succeed (and claim the next in the same transaction), retry, fail, recover,
purge_success; on PostgreSQL an idle relay waits on LISTEN. Details: docs/design.md."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from zeroloss.message import Message
from zeroloss.outbox.base import Delivered, RecoveryReport, Resolver, State
from zeroloss.outbox.sql.core import BLOCKING, CHUNK, SqlCore, chunks
from zeroloss.outbox.sql.table import message_of, messages_of

log = logging.getLogger("zeroloss.outbox.sql")

_MAX_BLOCKED_PARAMS = 2000  # SQLite: blocked keys passed as parameters; more as one JSON array
_MAX_CLAIM = 10_000  # keeps a claim's bind parameters under SQLite's limit


class SqlRelaySide(SqlCore):
    """What the relay calls; retry/fail/extend touch only rows this instance still owns."""

    _claim_in_one_statement = True
    """PostgreSQL with the partial indexes: claim in one statement (``_claim_pg``). False: the
    statements of the versions before it (blocked keys, candidates, re-check, UPDATE), which relays
    not yet upgraded still run beside new ones; the tests run both shapes together."""

    def wait_for_work(self, timeout_s: float, interrupt: threading.Event) -> None:
        """Return when a message may be waiting: on PostgreSQL at the first NOTIFY of a committed
        INSERT (or after ``timeout_s``); elsewhere after ``timeout_s``. ``interrupt`` cuts the
        wait short where the database cannot (the relay's stop)."""
        if self._dialect != "postgresql" or not self._can_listen or interrupt.is_set():
            interrupt.wait(timeout_s)
            return
        try:
            if self._listener is None:
                self._listener = self.engine.raw_connection()
                driver = self._listener.driver_connection
                if not hasattr(driver, "notifies"):  # not psycopg 3: no way to wait; poll for good
                    self._can_listen = False
                    self._stop_listening()
                    interrupt.wait(timeout_s)
                    return
                driver.autocommit = True
                driver.execute(f'LISTEN "{self.channel}"')
            for _ in self._listener.driver_connection.notifies(timeout=timeout_s, stop_after=1):
                return
        except Exception as exc:  # no LISTEN (a lost connection, another driver): poll instead
            log.warning("outbox %s: LISTEN %s failed (%s); polling", self.table.name, self.channel, exc)
            self._stop_listening()
            interrupt.wait(timeout_s)

    def _stop_listening(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(Exception):
                listener.invalidate()  # never back into the pool with LISTEN on it

    def claim_statement(self, now: float, limit: int, blocked: Sequence[str] = ()) -> sa.Select[Any]:
        """The candidate scan: due pending rows whose key is not ``blocked``, oldest first,
        skipping rows other relays lock."""
        t = self.table
        due: sa.ColumnElement[bool] = t.c.not_before <= now
        if self._dialect == "sqlite":
            # `+ 0` keeps the backoff index out of this scan: SQLite read every due pending row
            # through ix_wait and sorted them all for each claim; through ix_claim they come in id
            # order and the LIMIT stops the walk.
            due = (t.c.not_before + 0) <= now
        stmt = self._force_index(sa.select(t).where(t.c.state == State.PENDING.value, due), "claim")
        keys = sorted(blocked)
        if keys and self._dialect == "postgresql":
            # One array parameter, however many keys (a list of parameters stops at 65,535);
            # PostgreSQL plans NOT IN (list) as <> ALL(array) anyway.
            arr = sa.bindparam("blocked_keys", keys, type_=postgresql.ARRAY(sa.String))
            stmt = stmt.where(sa.or_(t.c.key_hash.is_(None), t.c.key_hash != sa.all_(arr)))
        elif len(keys) > _MAX_BLOCKED_PARAMS and self._dialect == "sqlite":
            # One JSON parameter read by json_each: no bind limit (32,766 in default builds).
            listed = sa.func.json_each(sa.bindparam("blocked_keys", json.dumps(keys))).table_valued("value")
            stmt = stmt.where(sa.or_(t.c.key_hash.is_(None), t.c.key_hash.not_in(sa.select(listed.c.value))))
        else:  # MariaDB: PyMySQL binds on the client; the statement must fit max_allowed_packet
            for part in chunks(keys):
                stmt = stmt.where(sa.or_(t.c.key_hash.is_(None), t.c.key_hash.not_in(part)))
        stmt = stmt.order_by(t.c.id).limit(limit)
        return stmt if self._dialect == "sqlite" else stmt.with_for_update(skip_locked=True)

    def _force_index(self, stmt: sa.Select[Any], suffix: str) -> sa.Select[Any]:
        """MariaDB/MySQL: read through ``ix_<table>_<suffix>`` (if the table has it). By its
        statistics the optimizer walked the primary key from the oldest row for the claim and
        the re-check, and the whole table for the blocked keys: every delivered row, at each claim."""
        if self._dialect != "mysql":
            return stmt
        name = f"ix_{self.table.name}_{suffix}"
        if name not in (self._index_names or ()):
            return stmt
        return stmt.with_hint(self.table, f"FORCE INDEX ({name})", "mysql").with_hint(
            self.table, f"FORCE INDEX ({name})", "mariadb"
        )

    def _read_index_names(self, conn: sa.Connection) -> None:
        """MariaDB/MySQL: the table's index names, read at the first claim that finds the table
        (FORCE INDEX naming a missing index is an error; a missing table is the claim's to report)."""
        if self._dialect != "mysql" or self._index_names:
            return
        self._index_names = frozenset(
            conn.scalars(
                sa.text(
                    "SELECT DISTINCT index_name FROM information_schema.statistics "
                    "WHERE table_schema = DATABASE() AND table_name = :t"
                ),
                {"t": self.table.name},
            )
        )

    def _among(self, column: sa.Column[str], values: Sequence[str]) -> sa.ColumnElement[bool]:
        """``column IN values``; on PostgreSQL ``= ANY(array)``: one parameter and one statement
        text whatever the count (psycopg re-parses a text of 500 placeholders at every call),
        and the planner estimates it like the IN list it stands for."""
        if self._dialect == "postgresql":
            return column == sa.any_(sa.bindparam(None, list(values), type_=postgresql.ARRAY(sa.String)))
        return column.in_(values)

    def _blocked_keys(self, conn: sa.Connection, now: float, partial: bool = False) -> set[str]:
        """Keys with a message in ``sending``, ``failed`` or waiting out a backoff. Excluding them
        *before* the LIMIT keeps a parked key's backlog from filling every claim window and
        starving the other keys. Each part is a small set reached through an index (``partial``:
        PostgreSQL's ``wait`` index, in a transaction with sorting off)."""
        if partial:
            return set(conn.scalars(self._blocked_pg, {"now": now}))
        t = self.table
        keyed = t.c.key_hash.is_not(None)
        busy = self._force_index(
            sa.select(t.c.key_hash).where(t.c.state.in_((State.SENDING.value, State.FAILED.value)), keyed), "wait"
        )
        backoff = self._force_index(
            sa.select(t.c.key_hash).where(t.c.state == State.PENDING.value, t.c.not_before > now, keyed), "wait"
        )
        return set(conn.scalars(sa.union(busy, backoff)))

    def claim(self, limit: int, lease_s: float) -> list[Message]:
        if limit <= 0:
            return []
        got = self._tx(lambda conn: self._claim(conn, min(limit, _MAX_CLAIM), lease_s), "claim messages")
        self._log_claimed(got)
        return got

    def succeed_and_claim(self, delivered: Sequence[Delivered], limit: int, lease_s: float) -> list[Message]:
        where = {d.message.id: d.location[:255] for d in delivered}

        def run(conn: sa.Connection) -> list[Message]:
            if where:
                self._record(conn, where)
            return self._claim(conn, min(limit, _MAX_CLAIM), lease_s) if limit > 0 else []

        got = self._tx(run, "mark messages delivered and claim the next")
        self._log_claimed(got)
        return got

    def _log_claimed(self, got: Sequence[Message]) -> None:
        if got:
            log.debug("claimed %d messages (%s .. %s) as %s", len(got), got[0].id, got[-1].id, self._token)

    def _claim(self, conn: sa.Connection, limit: int, lease_s: float) -> list[Message]:
        """The claim's statements, in the caller's transaction."""
        t = self.table
        now = self._now()
        partial = self._dialect == "postgresql" and self._has_partial_indexes(conn)
        if partial:
            # Walk the indexes in id order, whatever the statistics say. A backlog that just
            # arrived (not analyzed yet: the planner believes the table is nearly empty) was
            # planned as a bitmap scan of every pending row, sorted on disk, for each claim.
            one = self._claim_in_one_statement and (conn.dialect.server_version_info or (0,)) >= (13,)
            conn.execute(self._claim_plan_one_pg if one else self._claim_plan_pg)
            if one:  # hash_mem_multiplier (the blocked keys' hash) is PostgreSQL 13's
                claimed = conn.exec_driver_sql(
                    self._claim_pg, {"now": now, "limit": limit, "until": now + lease_s, "token": self._token}
                ).all()
                return messages_of(sorted(claimed, key=lambda r: r[0]))  # id order: a hash join may reorder
        self._read_index_names(conn)
        rows = conn.execute(self.claim_statement(now, limit, tuple(self._blocked_keys(conn, now, partial)))).all()
        # Re-check after locking: another relay may have claimed (or still hold locked) an
        # earlier message of a candidate's key. The earliest non-candidate row per key that
        # still has to go first blocks that key's candidates from there on.
        keyed = [r for r in rows if r.key_hash is not None]
        blockers: dict[str, str] = {}
        if keyed:
            candidates = {r.id for r in rows}
            if partial:  # without its index, walking each key in id order would walk its history
                per_key = Counter(r.key_hash for r in keyed)
                found = conn.execute(
                    self._recheck_pg,
                    {"keys": list(per_key), "n": [c + 1 for c in per_key.values()], "max": max(r.id for r in keyed)},
                )
            else:
                found = conn.execute(
                    self._force_index(
                        sa.select(t.c.key_hash, t.c.id).where(
                            t.c.key_hash.in_({r.key_hash for r in keyed}),
                            t.c.state.in_(BLOCKING),
                            t.c.id <= max(r.id for r in keyed),
                        ),
                        # (state, id): the undelivered rows up to the last candidate; through
                        # (key_hash, id) it walked each key's whole history (58 vs 5 ms at 50k).
                        "claim",
                    )
                )
            for h, i in found:
                if i not in candidates and (h not in blockers or i < blockers[h]):
                    blockers[h] = i
        chosen = [r for r in rows if r.key_hash not in blockers or r.id < blockers[r.key_hash]]
        # The rows are ours (locked above, still pending): by primary key alone (PostgreSQL's
        # planner took a state condition for a scan of the whole backlog).
        for part in chunks([r.id for r in chosen], _MAX_CLAIM if self._dialect == "postgresql" else CHUNK):
            where = [self._among(t.c.id, part)]
            if self._dialect != "postgresql":
                where.append(t.c.state == State.PENDING.value)
            conn.execute(
                sa.update(t)
                .where(*where)
                .values(state=State.SENDING.value, lease_until=now + lease_s, claimed_by=self._token)
            )
        return [message_of(r) for r in chosen]

    def _has_partial_indexes(self, conn: sa.Connection) -> bool:
        """Does the table have PostgreSQL's partial indexes (checked once)? A table made by an
        earlier version has not until ``zeroloss init`` adds them; until then claims run as they
        did, and the relay says how to make them cheaper."""
        if self._partial_indexes is None:
            names = [f"ix_{self.table.name}_{s}" for s in ("pending", "live")]
            found = conn.exec_driver_sql(
                "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "WHERE i.indrelid = to_regclass(%(t)s) AND c.relname = ANY(%(n)s) AND i.indisvalid",
                {"t": self.engine.dialect.identifier_preparer.quote(self.table.name), "n": names},
            ).scalar()
            self._partial_indexes = found == len(names)
            if not self._partial_indexes:
                log.warning(
                    "outbox table %s lacks the indexes %s (made by an earlier zeroloss): each claim "
                    "walks past the delivered rows; add them, without blocking writes, with: "
                    "zeroloss init --source %s --table %s (a running relay uses them once restarted)",
                    self.table.name,
                    " and ".join(names),
                    self.url,
                    self.table.name,
                )
        return self._partial_indexes

    def extend(self, messages: Sequence[Message], lease_s: float) -> int:
        t = self.table
        ids = sorted(m.id for m in messages)

        def run(conn: sa.Connection) -> int:
            until = self._now() + lease_s
            return sum(
                conn.execute(
                    sa.update(t)
                    .where(t.c.id.in_(part), t.c.state == State.SENDING.value, t.c.claimed_by == self._token)
                    .values(lease_until=until)
                ).rowcount
                for part in chunks(ids)
            )

        return self._tx(run, "renew leases") if ids else 0

    def succeed(self, delivered: Sequence[Delivered]) -> None:
        where = {d.message.id: d.location[:255] for d in delivered}
        if where:
            self._tx(lambda conn: self._record(conn, where), "mark messages delivered")

    def _record(self, conn: sa.Connection, where: Mapping[str, str]) -> None:
        """id → location: ``success``, in the caller's transaction."""
        t = self.table
        now = self._now()
        ids = sorted(where)
        if self._dialect == "postgresql":  # one statement over two arrays: ~2x an executemany
            conn.execute(self._succeed_pg, {"ids": ids, "locs": [where[i] for i in ids], "now": now})
            return
        if self._dialect == "mysql":
            # One statement over one JSON parameter: PyMySQL's executemany sends an UPDATE per row
            # (53% of a MariaDB relay's database time at 1,000 a batch: bench/results/notes.md).
            pairs = json.dumps([[i, where[i]] for i in ids])
            conn.execute(self._succeed_mysql, {"pairs": pairs, "now": now})
            return
        stmt = (
            sa.update(t)
            .where(t.c.id == sa.bindparam("b_id"), t.c.state != State.SUCCESS.value)
            .values(
                state=State.SUCCESS.value,
                done_at=sa.bindparam("b_now"),
                lease_until=None,
                location=sa.bindparam("b_loc"),
            )
        )
        # One executemany (pipelined by the driver) instead of a CASE with a branch per id.
        conn.execute(stmt, [{"b_id": i, "b_loc": where[i], "b_now": now} for i in ids])

    def retry(self, messages: Sequence[Message]) -> None:
        self._release(messages, State.PENDING)

    def fail(self, messages: Sequence[Message]) -> None:
        self._release(messages, State.FAILED)

    def _release(self, messages: Sequence[Message], to: State) -> None:
        """``sending`` → ``to`` for the rows this instance still owns; others are left alone."""
        by_id = {m.id: m for m in messages}
        if not by_id:
            return
        t = self.table

        def run(conn: sa.Connection) -> set[str]:
            owned: set[str] = set()
            for part in chunks(sorted(by_id)):
                owned.update(
                    conn.scalars(
                        sa.select(t.c.id)
                        .where(t.c.id.in_(part), t.c.state == State.SENDING.value, t.c.claimed_by == self._token)
                        .with_for_update()
                    )
                )
            if owned:
                conn.execute(
                    sa.update(t)
                    .where(t.c.id == sa.bindparam("b_id"))
                    .values(
                        state=to.value,
                        attempts=sa.bindparam("b_attempts"),
                        not_before=sa.bindparam("b_not_before"),
                        last_error=sa.bindparam("b_error"),
                        lease_until=None,
                        claimed_by=None,
                    ),
                    [
                        {
                            "b_id": i,
                            "b_attempts": by_id[i].attempts,
                            "b_not_before": by_id[i].not_before,
                            "b_error": by_id[i].last_error,
                        }
                        for i in sorted(owned)
                    ],
                )
            return owned

        owned = self._tx(run, f"move messages to {to.value}")
        for mid in sorted(set(by_id) - owned):
            log.warning(
                "not moving message %s to %s: this relay no longer holds it (its lease expired and it "
                "was recovered or claimed again)",
                mid,
                to.value,
            )

    def recover(self, resolver: Resolver | None = None) -> RecoveryReport:
        """Expired leases go back to ``pending``. ``resolver`` is unused: SQL has no ``tmp`` state."""
        t = self.table

        def run(conn: sa.Connection) -> int:
            # Find without locking, then update by primary key in id order (re-checking the lease):
            # the same lock order as succeed/retry, so relays do not deadlock each other.
            now = self._now()
            expired = sa.and_(t.c.state == State.SENDING.value, t.c.lease_until < now)
            ids = sorted(conn.scalars(sa.select(t.c.id).where(expired)))
            return sum(
                conn.execute(
                    sa.update(t)
                    .where(t.c.id.in_(part), expired)
                    .values(state=State.PENDING.value, lease_until=None, claimed_by=None)
                ).rowcount
                for part in chunks(ids)
            )

        n = self._tx(run, "recover expired leases")
        if n:
            log.info("returned %d messages with an expired lease to pending", n)
        return RecoveryReport(lease_expired=n)

    def purge_success(self, older_than_s: float, *, chunk: int = 10_000) -> int:
        """Delete ``success`` rows older than ``older_than_s``, ``chunk`` rows per transaction."""
        t = self.table
        cutoff = self._now() - older_than_s

        def run(conn: sa.Connection) -> tuple[int, int]:
            ids = conn.scalars(
                sa.select(t.c.id).where(t.c.state == State.SUCCESS.value, t.c.done_at <= cutoff).limit(chunk)
            ).all()
            if not ids:
                return 0, 0
            res = conn.execute(sa.delete(t).where(t.c.id.in_(ids), t.c.state == State.SUCCESS.value))
            return len(ids), res.rowcount

        total = 0
        while True:
            seen, deleted = self._tx(run, "purge delivered messages")
            total += deleted
            if seen < chunk:
                break
        if total:
            log.info("purged %d delivered messages older than %.0f s", total, older_than_s)
        return total
