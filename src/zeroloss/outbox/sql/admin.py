"""The operators' side of the SQL outbox (the :class:`~zeroloss.outbox.base.OutboxAdmin`
protocol): get, list, location, requeue, purge, list_success, resend, stats; each in a
transaction of its own, safe beside running relays."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import sqlalchemy as sa

from zeroloss.errors import UnknownMessageError
from zeroloss.message import Message
from zeroloss.outbox.base import Delivered, State, Stats, check_purgeable, id_floor
from zeroloss.outbox.sql.core import SqlCore, chunks
from zeroloss.outbox.sql.table import message_of

log = logging.getLogger("zeroloss.outbox.sql")

_RESENT = "resent: the broker no longer had it (audit --repair)"


class SqlAdmin(SqlCore):
    """What operators' commands call (zeroloss status, dlq, audit --repair, purge)."""

    def get(self, message_id: str) -> tuple[State, Message]:
        t = self.table
        row = self._tx(
            lambda c: c.execute(sa.select(t).where(t.c.id == message_id)).first(), "read a message", write=False
        )
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
                found.update(
                    conn.scalars(
                        sa.select(t.c.id).where(t.c.id.in_(part), t.c.state == State.FAILED.value).with_for_update()
                    )
                )
            missing = [i for i in ids if i not in found]
            if missing:
                raise UnknownMessageError(
                    f"not requeued (nothing was changed): no failed message with id {', '.join(missing)}"
                )
            n = 0
            for part in chunks(ids):
                n += conn.execute(
                    sa.update(t)
                    .where(t.c.id.in_(part), t.c.state == State.FAILED.value)
                    .values(state=State.PENDING.value, attempts=0, not_before=0.0, lease_until=None, claimed_by=None)
                ).rowcount
            return n

        n = self._tx(run, "requeue failed messages")
        log.debug("requeued %d failed messages: %s", n, ", ".join(ids))
        return n

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
                int(
                    conn.execute(
                        sa.update(t)
                        .where(t.c.id.in_(part), success)
                        .values(
                            state=State.PENDING.value,
                            attempts=0,
                            not_before=0.0,
                            lease_until=None,
                            claimed_by=None,
                            location=None,
                            done_at=None,
                            last_error=_RESENT,
                        )
                    ).rowcount
                )
                for part in chunks(ids)
            )

        n = self._tx(run, "resend delivered messages")
        log.debug("%d messages back to pending to be sent again (%s): %s", n, _RESENT, ", ".join(ids))
        return n

    def stats(self, *, delivered: bool = True) -> Stats:
        t = self.table
        f = t.alias("f")

        def run(conn: sa.Connection) -> Stats:
            now = self._now()
            counts = dict.fromkeys(State, 0)
            ages: dict[State, float] = {}
            unknown: dict[str, int] = {}
            q = sa.select(t.c.state, sa.func.count(), sa.func.min(t.c.created_at)).group_by(t.c.state)
            if not delivered:  # the backlog only, through its partial indexes on PostgreSQL
                q = q.where(t.c.state.in_([s.value for s in (State.PENDING, State.SENDING, State.FAILED)]))
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
                sa.select(sa.func.count())
                .select_from(t)
                .where(t.c.state == State.PENDING.value, t.c.key_hash.is_not(None), earlier_failed)
            )
            oldest_error = (
                conn.scalar(sa.select(t.c.last_error).where(t.c.state == State.PENDING.value).order_by(t.c.id).limit(1))
                if counts[State.PENDING]
                else None
            )
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

    def _lock_in_state(self, conn: sa.Connection, ids: Sequence[str], state: State, verb: str) -> None:
        """Lock the rows of ``ids``; UnknownMessageError naming those not in ``state``."""
        t = self.table
        found: set[str] = set()
        for part in chunks(ids):
            found.update(
                conn.scalars(sa.select(t.c.id).where(t.c.id.in_(part), t.c.state == state.value).with_for_update())
            )
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
            "list messages",
            write=False,
        )
        return [message_of(r) for r in rows]
