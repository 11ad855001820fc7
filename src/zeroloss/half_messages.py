"""RocketMQ transactional ("half") messages: an alternative to the outbox for RocketMQ users.

:meth:`HalfMessageProducer.send` sends the message as a half message (stored by the broker, not
yet visible to any consumer), runs the caller's local database transaction, and then commits the
half message if the local transaction committed or rolls it back if it did not. When the process
dies between the two commits, the broker asks a live producer of the same topic ("check-back",
over the producer's gRPC telemetry stream; the proxy uses the topic as the producer group) whether
the local transaction committed, and commits or drops the half message by the answer. The answer
comes from the caller's database:

* :class:`HalfMessageTable` (recommended): a row in ``zeroloss_half_messages`` written in the same
  local transaction. The check-back *fences*: it inserts a ``rolled_back`` row for the id in its
  own transaction. If the local transaction committed, the insert hits its row (answer COMMIT); if
  it is still running, the insert waits on its row lock (past ``lock_timeout_s``: UNKNOWN, asked
  again later); otherwise the insert commits (answer ROLLBACK), and the local transaction, should
  it still exist somewhere, can no longer commit its own row. So ROLLBACK is only ever answered for
  a transaction that cannot commit any more.
* a callable ``check(CheckBack) -> Resolution``: the caller's own answer (say, "is order X in the
  orders table?"). It must return ROLLBACK only when that transaction can no longer commit.

UNKNOWN (a database error, a lock wait, a message zeroloss did not send, a row older than the
table's retention) is answered as the protocol's TRANSACTION_RESOLUTION_UNSPECIFIED: the broker
keeps the half message and asks again every ``transactionCheckInterval``. Note the broker's own
limit: after ``transactionCheckMax`` (15) check-backs without COMMIT or ROLLBACK — unanswered ones
count too, e.g. while no producer of the topic runs — it discards the half message.
"""

from __future__ import annotations

import enum
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.exc import DBAPIError, IntegrityError

from zeroloss.brokers import rocketmq_client
from zeroloss.errors import BrokerError, ConfigError, MessageError, MissingExtraError, StoreError, TransactionLostError
from zeroloss.inbox import transaction_aborted
from zeroloss.message import ID_HEADER, id_time, uuid7, validate_topic
from zeroloss.outbox.base import id_floor
from zeroloss.sqlurl import SQLITE_BUSY_TIMEOUT_MS, configure_sqlite, make_engine

__all__ = ["CheckBack", "HalfMessageProducer", "HalfMessageTable", "Resolution", "Sent", "half_messages_table"]
log = logging.getLogger(__name__)
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


@dataclass(frozen=True, slots=True)
class CheckBack:
    """A half message the broker asks about: zeroloss's id (the ``zeroloss-id`` property), its
    topic, key, body, user properties, the broker's message id, and how often it was asked."""

    id: str
    topic: str
    key: str | None
    value: bytes
    headers: Mapping[str, str]
    message_id: str
    check_times: int


@dataclass(frozen=True, slots=True)
class Sent(Generic[T]):
    """The outcome of :meth:`HalfMessageProducer.send`: the local transaction committed.

    ``settled`` is False when the broker's commit of the half message failed (broker or proxy
    unreachable, proxy restarted): the message is then delivered after the broker's check-back."""

    id: str
    message_id: str
    result: T
    settled: bool


def half_messages_table(name: str = "zeroloss_half_messages", metadata: sa.MetaData | None = None) -> sa.Table:
    """The check-back table: one row per half message, written in its local transaction."""
    if not _TABLE_RE.match(name):
        raise ConfigError(f"invalid half-message table name {name!r}: use 1-50 letters, digits or _")
    ascii_ = (sa.String(36).with_variant(mysql.VARCHAR(36, charset="ascii", collation="ascii_bin"), "mysql", "mariadb")
              .with_variant(postgresql.VARCHAR(36, collation="C"), "postgresql"))
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


