"""The SQL outbox: one table in the application's own database (SQLite, PostgreSQL, MariaDB/MySQL);
the whole design (claims, leases, per-key order, LISTEN wake-up) is in docs/design.md ("The SQL
outbox"). ``table.py`` defines the table, ``core.py`` holds the state every side shares,
``schema.py`` creates it, ``writer.py`` is the application's side (``add``), ``relay_side.py`` the
relay's, ``admin.py`` the operators'.

``SqlOutbox`` is all of them as mixins over ``SqlCore``, as ``FileSpool`` is: one object with one
state (engine, clock, claim token), each side's methods in its own module; composition would
add a forwarding method per call to a class users import whole.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from zeroloss.errors import UnknownMessageError
from zeroloss.message import Message
from zeroloss.outbox.base import Delivered, RecoveryReport, Resolver, State, Stats, check_purgeable, id_floor
from zeroloss.outbox.sql.core import BLOCKING, CHUNK, chunks
from zeroloss.outbox.sql.schema import SqlSchema
from zeroloss.outbox.sql.table import key_hash, message_of, outbox_table
from zeroloss.outbox.sql.writer import SqlWriter

__all__ = ["SqlOutbox", "key_hash", "outbox_table"]
log = logging.getLogger("zeroloss.outbox.sql")

_RESENT = "resent: the broker no longer had it (audit --repair)"
_MAX_BLOCKED_PARAMS = 2000  # SQLite: blocked keys passed as parameters; more as one JSON array
_MAX_CLAIM = 10_000  # keeps a claim's bind parameters under SQLite's limit


class SqlOutbox(SqlWriter, SqlSchema):
    """An :class:`~zeroloss.outbox.base.OutboxStore` in one SQL table (SQLAlchemy Core)."""

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
        stmt = sa.select(t).where(t.c.state == State.PENDING.value, t.c.not_before <= now)
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

    def _among(self, column: sa.Column[str], values: Sequence[str]) -> sa.ColumnElement[bool]:
        """``column IN values``; on PostgreSQL ``= ANY(array)``: one parameter and one statement
        text whatever the count (psycopg re-parses a text of 500 placeholders at every call),
        and the planner estimates it like the IN list it stands for."""
        if self._dialect == "postgresql":
            return column == sa.any_(sa.bindparam(None, list(values), type_=postgresql.ARRAY(sa.String)))
        return column.in_(values)

    def _blocked_keys(self, conn: sa.Connection, now: float) -> set[str]:
        """Keys with a message in ``sending``, ``failed`` or waiting out a backoff. Excluding them
        *before* the LIMIT keeps a parked key's backlog from filling every claim window and
        starving the other keys. Each part is a small set reached through an index."""
        t = self.table
        keyed = t.c.key_hash.is_not(None)
        busy = sa.select(t.c.key_hash).where(t.c.state.in_((State.SENDING.value, State.FAILED.value)), keyed)
        backoff = sa.select(t.c.key_hash).where(t.c.state == State.PENDING.value, t.c.not_before > now, keyed)
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
            conn.execute(self._claim_plan_pg)
        rows = conn.execute(self.claim_statement(now, limit, tuple(self._blocked_keys(conn, now)))).all()
        # Re-check after locking: another relay may have claimed (or still hold locked) an
        # earlier message of a candidate's key. The earliest non-candidate row per key that
        # still has to go first blocks that key's candidates from there on.
        keyed = [r for r in rows if r.key_hash is not None]
        blockers: dict[str, str] = {}
        if keyed:
            candidates = {r.id for r in rows}
            if partial:  # without its index, walking each key in id order would walk its history
                per_key = Counter(r.key_hash for r in keyed)
                found = conn.execute(self._recheck_pg, {
                    "keys": list(per_key), "n": [c + 1 for c in per_key.values()],
                    "max": max(r.id for r in keyed)})
            else:
                found = conn.execute(sa.select(t.c.key_hash, t.c.id).where(
                    t.c.key_hash.in_({r.key_hash for r in keyed}),
                    t.c.state.in_(BLOCKING),
                    t.c.id <= max(r.id for r in keyed),
                ))
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
            conn.execute(sa.update(t).where(*where).values(
                state=State.SENDING.value, lease_until=now + lease_s, claimed_by=self._token))
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
                {"t": self.engine.dialect.identifier_preparer.quote(self.table.name), "n": names}).scalar()
            self._partial_indexes = found == len(names)
            if not self._partial_indexes:
                log.warning("outbox table %s lacks the indexes %s (made by an earlier zeroloss): each claim "
                            "walks past the delivered rows; add them, without blocking writes, with: "
                            "zeroloss init --source %s --table %s (a running relay uses them once restarted)",
                            self.table.name, " and ".join(names),
                            self.url, self.table.name)
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
        stmt = (
            sa.update(t)
            .where(t.c.id == sa.bindparam("b_id"), t.c.state != State.SUCCESS.value)
            .values(state=State.SUCCESS.value, done_at=sa.bindparam("b_now"), lease_until=None,
                    location=sa.bindparam("b_loc"))
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
                owned.update(conn.scalars(
                    sa.select(t.c.id)
                    .where(t.c.id.in_(part), t.c.state == State.SENDING.value, t.c.claimed_by == self._token)
                    .with_for_update()
                ))
            if owned:
                conn.execute(
                    sa.update(t).where(t.c.id == sa.bindparam("b_id")).values(
                        state=to.value, attempts=sa.bindparam("b_attempts"),
                        not_before=sa.bindparam("b_not_before"), last_error=sa.bindparam("b_error"),
                        lease_until=None, claimed_by=None,
                    ),
                    [
                        {"b_id": i, "b_attempts": by_id[i].attempts, "b_not_before": by_id[i].not_before,
                         "b_error": by_id[i].last_error}
                        for i in sorted(owned)
                    ],
                )
            return owned

        owned = self._tx(run, f"move messages to {to.value}")
        for mid in sorted(set(by_id) - owned):
            log.warning(
                "not moving message %s to %s: this relay no longer holds it (its lease expired and it "
                "was recovered or claimed again)", mid, to.value,
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
                    sa.update(t).where(t.c.id.in_(part), expired)
                    .values(state=State.PENDING.value, lease_until=None, claimed_by=None)
                ).rowcount
                for part in chunks(ids)
            )

        n = self._tx(run, "recover expired leases")
        if n:
            log.info("returned %d messages with an expired lease to pending", n)
        return RecoveryReport(lease_expired=n)

    def get(self, message_id: str) -> tuple[State, Message]:
        t = self.table
        row = self._tx(lambda c: c.execute(sa.select(t).where(t.c.id == message_id)).first(),
                       "read a message", write=False)
        if row is None:
            raise UnknownMessageError(f"no message with id {message_id!r} in outbox table {t.name!r}")
        return State(row.state), message_of(row)

    def location(self, message_id: str) -> str:
        """Where the broker put a ``success`` message (e.g. ``orders/2/1543``)."""
        t = self.table
        q = sa.select(t.c.location).where(t.c.id == message_id, t.c.state == State.SUCCESS.value)
        row = self._tx(lambda c: c.execute(q).first(), "read a message's location", write=False)
        if row is None:
            raise UnknownMessageError(f"message {message_id} is not in success in outbox table {t.name!r}")
        return str(row.location or "")

    def requeue(self, message_ids: Sequence[str]) -> int:
        ids = list(dict.fromkeys(message_ids))
        t = self.table

        def run(conn: sa.Connection) -> int:
            found: set[str] = set()
            for part in chunks(ids):
                found.update(conn.scalars(
                    sa.select(t.c.id).where(t.c.id.in_(part), t.c.state == State.FAILED.value).with_for_update()
                ))
            missing = [i for i in ids if i not in found]
            if missing:
                raise UnknownMessageError(
                    f"not requeued (nothing was changed): no failed message with id {', '.join(missing)}"
                )
            n = 0
            for part in chunks(ids):
                n += conn.execute(
                    sa.update(t).where(t.c.id.in_(part), t.c.state == State.FAILED.value).values(
                        state=State.PENDING.value, attempts=0, not_before=0.0, lease_until=None, claimed_by=None
                    )
                ).rowcount
            return n

        n = self._tx(run, "requeue failed messages")
        log.debug("requeued %d failed messages: %s", n, ", ".join(ids))
        return n

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

    def purge(self, state: State, message_ids: Sequence[str] | None = None) -> int:
        check_purgeable(state)
        ids = None if message_ids is None else list(dict.fromkeys(message_ids))
        if state not in self.states:
            if ids:
                raise UnknownMessageError(
                    f"the SQL outbox never holds {state.value} messages (only a file spool does), "
                    f"so nothing was purged: {', '.join(ids)}"
                )
            return 0
        t = self.table
        failed = t.c.state == State.FAILED.value

        def run(conn: sa.Connection) -> int:
            if ids is None:
                return int(conn.execute(sa.delete(t).where(failed)).rowcount)
            self._lock_in_state(conn, ids, State.FAILED, "purged")
            return sum(int(conn.execute(sa.delete(t).where(t.c.id.in_(p), failed)).rowcount) for p in chunks(ids))

        n = self._tx(run, "purge failed messages")
        log.debug("purged %d failed messages%s", n, "" if ids is None else ": " + ", ".join(ids))
        return n

    def list_success(
        self, since_s: float | None = None, *, after_id: str | None = None, limit: int = 1000
    ) -> list[Delivered]:
        t = self.table
        stmt = sa.select(t).where(t.c.state == State.SUCCESS.value)
        if since_s is not None:
            stmt = stmt.where(t.c.id >= id_floor(time.time() - since_s))
        if after_id is not None:
            stmt = stmt.where(t.c.id > after_id)
        stmt = stmt.order_by(t.c.id).limit(limit)
        rows = self._tx(lambda c: c.execute(stmt).all(), "list delivered messages", write=False)
        return [Delivered(message_of(r), r.location or "") for r in rows]

    def resend(self, message_ids: Sequence[str]) -> int:
        ids = list(dict.fromkeys(message_ids))
        t = self.table
        success = t.c.state == State.SUCCESS.value

        def run(conn: sa.Connection) -> int:
            self._lock_in_state(conn, ids, State.SUCCESS, "resent")
            return sum(
                int(conn.execute(
                    sa.update(t).where(t.c.id.in_(part), success).values(
                        state=State.PENDING.value, attempts=0, not_before=0.0, lease_until=None, claimed_by=None,
                        location=None, done_at=None, last_error=_RESENT,
                    )
                ).rowcount)
                for part in chunks(ids)
            )

        n = self._tx(run, "resend delivered messages")
        log.debug("%d messages back to pending to be sent again (%s): %s", n, _RESENT, ", ".join(ids))
        return n

    def stats(self) -> Stats:
        t = self.table
        f = t.alias("f")

        def run(conn: sa.Connection) -> Stats:
            now = self._now()
            counts = dict.fromkeys(State, 0)
            ages: dict[State, float] = {}
            unknown: dict[str, int] = {}
            q = sa.select(t.c.state, sa.func.count(), sa.func.min(t.c.created_at)).group_by(t.c.state)
            for state, n, first in conn.execute(q):
                if state in State._value2member_map_:
                    counts[State(state)] = n
                    if first is not None:
                        ages[State(state)] = max(0.0, now - float(first))
                else:
                    unknown[state] = n
            expired = conn.scalar(
                sa.select(sa.func.count()).where(t.c.state == State.SENDING.value, t.c.lease_until < now)
            )
            earlier_failed = sa.exists().where(
                f.c.key_hash == t.c.key_hash, f.c.state == State.FAILED.value, f.c.id < t.c.id
            )
            parked = conn.scalar(
                sa.select(sa.func.count()).select_from(t)
                .where(t.c.state == State.PENDING.value, t.c.key_hash.is_not(None), earlier_failed)
            )
            oldest_error = conn.scalar(
                sa.select(t.c.last_error).where(t.c.state == State.PENDING.value).order_by(t.c.id).limit(1)
            ) if counts[State.PENDING] else None
            extra: dict[str, object] = {"url": self.url, "table": t.name}
            if unknown:
                extra["unknown_states"] = unknown
            return Stats(
                counts=counts,
                oldest_pending_age_s=ages.get(State.PENDING),
                oldest_age_s=ages,
                expired_leases=int(expired or 0),
                parked=int(parked or 0),
                oldest_pending_error=oldest_error or None,
                extra=extra,
            )

        return self._tx(run, "read outbox statistics", write=False)

    def close(self) -> None:
        self._stop_listening()
        if self._owns_engine:
            self.engine.dispose()

    def _lock_in_state(self, conn: sa.Connection, ids: Sequence[str], state: State, verb: str) -> None:
        """Lock the rows of ``ids``; UnknownMessageError naming those not in ``state``."""
        t = self.table
        found: set[str] = set()
        for part in chunks(ids):
            found.update(conn.scalars(
                sa.select(t.c.id).where(t.c.id.in_(part), t.c.state == state.value).with_for_update()
            ))
        missing = [i for i in ids if i not in found]
        if missing:
            raise UnknownMessageError(
                f"not {verb} (nothing was changed): no {state.value} message with id {', '.join(missing)}"
            )

    def list(self, state: State, limit: int = 100) -> list[Message]:  # last: shadows builtins.list
        t = self.table
        rows = self._tx(
            lambda c: c.execute(
                sa.select(t).where(t.c.state == State(state).value).order_by(t.c.id).limit(limit)
            ).all(),
            "list messages", write=False,
        )
        return [message_of(r) for r in rows]
