"""The inbox in the application's own SQL database (PostgreSQL, MariaDB/MySQL, SQLite).

The consumer opens ``with inbox.transaction() as tx``, calls ``inbox.claim(tx, group, id)`` and,
only when that returns True, runs the handler with ``tx``; the transaction commits the claim and
the handler's effects together. A duplicate delivery finds the claim and skips the handler.
The details: docs/design.md, "inbox/sql.py"."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError

from zeroloss.errors import ConfigError, MessageError, StoreError, TransactionLostError
from zeroloss.inbox.base import MAX_ID_LEN, check_ids
from zeroloss.logs import brief
from zeroloss.sqlurl import engine_of

_MARK = "zeroloss_inbox_open"  # the savepoint SqlInbox.transaction() takes at its start and releases at its end
_TABLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,49}$")


# How PostgreSQL refuses the RELEASE of _release_and_commit: no such savepoint (the transaction
# that took it has ended, this is a new one) or a transaction already aborted by an error.
_RELEASE_FAILED = frozenset({"3B001", "25P02"})


def _sqlstate(exc: DBAPIError) -> str | None:
    """The SQLSTATE of a PostgreSQL error: ``sqlstate`` on psycopg 3, ``pgcode`` on psycopg2."""
    return getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)


_PQTRANS_INERROR = 3  # libpq's PQTRANS_INERROR: psycopg 3 reports an IntEnum, psycopg2 a plain int


def transaction_aborted(tx: Any) -> bool:
    """Whether ``tx`` (a handler's SQLAlchemy connection) is in a transaction the database has
    already failed: PostgreSQL aborts a transaction at its first error, and a COMMIT then rolls
    it back *without raising* — a handler that caught that error would lose its claim and
    effects silently. A look at the driver's own state (no round trip), so it runs after every
    handler and blames the right message of a shared transaction; the savepoint check of
    :meth:`SqlInbox.transaction` covers every dialect and every other way a transaction ends."""
    if not isinstance(tx, sa.Connection) or tx.dialect.name != "postgresql":
        return False
    info = getattr(tx.connection.driver_connection, "info", None)  # psycopg 3 and psycopg2 alike
    status = getattr(info, "transaction_status", None)
    return isinstance(status, int) and status == _PQTRANS_INERROR


def _id_type() -> sa.types.TypeEngine[str]:
    """Case-sensitive, bytewise-compared text (MariaDB's default collation ignores case)."""
    return (
        sa.String(MAX_ID_LEN)
        .with_variant(mysql.VARCHAR(MAX_ID_LEN, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb")
        .with_variant(postgresql.VARCHAR(MAX_ID_LEN, collation="C"), "postgresql")
    )


def inbox_table(name: str, metadata: sa.MetaData | None = None) -> sa.Table:
    if not _TABLE_RE.match(name):
        raise ConfigError(f"invalid inbox table name {name!r}: use 1-50 letters, digits or _")
    return sa.Table(
        name,
        metadata if metadata is not None else sa.MetaData(),
        sa.Column("group_name", _id_type(), primary_key=True),
        sa.Column("message_id", _id_type(), primary_key=True),
        sa.Column("processed_at", sa.Double, nullable=False),
        sa.Index(f"ix_{name}_processed_at", "processed_at"),
    )


def _sqlite_outside_transaction(conn: sa.Connection, cursor: Any, statement: str, *_: Any) -> None:
    """SQLite ends a transaction by itself after some errors (a full disk, an I/O error) or when a
    handler runs ROLLBACK; pysqlite then runs each later statement in autocommit — committed at
    once, outside the claim's transaction, and again when the message is retried. Refuse them
    (a local flag, no round trip): unlike MariaDB and PostgreSQL, a rollback cannot undo them."""
    if (
        conn.get_execution_options().get("zeroloss_inbox")
        and not cursor.connection.in_transaction
        and not statement.startswith("BEGIN")
    ):
        raise TransactionLostError(
            "the inbox transaction has ended (SQLite rolled it back, or the handler ended "
            "it): this statement would commit on its own, so it is refused"
        )


def _ended_before_commit(exc: DBAPIError) -> TransactionLostError:
    """The savepoint taken at the transaction's start could not be released: not this transaction."""
    return TransactionLostError(
        "the inbox transaction had ended before its commit: the database rolled it back after an "
        "error the handler caught (a deadlock, a lock-wait timeout), or the handler committed or "
        f"rolled back itself; nothing of it is committed and the message counts as failed ({exc.orig})"
    )


# In a connection's info while nothing has run since the savepoint SqlInbox.transaction() took at
# its start: a claim sent then may be undone by a rollback to that savepoint alone (_claim_new).
_FRESH = "zeroloss_inbox_fresh"


def _pg_not_fresh(conn: sa.Connection, *_: Any) -> None:
    """before_cursor_execute, commit, rollback: a statement has run since the savepoint, or the
    transaction that took it has ended (a dict lookup, no round trip). Not on an invalidated
    connection (a rollback after a lost connection): its info cannot be read, and the pool clears
    it before the connection is used again."""
    if not conn.invalidated and _FRESH in conn.info:
        del conn.info[_FRESH]


class SqlInbox:
    """The inbox as a table in the handler's own database; effects written with ``tx`` are
    exactly-once."""

    def __init__(
        self,
        url_or_engine: str | sa.Engine,
        *,
        table: str = "zeroloss_inbox",
        clock: Callable[[], float] = time.time,
        lock_timeout_s: float = 10.0,
        idle_in_transaction_timeout_s: float = 60.0,
    ) -> None:
        self.engine, self._owns_engine = engine_of(url_or_engine, "SqlInbox")
        if self.engine.dialect.name == "sqlite" and not event.contains(
            self.engine, "before_cursor_execute", _sqlite_outside_transaction
        ):
            event.listen(self.engine, "before_cursor_execute", _sqlite_outside_transaction)
        self.table = inbox_table(table)
        self.clock = clock
        self.dialect = self.engine.dialect.name
        self._insert = self._insert_statement()
        self._insert_returning: Any = None  # set at the first claim_many: see there
        self._returning_known = False
        self._claim_array = self._array_statement()
        self._insert_array: Any = self._array_insert() if self.dialect == "postgresql" else None  # see _claim_new
        self._session_limits = self._limits_statement(lock_timeout_s, idle_in_transaction_timeout_s)
        # the savepoint check of transaction(); a dialect zeroloss does not know goes without it
        self._marks = self.dialect in ("postgresql", "mysql", "mariadb", "sqlite")
        # PostgreSQL on psycopg 3: the check and the commit in one round trip (_release_and_commit).
        # Not psycopg2: it keeps its own idea of an open transaction and would send a second COMMIT
        # (a server WARNING "there is no transaction in progress" per transaction).
        psycopg3 = self.dialect == "postgresql" and self.engine.dialect.driver == "psycopg"
        self._release_commit = f"RELEASE SAVEPOINT {_MARK}; COMMIT" if psycopg3 else None
        # the flag of _claim_new: cleared by any statement, and by a commit or rollback through
        # SQLAlchemy's API (tx.commit(), tx.rollback(): no statement event; the savepoint goes with it)
        for name in ("before_cursor_execute", "commit", "rollback"):
            if self.dialect == "postgresql" and not event.contains(self.engine, name, _pg_not_fresh):
                event.listen(self.engine, name, _pg_not_fresh)

    def _limits_statement(self, lock_s: float, idle_s: float) -> str | None:
        """Why: a consumer frozen mid-handler (SIGSTOP, a GC pause, a hung host) keeps its
        transaction and the inbox row lock of the message it was on. The group gives the partition
        to another consumer, whose claim of that message would wait on the lock for as long as the
        zombie lives. The lock timeout turns that wait into a retriable StoreError (no attempt
        spent); the idle-in-transaction timeout has the server end the zombie's session, which
        rolls its work back and frees the row. Keep it above your handler's longest pause."""
        if self.dialect == "postgresql":
            return (
                f"SET LOCAL lock_timeout = {int(lock_s * 1000)}; "
                f"SET LOCAL idle_in_transaction_session_timeout = {int(idle_s * 1000)}"
            )
        if self.dialect in ("mysql", "mariadb"):
            return (
                f"SET SESSION innodb_lock_wait_timeout = {max(1, round(lock_s))}, "
                f"wait_timeout = {max(1, round(idle_s))}"
            )
        return None  # SQLite: one writer at a time, with its busy timeout

    def _insert_statement(self) -> Any:
        t = self.table
        if self.dialect == "postgresql":
            stmt: Any = postgresql.insert(t).on_conflict_do_nothing()
        elif self.dialect == "sqlite":
            stmt = sqlite.insert(t).on_conflict_do_nothing()
        elif self.dialect in ("mysql", "mariadb"):
            # IGNORE also turns truncation into a warning; _check() keeps values within the columns.
            stmt = sa.insert(t).prefix_with("IGNORE")
        else:  # any other dialect: a plain INSERT in a SAVEPOINT, IntegrityError = duplicate
            return None
        return stmt.execution_options(preserve_rowcount=True)  # SQLAlchemy keeps it only when asked

    def _array_statement(self) -> Any:
        """PostgreSQL: a run's claims as one short statement over an array of ids. The general
        ``INSERT … VALUES (…), (…) RETURNING`` that SQLAlchemy builds for many rows is a new, long
        text for every run size: psycopg parses each such text again in Python (its cache keeps
        only short ones), about 1 ms per run of 100, a quarter of the consumer's time (bench
        profile in bench/results/notes.md, 2026-12-01); the server parses and plans it again too.
        Built with SQLAlchemy, not as text: an app's Engine may name the table's schema by its
        ``schema_translate_map`` (a schema per tenant), which only compiled statements follow."""
        if self.dialect != "postgresql":
            return None
        insert = self._array_insert()
        return insert.on_conflict_do_nothing().returning(self.table.c.message_id)

    def _array_insert(self) -> Any:
        """PostgreSQL: the rows of a run's claims from one array of ids (see :meth:`_array_statement`)."""
        t = self.table
        ids = sa.func.unnest(sa.bindparam("message_ids", type_=postgresql.ARRAY(sa.Text))).column_valued("m")
        rows = sa.select(sa.bindparam("group_name", type_=sa.Text), ids, sa.bindparam("processed_at", type_=sa.Double))
        return postgresql.insert(t).from_select(["group_name", "message_id", "processed_at"], rows)

    def create_schema(self) -> None:
        try:
            self.table.metadata.create_all(self.engine, checkfirst=True)
        except DBAPIError as exc:
            raise StoreError(f"cannot create the inbox table {self.table.name}: {brief(exc)}", retriable=True) from exc

    def drop_schema(self) -> None:
        self.table.drop(self.engine, checkfirst=True)

    @contextmanager
    def transaction(self) -> Iterator[sa.Connection]:
        """A connection in a transaction: committed when the block ends normally, rolled back when
        it raises. Failures to begin or commit are StoreError (retriable); the block's own
        exceptions pass through untouched. A commit whose outcome is unknown is safe to retry:
        if it did commit, the retry's claim finds the row.

        :class:`~zeroloss.errors.TransactionLostError`, after a rollback, when the block ended
        normally but the transaction it was given had ended under it: the database rolled it back
        after an error the block caught and carried on from (an InnoDB deadlock, PostgreSQL's
        abort, SQLite's rollback on a full disk), or the block committed or
        rolled back by itself. What ran after that ran outside the claim's transaction; committing
        it would apply part of an effect with no claim. The proof is a savepoint taken at the
        start and released before the commit: only the transaction that took it can release it.
        Not seen: an InnoDB lock-wait timeout on a server with ``innodb_rollback_on_timeout=OFF``
        (the default) undoes only its statement, so a handler that swallows it commits the claim
        without that statement's effect — let such errors propagate."""
        try:
            conn = self.engine.connect()
            if self.dialect == "sqlite":  # take the write lock up front: no busy upgrade deadlock
                conn = conn.execution_options(zeroloss_immediate=True, zeroloss_inbox=True)
            trans = conn.begin()
            self._begin(conn)
        except DBAPIError as exc:
            raise StoreError(f"inbox database unavailable: {brief(exc)}", retriable=True) from exc
        try:
            try:
                yield conn
                if self._release_commit is not None:
                    self._release_and_commit(conn)  # trans.commit() below then has nothing left to send
                else:
                    self._still_open(conn)
            except BaseException:
                with suppress(DBAPIError):  # the connection is gone; the server rolls back by itself
                    trans.rollback()
                raise
            try:
                trans.commit()
            except DBAPIError as exc:
                raise StoreError(f"inbox commit failed: {brief(exc)}", retriable=True) from exc
        finally:
            if not conn.invalidated:  # the flag of _begin lives on the pooled connection: not past here
                conn.info.pop(_FRESH, None)
            conn.close()

    def _begin(self, conn: sa.Connection) -> None:
        """The session limits and the savepoint, in one round trip where the driver allows."""
        mark = f"SAVEPOINT {_MARK}" if self._marks else None
        limits = self._session_limits
        if limits is not None and self.dialect in ("mysql", "mariadb"):
            # SET SESSION outlives the transaction: once per connection is enough, which keeps the
            # savepoint free of an extra round trip (PyMySQL sends one statement at a time).
            info = conn.connection.info
            if info.get("zeroloss_inbox_limits") != limits:
                conn.exec_driver_sql(limits)
                info["zeroloss_inbox_limits"] = limits
            limits = None
        statement = "; ".join(x for x in (limits, mark) if x is not None)  # PostgreSQL: SET LOCAL; SAVEPOINT
        if statement:
            conn.exec_driver_sql(statement)
        if self._insert_array is not None and mark is not None:
            conn.info[_FRESH] = True  # nothing has run since the savepoint: _pg_not_fresh clears it

    def _still_open(self, conn: sa.Connection) -> None:
        """Release the savepoint of :meth:`_begin`; only the transaction that took it can."""
        if not self._marks:
            return
        try:
            conn.exec_driver_sql(f"RELEASE SAVEPOINT {_MARK}")
        except DBAPIError as exc:
            if exc.connection_invalidated:  # the connection broke: nothing was committed, an outage
                raise StoreError(f"inbox commit failed, the connection is lost: {brief(exc)}", retriable=True) from exc
            raise _ended_before_commit(exc) from exc

    def _release_and_commit(self, conn: sa.Connection) -> None:
        """PostgreSQL: :meth:`_still_open`'s check and the commit as one simple query. The server
        runs its statements in order and skips the rest at the first error, so the COMMIT runs only
        once the RELEASE proved this is the transaction that took the savepoint — as if sent one
        after the other, one round trip fewer per inbox transaction (bench/results/notes.md,
        branch cons). psycopg reads the outcome from the server's status: the transaction has
        ended, and the driver's own commit that follows sends nothing."""
        assert self._release_commit is not None
        try:
            conn.exec_driver_sql(self._release_commit)
        except DBAPIError as exc:
            if exc.connection_invalidated:  # unknown whether the COMMIT ran: a retry's claim will say
                raise StoreError(f"inbox commit failed, the connection is lost: {brief(exc)}", retriable=True) from exc
            if _sqlstate(exc) in _RELEASE_FAILED:
                raise _ended_before_commit(exc) from exc
            raise StoreError(f"inbox commit failed: {brief(exc)}", retriable=True) from exc

    def claim_many(self, tx: sa.Connection, group: str, message_ids: Sequence[str]) -> set[str]:
        """One statement for a consumer's whole run of messages (``INSERT … RETURNING`` of the
        rows that were new), where the database can say which rows it inserted; else one claim
        each. A repeated id is claimed once (the relay's duplicates can sit side by side)."""
        for mid in message_ids:
            self._check(group, mid)
        # Sorted: every run locks its rows in one order, so two consumers holding the same ids in
        # different orders (duplicate copies at competing consumers) wait for each other instead
        # of deadlocking; the handlers still run in the run's own order.
        ids = sorted(set(message_ids))
        now = self.clock()
        stmt: Any
        params: Any
        if self._claim_array is not None:
            params = {"group_name": group, "message_ids": ids, "processed_at": now}
            if tx.info.pop(_FRESH, False) and self._claim_new(tx, group, params):
                return set(ids)
            stmt = self._claim_array
        else:
            if not self._returning_known:  # only a connected dialect knows (MariaDB: from its version)
                self._returning_known = True
                if self._insert is not None and tx.dialect.insert_returning:
                    self._insert_returning = self._insert.returning(self.table.c.message_id)
            if self._insert_returning is None:
                return {mid for mid in ids if self.claim(tx, group, mid)}
            stmt = self._insert_returning
            params = [{"group_name": group, "message_id": mid, "processed_at": now} for mid in ids]
        try:
            return set(tx.execute(stmt, params).scalars().all())
        except DataError as exc:  # which id? claimed one at a time, the culprit is dead-lettered
            raise MessageError(f"the inbox refused a message id of {len(ids)} for {group}: {exc.orig}") from exc
        except DBAPIError as exc:
            raise StoreError(
                f"inbox claim of {len(ids)} messages failed for {group}: {brief(exc)}", retriable=True
            ) from exc

    def _claim_new(self, tx: sa.Connection, group: str, params: dict[str, Any]) -> bool:
        """PostgreSQL, first in its transaction: claim the run with a plain INSERT, True when every
        id was new — the usual case, and a quarter cheaper for the server than ``ON CONFLICT DO
        NOTHING RETURNING`` (no speculative insertion, no rows back: 2.9 vs 4.0 ms per 500 with the
        commit, bench/results/notes.md, branch cons). A claim that exists already is a unique
        violation: the rollback to the transaction's savepoint, taken just before, undoes the
        insert and nothing else, and False sends the run through the usual statement, which says
        which ids were new. A concurrent claim of an id waits on its row lock as before."""
        try:
            tx.execute(self._insert_array, params)
            return True
        except IntegrityError:
            # Any integrity error, not only a unique violation's SQLSTATE: drivers spell it differently
            # (pg8000 has neither ``sqlstate`` nor ``pgcode``), and the usual statement after the
            # rollback fails again, as a StoreError, for any other cause (a NOT NULL an older table added).
            pass
        except DataError as exc:
            n = len(params["message_ids"])
            raise MessageError(f"the inbox refused a message id of {n} for {group}: {exc.orig}") from exc
        except DBAPIError as exc:
            raise StoreError(f"inbox claim failed for {group}: {brief(exc)}", retriable=True) from exc
        try:
            tx.exec_driver_sql(f"ROLLBACK TO SAVEPOINT {_MARK}")
        except DBAPIError as exc:
            raise StoreError(f"inbox claim failed for {group}: {brief(exc)}", retriable=True) from exc
        return False

    def _check(self, group: str, message_id: str) -> None:
        check_ids(group, message_id)
        if self.dialect in ("mysql", "mariadb"):
            # Their _bin collations pad with spaces: "a " would find the claim of "a" and be
            # skipped as its duplicate. A dead letter instead of a silent loss.
            for what, v in (("group", group), ("message id", message_id)):
                if v.endswith(" "):
                    raise (ConfigError if what == "group" else MessageError)(
                        f"{what} {v!r:.80} ends with a space, which MariaDB/MySQL ignore in comparisons"
                    )

    def claim(self, tx: sa.Connection, group: str, message_id: str) -> bool:
        self._check(group, message_id)
        row = {"group_name": group, "message_id": message_id, "processed_at": self.clock()}
        try:
            if self._insert is not None:
                return bool(tx.execute(self._insert, row).rowcount == 1)
            try:
                with tx.begin_nested():
                    tx.execute(sa.insert(self.table), row)
                return True
            except IntegrityError:
                return False
        except DataError as exc:  # the database cannot store this id (e.g. its encoding lacks a character)
            raise MessageError(f"the inbox refused message id {message_id!r:.80}: {exc.orig}") from exc
        except DBAPIError as exc:
            raise StoreError(f"inbox claim failed for {group}/{message_id}: {brief(exc)}", retriable=True) from exc

    def seen(self, group: str, message_id: str) -> bool:
        t = self.table
        q = sa.select(sa.literal(1)).where(t.c.group_name == group, t.c.message_id == message_id)
        try:
            with self.engine.connect() as conn:
                return conn.execute(q).first() is not None
        except DBAPIError as exc:  # a missing table is the usual one: the message names it
            raise StoreError(
                f"cannot read the inbox table {t.name!r}: {brief(exc)}; check that the URL is the consumer "
                "group's database and the table its inbox (the consumer makes it: consumer.inbox.create_schema())",
                retriable=exc.connection_invalidated,
            ) from exc

    def purge(self, older_than_s: float) -> int:
        cutoff = self.clock() - older_than_s
        with self.engine.begin() as conn:
            return int(conn.execute(sa.delete(self.table).where(self.table.c.processed_at < cutoff)).rowcount)

    def close(self) -> None:
        if self._owns_engine:
            self.engine.dispose()