class _CommitOutcomeUnknown(Exception):
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
            raise ConfigError(f"retention {retention} is too short: rows must outlive the broker's check-backs "
                              f"(at least {MIN_RETENTION})")
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
        transactionTimeOut and the broker decided first); _CommitOutcomeUnknown if COMMIT raised."""
        try:
            conn = self.engine.connect()
        except DBAPIError as exc:
            raise StoreError(f"local transaction database unavailable: {exc}", retriable=True) from exc
        try:
            try:
                try:
                    tx = conn.begin()
                    conn.execute(self.table.insert().values(
                        id=half_id, topic=topic, outcome=COMMITTED, message_id=message_id, created_at=self.clock()))
                except IntegrityError as exc:
                    raise StoreError(f"half message {half_id}: a check-back already decided rollback before the "
                                     "local transaction began (it started after the broker's transactionTimeOut)",
                                     retriable=True) from exc
                except DBAPIError as exc:
                    raise StoreError(f"half message {half_id}: cannot write its row: {exc}", retriable=True) from exc
                result = local_transaction(conn)  # its own exceptions pass through untouched
                if transaction_aborted(conn):  # PostgreSQL: an error the callable caught; COMMIT would roll back
                    still = None
                else:
                    try:
                        still = conn.execute(sa.select(self.table.c.outcome).where(self.table.c.id == half_id)).scalar()
                    except DBAPIError as exc:
                        raise StoreError(f"half message {half_id}: cannot read its row back: {exc}",
                                         retriable=True) from exc
                if still != COMMITTED:
                    raise TransactionLostError(f"half message {half_id}: the local transaction ended under the "
                                               "callable (its row is gone, or PostgreSQL aborted it); nothing of "
                                               "it is committed")
            except BaseException:
                try:
                    conn.rollback()  # whatever transaction the connection is in now, should tx have ended
                except DBAPIError:
                    log.warning("rollback of the local transaction of half message %s failed; the database "
                                "rolls it back with the connection", half_id, exc_info=True)
                raise
            try:
                tx.commit()
            except DBAPIError as exc:
                raise _CommitOutcomeUnknown(str(exc), result) from exc
            return result
        finally:
            conn.close()

    # -- the check-back ------------------------------------------------------------------------

    def resolve(self, half_id: str, topic: str = "") -> Resolution:
        """Did the local transaction of ``half_id`` commit? Fences it into ROLLBACK if it did not
        (see the module's docstring); UNKNOWN when the database cannot tell now."""
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
                                conn.execute(self.table.insert().values(
                                    id=half_id, topic=topic, outcome=ROLLED_BACK, created_at=self.clock()))
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
        log.error("check-back of half message %s, older than the retention horizon, finds no row: UNKNOWN "
                  "(a person must decide; the broker discards it after transactionCheckMax check-backs)", half_id)
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


CheckSource = HalfMessageTable | Callable[[CheckBack], Resolution]


def _client_config(url: str, request_timeout: int) -> Any:
    """``rocketmq://host:port`` (the gRPC proxy) → the client's ClientConfiguration."""
    try:
        from rocketmq import ClientConfiguration, Credentials
    except ImportError as exc:
        raise MissingExtraError("rocketmq-python-client", "rocketmq", "RocketMQ half messages") from exc
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"bad port in {url!r}: {exc}") from exc
    if parts.scheme != "rocketmq" or not parts.hostname or port is None:
        raise ConfigError(f"expected rocketmq://HOST:PORT (the broker's gRPC proxy), got {url!r}")
    return ClientConfiguration(f"{parts.hostname}:{port}", Credentials(), request_timeout=request_timeout)


