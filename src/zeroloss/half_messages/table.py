"""The recommended check-back source of RocketMQ half messages: :class:`HalfMessageTable`, a row in
the app's database written in the local transaction, and the check-back's fence (a ``rolled_back``
row inserted in its own transaction, so ROLLBACK is only answered for a transaction that can no
longer commit). How the fence works: docs/design.md, "half_messages"."""

from __future__ import annotations

import enum
import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.exc import DBAPIError, IntegrityError

from zeroloss.errors import ConfigError, StoreError, TransactionLostError
from zeroloss.inbox import transaction_aborted
from zeroloss.message import id_time
from zeroloss.outbox.base import id_floor
from zeroloss.sqlurl import SQLITE_BUSY_TIMEOUT_MS, configure_sqlite, make_engine

log = logging.getLogger("zeroloss.half_messages")  # one logger name for the feature, as before the split
T = TypeVar("T")

COMMITTED = "committed"
ROLLED_BACK = "rolled_back"
_TABLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,49}$")
_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
# A row younger than retention minus this margin is surely still in the table (purge keeps it);
# past it, "no row" may mean "purged", so the check-back answers UNKNOWN rather than fence.
_HORIZON_MARGIN_S = 3600.0
MIN_RETENTION = timedelta(hours=2)


class Resolution(enum.Enum):
    """What the local transaction of a half message came to, as far as the check source knows."""

    COMMIT = "commit"
    ROLLBACK = "rollback"
    UNKNOWN = "unknown"


def half_messages_table(name: str = "zeroloss_half_messages", metadata: sa.MetaData | None = None) -> sa.Table:
    """The check-back table: one row per half message, written in its local transaction."""
    if not _TABLE_RE.match(name):
        raise ConfigError(f"invalid half-message table name {name!r}: use 1-50 letters, digits or _")
    ascii_ = (
        sa.String(36)
        .with_variant(mysql.VARCHAR(36, charset="ascii", collation="ascii_bin"), "mysql", "mariadb")
        .with_variant(postgresql.VARCHAR(36, collation="C"), "postgresql")
    )
    return sa.Table(
        name,
        metadata if metadata is not None else sa.MetaData(),
        sa.Column("id", ascii_, primary_key=True),  # UUIDv7: key order is time order, purge is a range
        sa.Column("topic", sa.String(249), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),  # committed | rolled_back (a check-back's fence)
        sa.Column("message_id", sa.String(128), nullable=True),  # the broker's, for audit
        sa.Column("created_at", sa.Double, nullable=False),
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
    )


class CommitOutcomeUnknown(Exception):
    """The local COMMIT raised: it may or may not have committed. Carries the callable's result."""

    def __init__(self, message: str, result: Any) -> None:
        super().__init__(message)
        self.result = result


