"""SqlInbox on PostgreSQL with psycopg 3: a run's claims first in their transaction are a plain
INSERT (falling back through the savepoint on a redelivery), and the transaction ends with one
query (``RELEASE SAVEPOINT …; COMMIT``); each way either can fail must still commit nothing, and
say which failure it was."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import DBAPIError

from tests.conftest import PG_URL, require_service
from tests.waiting import wait_until
from zeroloss.errors import StoreError, TransactionLostError
from zeroloss.inbox import SqlInbox

pytestmark = pytest.mark.postgres


def _engine(**kwargs: Any) -> sa.Engine:
    return sa.create_engine(sa.make_url(PG_URL).set(drivername="postgresql+psycopg"), **kwargs)


@contextlib.contextmanager
def _inbox(engine: sa.Engine | None = None) -> Iterator[SqlInbox]:
    """An inbox on a table of its own, on ``engine`` (an app's: disposed here too) or its own."""
    require_service("postgres")
    inbox = SqlInbox(engine if engine is not None else PG_URL, table=f"zl_inbox_{uuid.uuid4().hex[:10]}")
    inbox.create_schema()
    try:
        yield inbox
    finally:
        inbox.drop_schema()
        inbox.close()
        if engine is not None:
            engine.dispose()


@contextlib.contextmanager
def _effects(inbox: SqlInbox, constraint: str = "") -> Iterator[str]:
    name = f"zl_fx_{uuid.uuid4().hex[:10]}"
    with inbox.engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {name} (mid TEXT{constraint})")
    try:
        yield name
    finally:
        with inbox.engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE {name}")


def _rows(inbox: SqlInbox, table: str) -> list[str]:
    with inbox.engine.connect() as conn:
        return sorted(conn.exec_driver_sql(f"SELECT mid FROM {table}").scalars())


def _terminate(inbox: SqlInbox, pid: int) -> None:
    """End a session from another connection, and wait until the server has ended it."""
    engine = _engine(poolclass=sa.NullPool, isolation_level="AUTOCOMMIT")  # a new stats snapshot per query
    with engine.connect() as other:
        other.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")
        wait_until(
            lambda: (
                other.exec_driver_sql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {int(pid)}").scalar_one() == 0
            ),
            what=f"session {pid} to end",
        )
    engine.dispose()


def test_a_transaction_is_one_query_to_begin_one_to_claim_and_one_to_commit_after_psycopg_s_begin() -> None:
    """The statements the inbox sends through SQLAlchemy, in order (psycopg's own BEGIN goes first,
    unseen by the cursor events); no server notice (a second BEGIN or COMMIT would warn)."""
    with _inbox() as inbox, _effects(inbox) as fx:
        sent: list[str] = []
        notices: list[str] = []

        def log(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
            sent.append(statement)

        event.listen(inbox.engine, "before_cursor_execute", log)
        for _ in range(2):  # a fresh connection, then the pool's
            sent.clear()
            with inbox.transaction() as tx:
                driver: Any = tx.connection.driver_connection
                driver.add_notice_handler(lambda d: notices.append(d.message_primary))
                assert inbox.claim_many(tx, "g", [f"m{len(notices)}-{uuid.uuid4().hex}"])
                tx.exec_driver_sql(f"INSERT INTO {fx} VALUES ('x')")
            assert sent[0] == (
                "SET LOCAL lock_timeout = 10000; SET LOCAL idle_in_transaction_session_timeout = 60000; "
                "SAVEPOINT zeroloss_inbox_open"
            )
            assert sent[1].startswith(f"INSERT INTO {inbox.table.name} ")
            assert sent[2:] == [f"INSERT INTO {fx} VALUES ('x')", "RELEASE SAVEPOINT zeroloss_inbox_open; COMMIT"]
        assert notices == [] and _rows(inbox, fx) == ["x", "x"]


def test_a_handler_that_swallowed_an_error_commits_nothing() -> None:
    """PostgreSQL aborted the transaction at the handler's error: the RELEASE of the one-query
    commit fails, the COMMIT after it never runs, and the message is the handler's failure."""
    with _inbox() as inbox, _effects(inbox) as fx:
        with pytest.raises(TransactionLostError, match="had ended before its commit"), inbox.transaction() as tx:
            assert inbox.claim(tx, "g", "m")
            tx.exec_driver_sql(f"INSERT INTO {fx} VALUES ('before')")
            with contextlib.suppress(DBAPIError):
                tx.exec_driver_sql("SELECT 1 / 0")
        assert not inbox.seen("g", "m") and _rows(inbox, fx) == []
        with inbox.transaction() as tx:  # the retry does it, once
            assert inbox.claim(tx, "g", "m")
            tx.exec_driver_sql(f"INSERT INTO {fx} VALUES ('again')")
        assert inbox.seen("g", "m") and _rows(inbox, fx) == ["again"]


def test_a_handler_that_committed_by_itself_has_what_followed_rolled_back() -> None:
    """The handler's own COMMIT ends the inbox's transaction (its savepoint with it); what it
    writes next runs in a new one, which the RELEASE finds without the savepoint and rolls back."""
    with _inbox() as inbox, _effects(inbox) as fx:
        with pytest.raises(TransactionLostError), inbox.transaction() as tx:
            assert inbox.claim(tx, "g", "m")
            tx.exec_driver_sql("COMMIT")
            tx.exec_driver_sql(f"INSERT INTO {fx} VALUES ('after')")
        assert _rows(inbox, fx) == []


def test_a_commit_that_fails_is_a_store_error_not_the_handler_s() -> None:
    """A deferred constraint fails at the COMMIT, after the RELEASE succeeded: the database refused
    the commit (retriable, like any failed commit), not a transaction that ended under its block.
    Nothing of it is kept."""
    with _inbox() as inbox, _effects(inbox, " UNIQUE DEFERRABLE INITIALLY DEFERRED") as fx:
        with pytest.raises(StoreError, match="inbox commit failed") as info, inbox.transaction() as tx:
            assert inbox.claim(tx, "g", "m")
            tx.exec_driver_sql(f"INSERT INTO {fx} VALUES ('same'), ('same')")
        assert info.value.retriable and not isinstance(info.value, TransactionLostError)
        assert not inbox.seen("g", "m") and _rows(inbox, fx) == []


def test_a_connection_lost_before_the_commit_commits_nothing_and_the_next_transaction_works() -> None:
    with _inbox() as inbox, _effects(inbox) as fx:
        with pytest.raises(StoreError, match="connection is lost") as info, inbox.transaction() as tx:
            assert inbox.claim(tx, "g", "m")
            tx.exec_driver_sql(f"INSERT INTO {fx} VALUES ('lost')")
            _terminate(inbox, tx.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
        assert info.value.retriable
        assert not inbox.seen("g", "m") and _rows(inbox, fx) == []
        with inbox.transaction() as tx:
            assert inbox.claim(tx, "g", "m")
        assert inbox.seen("g", "m")


@pytest.mark.parametrize("pre_ping", [False, True], ids=["no-pre-ping", "pre-ping"])
def test_a_connection_lost_while_idle_in_the_pool_fails_the_begin_cleanly(pre_ping: bool) -> None:
    """The begin is the first thing a pooled connection sends. Without the pool's pre-ping, a
    session the server ended while idle fails it: a retriable StoreError, the connection is
    dropped, and the next transaction gets a new one. With the pre-ping (zeroloss's own
    engines) the pool replaces it before the begin, unseen."""
    with _inbox(_engine(pool_pre_ping=pre_ping)) as inbox:
        with inbox.transaction() as tx:
            pid = tx.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        _terminate(inbox, pid)
        if not pre_ping:
            with pytest.raises(StoreError, match="inbox database unavailable") as info, inbox.transaction():
                pass
            assert info.value.retriable
        with inbox.transaction() as tx:
            assert inbox.claim(tx, "g", "m")
            assert tx.exec_driver_sql("SELECT pg_backend_pid()").scalar_one() != pid
        assert inbox.seen("g", "m")


def test_a_connection_with_an_isolation_level_keeps_it_and_the_savepoint_check() -> None:
    """An app's Engine at REPEATABLE READ: the transaction runs at that level and the savepoint
    check still holds."""
    with _inbox(_engine(isolation_level="REPEATABLE READ")) as inbox, _effects(inbox) as fx:
        with inbox.transaction() as tx:
            assert tx.exec_driver_sql("SHOW transaction_isolation").scalar_one() == "repeatable read"
            assert inbox.claim(tx, "g", "m")
            tx.exec_driver_sql(f"INSERT INTO {fx} VALUES ('x')")
        with pytest.raises(TransactionLostError), inbox.transaction() as tx:
            assert inbox.claim(tx, "g", "m2")
            tx.exec_driver_sql("ROLLBACK")
            tx.exec_driver_sql(f"INSERT INTO {fx} VALUES ('after')")
        assert inbox.seen("g", "m") and not inbox.seen("g", "m2") and _rows(inbox, fx) == ["x"]


def test_a_run_s_claim_first_in_its_transaction_is_a_plain_insert_and_falls_back_on_a_claimed_id() -> None:
    """Claims first in their transaction: one plain INSERT when every id is new; with an id claimed
    before, the unique violation is rolled back to the transaction's savepoint and the usual
    statement says which ids were new — the handler then runs once per new id."""
    with _inbox() as inbox:
        sent: list[str] = []
        event.listen(inbox.engine, "before_cursor_execute", lambda c, cur, statement, *_: sent.append(statement))
        with inbox.transaction() as tx:
            assert inbox.claim_many(tx, "g", ["a", "b", "a"]) == {"a", "b"}
        assert [s for s in sent if "INSERT" in s and "ON CONFLICT" not in s] == sent[1:2]
        sent.clear()
        with inbox.transaction() as tx:
            assert inbox.claim_many(tx, "g", ["c", "b", "d", "c"]) == {"c", "d"}
        assert sent[2:4] == ["ROLLBACK TO SAVEPOINT zeroloss_inbox_open", sent[3]] and "ON CONFLICT" in sent[3]
        assert all(inbox.seen("g", m) for m in "abcd")


def test_a_claim_after_the_handler_s_own_statements_never_rolls_them_back() -> None:
    """A statement before the claim (an app using the inbox by hand) makes the claim take the
    usual statement: a rollback to the savepoint would undo that statement with the claim."""
    with _inbox() as inbox, _effects(inbox) as fx:
        with inbox.transaction() as tx:
            assert inbox.claim_many(tx, "g", ["old"]) == {"old"}
        with inbox.transaction() as tx:
            tx.exec_driver_sql(f"INSERT INTO {fx} VALUES ('before the claim')")
            assert inbox.claim_many(tx, "g", ["old", "new"]) == {"new"}
        assert _rows(inbox, fx) == ["before the claim"] and inbox.seen("g", "new")


def test_a_plain_insert_claim_waiting_on_another_consumer_s_lock_times_out_retriably() -> None:
    """An id another consumer holds in an open transaction: the plain INSERT waits on its row lock
    like the usual claim, up to the lock timeout, and fails retriably (not read as a duplicate)."""
    with _inbox() as holder:
        waiter = SqlInbox(PG_URL, table=holder.table.name, lock_timeout_s=0.3)
        try:
            with holder.transaction() as tx:
                assert holder.claim_many(tx, "g", ["held"]) == {"held"}
                with pytest.raises(StoreError) as info, waiter.transaction() as tx2:
                    waiter.claim_many(tx2, "g", ["free", "held"])
                assert info.value.retriable and "lock" in str(info.value).lower()
            assert not waiter.seen("g", "free")
            with waiter.transaction() as tx2:  # the holder committed: a duplicate now
                assert waiter.claim_many(tx2, "g", ["free", "held"]) == {"free"}
        finally:
            waiter.close()


def test_on_psycopg2_the_inbox_keeps_separate_statements_and_no_second_commit() -> None:
    """psycopg2 keeps its own idea of an open transaction: a COMMIT sent inside a statement would
    be followed by its own (a server WARNING per transaction). Its inbox sends RELEASE and COMMIT
    apart, and the checks hold as on psycopg 3."""
    pytest.importorskip("psycopg2")
    with _inbox(sa.create_engine(sa.make_url(PG_URL).set(drivername="postgresql+psycopg2"))) as inbox:
        with inbox.transaction() as tx:
            assert inbox.claim_many(tx, "g", ["a", "b"]) == {"a", "b"}
            raw: Any = tx.connection.driver_connection
        with inbox.transaction() as tx:
            assert inbox.claim_many(tx, "g", ["b", "c"]) == {"c"}
        assert raw.notices == []
        with pytest.raises(TransactionLostError), inbox.transaction() as tx:
            assert inbox.claim_many(tx, "g", ["d"]) == {"d"}
            tx.exec_driver_sql("ROLLBACK")
        assert not inbox.seen("g", "d") and inbox.seen("g", "c")


def test_a_block_that_fails_before_its_claim_leaves_no_flag_for_the_next_user_of_the_connection() -> None:
    """The flag that allows the plain-INSERT claim lives on the pooled connection: a block that
    raised before any statement must not leave it there for a claim in a transaction the inbox did
    not begin (no savepoint to roll back to: that claim must take the usual statement)."""
    with _inbox() as inbox:
        with inbox.transaction() as tx:
            assert inbox.claim_many(tx, "g", ["old"]) == {"old"}
        with pytest.raises(RuntimeError), inbox.transaction():
            raise RuntimeError("the handler's setup failed before the claim")
        with inbox.engine.begin() as conn:  # an app claiming by hand in its own transaction
            assert inbox.claim_many(conn, "g", ["old", "new"]) == {"new"}


def test_on_a_driver_without_psycopg_s_error_codes_a_duplicate_is_still_a_duplicate() -> None:
    """An app's Engine on pg8000 (its errors carry the SQLSTATE in a dict, no ``sqlstate`` or
    ``pgcode``): the plain INSERT's unique violation must still fall back to the usual claim,
    not fail every redelivery as a retriable StoreError, which never passes."""
    pytest.importorskip("pg8000")
    with _inbox(sa.create_engine(sa.make_url(PG_URL).set(drivername="postgresql+pg8000"))) as inbox:
        with inbox.transaction() as tx:
            assert inbox.claim_many(tx, "g", ["a", "b"]) == {"a", "b"}
        with inbox.transaction() as tx:
            assert inbox.claim_many(tx, "g", ["b", "c"]) == {"c"}
        assert inbox.seen("g", "c")


def test_a_plain_insert_claim_refused_for_another_cause_than_a_duplicate_is_a_store_error() -> None:
    """An inbox table an app altered (a NOT NULL column without a default): the plain INSERT's
    integrity error is not a duplicate; the usual statement after the rollback fails the same way,
    a retriable StoreError, and nothing of the transaction is kept."""
    with _inbox() as inbox, _effects(inbox) as fx:
        with inbox.engine.begin() as conn:
            conn.exec_driver_sql(f"ALTER TABLE {inbox.table.name} ADD COLUMN tenant TEXT NOT NULL")
        with pytest.raises(StoreError, match="not-null") as info, inbox.transaction() as tx:
            inbox.claim_many(tx, "g", ["a"])
        assert info.value.retriable and _rows(inbox, fx) == [] and not inbox.seen("g", "a")


@pytest.mark.parametrize("end", ["commit", "rollback"])
@pytest.mark.filterwarnings("ignore:transaction already deassociated")  # the inbox's rollback of the ended one
def test_a_block_that_ended_its_transaction_by_sqlalchemy_before_claiming_is_a_lost_transaction(end: str) -> None:
    """``tx.commit()`` / ``tx.rollback()`` send no statement event: the flag must go with the
    transaction, or a redelivered id's plain INSERT, now in a new transaction, rolls back to a
    savepoint that is gone — a StoreError (retried, never counted) instead of the block's own
    failure. The claim then takes the usual statement and the RELEASE finds the transaction lost."""
    with _inbox() as inbox:
        with inbox.transaction() as tx:
            assert inbox.claim_many(tx, "g", ["old"]) == {"old"}
        with pytest.raises(TransactionLostError), inbox.transaction() as tx:
            getattr(tx, end)()
            assert inbox.claim_many(tx, "g", ["old", "new"]) == {"new"}
        assert not inbox.seen("g", "new")