class HalfMessageProducer:
    """A RocketMQ producer of transactional messages whose check-backs are answered by ``check``.

    Keep one running per topic while half messages may be unresolved: the broker's check-back
    reaches only a live producer of that topic. ``topics`` must be TRANSACTION topics."""

    def __init__(self, url: str, topics: list[str] | tuple[str, ...], check: CheckSource, *,
                 request_timeout: int = 10) -> None:
        if not topics:
            raise ConfigError("name the topics: the broker sends a topic's check-backs to its producers")
        self.topics = tuple(validate_topic(t) for t in topics)
        if not isinstance(check, HalfMessageTable) and not callable(check):
            raise ConfigError("check must be a HalfMessageTable or a callable(CheckBack) -> Resolution")
        self.check = check
        self.url = url
        self._config = _client_config(url, request_timeout)
        self._producer: Any = None
        self._lock = threading.Lock()

    def __enter__(self) -> HalfMessageProducer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Connect, and from now on answer the broker's check-backs for ``topics``."""
        from rocketmq import Producer, TransactionChecker, TransactionResolution

        answers = {Resolution.COMMIT: TransactionResolution.COMMIT,
                   Resolution.ROLLBACK: TransactionResolution.ROLLBACK,
                   Resolution.UNKNOWN: TransactionResolution.TRANSACTION_RESOLUTION_UNSPECIFIED}
        resolve = self.resolve

        class _Checker(TransactionChecker):  # type: ignore[misc]
            def check(self, message: Any) -> Any:
                return answers[resolve(message)]

        with self._lock:
            if self._producer is not None:
                return
            producer = Producer(self._config, self.topics, _Checker())
            try:
                rocketmq_client.start(producer)
            except Exception as exc:
                raise BrokerError(f"cannot start a RocketMQ producer at {self.url}: {exc}") from exc
            self._producer = producer

    def close(self) -> None:
        with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            producer.shutdown()

    def resolve(self, message: Any) -> Resolution:
        """The answer to one check-back (a client Message); UNKNOWN when it cannot be known."""
        props = dict(message.properties or {})
        half_id = props.get(ID_HEADER)
        if not half_id:
            log.warning("check-back for message %s on %s without a %s property (not sent by zeroloss): UNKNOWN",
                        message.message_id, message.topic, ID_HEADER)
            return Resolution.UNKNOWN
        try:
            if isinstance(self.check, HalfMessageTable):
                answer = self.check.resolve(half_id, message.topic)
            else:
                answer = self.check(self._check_back(message, half_id, props))
            if not isinstance(answer, Resolution):
                raise TypeError(f"the check returned {answer!r}, not a Resolution")
        except Exception:
            log.exception("check-back of half message %s failed: UNKNOWN", half_id)
            return Resolution.UNKNOWN
        log.info("check-back of half message %s (%s): %s", half_id, message.topic, answer.value)
        return answer

    @staticmethod
    def _check_back(message: Any, half_id: str, props: Mapping[str, str]) -> CheckBack:
        keys = sorted(message.keys or ())
        return CheckBack(id=half_id, topic=message.topic, key=keys[0] if keys else None, value=bytes(message.body),
                         headers={k: v for k, v in props.items() if k != ID_HEADER and not k.startswith("__")
                                  and k != "TRANSACTION_CHECK_TIMES"},
                         message_id=message.message_id, check_times=int(props.get("TRANSACTION_CHECK_TIMES", "1")))

    # -- sending -----------------------------------------------------------------------------------

    def send(self, topic: str, value: bytes, local_transaction: Callable[[Any], T], *, key: str | None = None,
             headers: Mapping[str, str] | None = None) -> Sent[T]:
        """Send ``value`` to ``topic`` if, and only if, ``local_transaction`` commits.

        With a HalfMessageTable, ``local_transaction(conn)`` runs in a transaction on the table's
        engine, which zeroloss commits; with a callable check, ``local_transaction(id)`` runs and
        commits its own transaction, recording ``id`` where the check will look.

        Raises BrokerError if the half message could not be sent (nothing ran); otherwise what the
        local transaction raised, after rolling back the half message — in callable mode only if
        the check says ROLLBACK (an exception there does not prove the commit did not happen).
        A local COMMIT that raised is settled by the table's fence at once when the database
        answers; when it cannot, StoreError, and the broker's check-back settles it later."""
        producer = self._producer
        if producer is None:
            raise ConfigError("the producer is not started: call start() or use it as a context manager")
        half_id = uuid7()
        message = self._message(topic, value, key, headers, half_id)
        transaction = producer.begin_transaction()
        try:
            receipt = producer.send(message, transaction)
        except Exception as exc:
            if "message type not match" in str(exc):
                raise ConfigError(f"topic {topic!r} is not a TRANSACTION topic (message.type=TRANSACTION): {exc}"
                                  ) from exc
            raise BrokerError(f"half message {half_id} to {topic!r} not sent: {exc}") from exc
        if isinstance(self.check, HalfMessageTable):
            return self._run_with_table(self.check, transaction, half_id, topic, receipt.message_id, local_transaction)
        return self._run_with_callback(self.check, transaction, message, half_id, receipt.message_id, local_transaction)

    def _run_with_table(self, table: HalfMessageTable, transaction: Any, half_id: str, topic: str, message_id: str,
                        local_transaction: Callable[[sa.Connection], T]) -> Sent[T]:
        try:
            result = table.run(half_id, topic, message_id, local_transaction)
        except _CommitOutcomeUnknown as exc:
            answer = table.resolve(half_id, topic)
            if answer is Resolution.COMMIT:
                log.warning("half message %s: the local COMMIT raised (%s) but did commit", half_id, exc)
                return Sent(half_id, message_id, exc.result, self._end(transaction, half_id, commit=True))
            if answer is Resolution.ROLLBACK:
                self._end(transaction, half_id, commit=False)
                raise StoreError(f"half message {half_id}: the local transaction did not commit: {exc}",
                                 retriable=True) from exc
            raise StoreError(f"half message {half_id}: the local COMMIT raised ({exc}) and the database cannot tell "
                             "yet whether it committed; the broker's check-back will settle it",
                             retriable=False) from exc
        except BaseException:
            self._end(transaction, half_id, commit=False)  # never issued COMMIT: it cannot have committed
            raise
        return Sent(half_id, message_id, result, self._end(transaction, half_id, commit=True))

    def _run_with_callback(self, check: Callable[[CheckBack], Resolution], transaction: Any, message: Any,
                           half_id: str, message_id: str, local_transaction: Callable[[str], T]) -> Sent[T]:
        try:
            result = local_transaction(half_id)
        except BaseException:
            answer = self.resolve(message)
            if answer is not Resolution.UNKNOWN:
                self._end(transaction, half_id, commit=answer is Resolution.COMMIT)
            raise
        return Sent(half_id, message_id, result, self._end(transaction, half_id, commit=True))

    def _end(self, transaction: Any, half_id: str, *, commit: bool) -> bool:
        """Commit or roll back the half message; False (logged) if the broker did not take it:
        the check-back gives the same answer later."""
        try:
            transaction.commit() if commit else transaction.rollback()
        except Exception as exc:
            log.warning("half message %s: %s failed (%s); the broker's check-back will settle it",
                        half_id, "commit" if commit else "rollback", exc)
            return False
        return True

    @staticmethod
    def _message(topic: str, value: bytes, key: str | None, headers: Mapping[str, str] | None, half_id: str) -> Any:
        from rocketmq import Message

        validate_topic(topic)
        if not isinstance(value, (bytes, bytearray)) or not value:
            raise MessageError("value must be non-empty bytes (RocketMQ refuses an empty body)")
        message = Message()
        message.topic = topic
        message.body = bytes(value)
        try:
            if key is not None:
                message.keys = key
            for name, text in (headers or {}).items():
                if name == ID_HEADER:
                    raise MessageError(f"header {ID_HEADER!r} is reserved: zeroloss sets it to the message id")
                message.add_property(name, text)
        except MessageError:
            raise
        except Exception as exc:  # the client's IllegalArgumentException: a blank key or property
            raise MessageError(f"cannot build the message: {exc}") from exc
        message.add_property(ID_HEADER, half_id)
        return message