class HalfMessageTable:
    """The recommended check-back source: a table in the database of the local transactions.

    Rows are kept ``retention`` (default 7 days, at least 2 hours) and removed by :meth:`purge`;
    keep it well above the broker's check-back window (``transactionTimeOut`` +
    ``transactionCheckMax`` x ``transactionCheckInterval``, about 8 minutes by default, longer
    while the broker is down). A check-back for a message older than the retention minus an hour
    is answered from the row if there is one and UNKNOWN if not — never fenced into a rollback."""

    def __init__(
        self,
        url_or_engine: str | sa.Engine,
        *,
        table: str = "zeroloss_half_messages",
        retention: timedelta = timedelta(days=7),
        lock_timeout_s: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if retention < MIN_RETENTION:
            raise ConfigError(
                f"retention {retention} is too short: rows must outlive the broker's check-backs "
                f"(at least {MIN_RETENTION})"
            )
        if isinstance(url_or_engine, sa.Engine):
            self.engine, self._owns_engine = url_or_engine, False
            if self.engine.dialect.name == "sqlite":
                configure_sqlite(self.engine)
        else:
            self.engine, self._owns_engine = make_engine(url_or_engine), True
        self.table = half_messages_table(table)
        self.retention = retention
        self.lock_timeout_s = lock_timeout_s
        self.clock = clock
        name = self.engine.dialect.name
        self.dialect = "mysql" if name in ("mysql", "mariadb") else name

    def __repr__(self) -> str:
        return f"HalfMessageTable({self.engine.url.render_as_string(hide_password=True)!r}, table={self.table.name!r})"

    def create_schema(self) -> None:
        """Create the table if it is missing (idempotent)."""
        try:
            self.table.metadata.create_all(self.engine, checkfirst=True)
        except DBAPIError as exc:
            raise StoreError(f"cannot create the half-message table {self.table.name}: {exc}", retriable=True) from exc

    def drop_schema(self) -> None:
        self.table.drop(self.engine, checkfirst=True)

    def close(self) -> None:
        if self._owns_engine:
            self.engine.dispose()

    # -- the local transaction -------------------------------------------------------------------

    def run(self, half_id: str, topic: str, message_id: str, local_transaction: Callable[[sa.Connection], T]) -> T:
        """Run ``local_transaction(conn)`` in one transaction with this message's row, and commit.

        The row goes in first, so a check-back that comes while the transaction runs waits on its
        lock instead of fencing. Raises what the callable raised (after a rollback);
        TransactionLostError if the transaction ended under the callable (the row is gone: a
        deadlock rolled it back and the callable carried on); StoreError if a check-back had
        already fenced this id (the local transaction took longer than the broker's
        transactionTimeOut and the broker decided first); CommitOutcomeUnknown if COMMIT raised."""
        try:
            conn = self.engine.connect()
        except DBAPIError as exc:
            raise StoreError(f"local transaction database unavailable: {exc}", retriable=True) from exc
        try:
            try:
                try:
                    tx = conn.begin()
                    conn.execute(
                        self.table.insert().values(
                            id=half_id, topic=topic, outcome=COMMITTED, message_id=message_id, created_at=self.clock()
                        )
                    )
                except IntegrityError as exc:
                    raise StoreError(
                        f"half message {half_id}: a check-back already decided rollback before the "
                        "local transaction began (it started after the broker's transactionTimeOut)",
                        retriable=True,
                    ) from exc
                except DBAPIError as exc:
                    raise StoreError(f"half message {half_id}: cannot write its row: {exc}", retriable=True) from exc
                result = local_transaction(conn)  # its own exceptions pass through untouched
                if transaction_aborted(conn):  # PostgreSQL: an error the callable caught; COMMIT would roll back
                    still = None
                else:
                    try:
                        still = conn.execute(sa.select(self.table.c.outcome).where(self.table.c.id == half_id)).scalar()
                    except DBAPIError as exc:
                        raise StoreError(
                            f"half message {half_id}: cannot read its row back: {exc}", retriable=True
                        ) from exc
                if still != COMMITTED:
                    raise TransactionLostError(
                        f"half message {half_id}: the local transaction ended under the "
                        "callable (its row is gone, or PostgreSQL aborted it); nothing of "
                        "it is committed"
                    )
            except BaseException:
                try:
                    conn.rollback()  # whatever transaction the connection is in now, should tx have ended
                except DBAPIError:
                    log.warning(
                        "rollback of the local transaction of half message %s failed; the database "
                        "rolls it back with the connection",
                        half_id,
                        exc_info=True,
                    )
                raise
            try:
                tx.commit()
            except DBAPIError as exc:
                raise CommitOutcomeUnknown(str(exc), result) from exc
            return result
        finally:
            conn.close()

    # -- the check-back ------------------------------------------------------------------------

    def resolve(self, half_id: str, topic: str = "") -> Resolution:
        """Did the local transaction of ``half_id`` commit? Fences it into ROLLBACK if it did not
        (docs/design.md, "half_messages"); UNKNOWN when the database cannot tell now."""
        if not _UUID_RE.match(half_id):
            log.error("half message id %r is not a zeroloss id: UNKNOWN", half_id)
            return Resolution.UNKNOWN
        horizon = self.clock() - self.retention.total_seconds() + _HORIZON_MARGIN_S
        try:
            with self.engine.connect() as conn:
                if id_time(half_id) >= horizon:
                    with self._lock_wait(conn):
                        try:
                            with conn.begin():
                                if self.dialect == "postgresql":
                                    conn.exec_driver_sql(f"SET LOCAL lock_timeout = {int(self.lock_timeout_s * 1000)}")
                                conn.execute(
                                    self.table.insert().values(
                                        id=half_id, topic=topic, outcome=ROLLED_BACK, created_at=self.clock()
                                    )
                                )
                            return Resolution.ROLLBACK  # fenced: that transaction can never commit its row now
                        except IntegrityError:
                            pass  # a row is there: committed, or fenced by an earlier check-back
                with conn.begin():
                    outcome = conn.execute(sa.select(self.table.c.outcome).where(self.table.c.id == half_id)).scalar()
        except DBAPIError as exc:  # lock wait timeout, database down: ask again at the next check-back
            log.warning("check-back of half message %s: %s; answering UNKNOWN", half_id, exc)
            return Resolution.UNKNOWN
        if outcome == COMMITTED:
            return Resolution.COMMIT
        if outcome == ROLLED_BACK:
            return Resolution.ROLLBACK
        log.error(
            "check-back of half message %s, older than the retention horizon, finds no row: UNKNOWN "
            "(a person must decide; the broker discards it after transactionCheckMax check-backs)",
            half_id,
        )
        return Resolution.UNKNOWN

    @contextmanager
    def _lock_wait(self, conn: sa.Connection) -> Iterator[None]:
        """A short lock wait for the fence on this (pooled) connection, restored afterwards so the
        application's own transactions keep theirs. PostgreSQL sets it per transaction instead."""
        if self.dialect == "mysql":
            old = int(conn.exec_driver_sql("SELECT @@SESSION.innodb_lock_wait_timeout").scalar_one())
            conn.commit()
            conn.exec_driver_sql(f"SET SESSION innodb_lock_wait_timeout = {max(1, round(self.lock_timeout_s))}")
            conn.commit()  # SQLAlchemy began a transaction for the SET; the fence begins its own
            try:
                yield
            finally:
                conn.rollback()
                conn.exec_driver_sql(f"SET SESSION innodb_lock_wait_timeout = {old}")
                conn.commit()
        elif self.dialect == "sqlite":
            conn.exec_driver_sql(f"PRAGMA busy_timeout = {int(self.lock_timeout_s * 1000)}")
            conn.commit()
            try:
                yield
            finally:
                conn.rollback()
                conn.exec_driver_sql(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
                conn.commit()
        else:
            yield

    def outcome(self, half_id: str) -> str | None:
        """The row's outcome (``committed`` / ``rolled_back``), None if there is no row."""
        with self.engine.connect() as conn:
            value = conn.execute(sa.select(self.table.c.outcome).where(self.table.c.id == half_id)).scalar()
        return None if value is None else str(value)

    def purge(self) -> int:
        """Delete the rows older than the retention (by their UUIDv7 id); returns how many."""
        floor = id_floor(self.clock() - self.retention.total_seconds())
        with self.engine.begin() as conn:
            return int(conn.execute(sa.delete(self.table).where(self.table.c.id < floor)).rowcount)
