"""One contract for every inbox: SqlInbox on SQLite, PostgreSQL and MariaDB, and RedisInbox."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import MARIADB_URL, PG_URL, REDIS_URL, require_service
from tests.deadlock import Deadlock
from zeroloss.errors import ConfigError, MessageError, TransactionLostError
from zeroloss.inbox import BatchInbox, Inbox, RedisInbox, SqlInbox, open_inbox

KINDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
    pytest.param("mariadb", id="mariadb", marks=pytest.mark.mariadb),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
]


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_inbox(kind: str, tmp_path: Path) -> Iterator[Any]:
    suffix = uuid.uuid4().hex[:10]
    box: Any
    if kind == "redis":
        require_service("redis")
        box = RedisInbox(REDIS_URL, prefix=f"zeroloss:test:{suffix}:", lease_s=10)
    else:
        url = {"sqlite": f"sqlite:///{tmp_path / 'inbox.db'}", "postgresql": PG_URL, "mariadb": MARIADB_URL}[kind]
        if kind != "sqlite":
            require_service("postgres" if kind == "postgresql" else kind)
        box = SqlInbox(url, table=f"zl_inbox_{suffix}")
        box.create_schema()
    box.clock = Clock()
    try:
        yield box
    finally:
        if isinstance(box, SqlInbox):
            box.drop_schema()
        else:
            keys = list(box.client.scan_iter(match=box.prefix + "*"))
            if keys:
                box.client.delete(*keys)
        box.close()


@pytest.fixture(params=KINDS)
def inbox(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    yield from make_inbox(request.param, tmp_path)


@pytest.fixture(params=KINDS[:3])
def sql_inbox(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    yield from make_inbox(request.param, tmp_path)


@pytest.fixture(params=KINDS[3:])
def redis_inbox(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    yield from make_inbox(request.param, tmp_path)


def claim(inbox: Any, group: str, mid: str) -> bool:
    with inbox.transaction() as tx:
        return bool(inbox.claim(tx, group, mid))


def test_it_is_an_inbox(inbox: Any) -> None:
    assert isinstance(inbox, Inbox)


def test_a_claim_succeeds_once_then_reports_a_duplicate(inbox: Any) -> None:
    mid = str(uuid.uuid4())
    assert not inbox.seen("g", mid)
    assert claim(inbox, "g", mid) is True
    assert inbox.seen("g", mid)
    assert claim(inbox, "g", mid) is False
    assert claim(inbox, "g", mid.upper()) is True  # ids are case-sensitive (MariaDB's default is not)
    assert claim(inbox, "g", "orders/3/1234") is True  # a foreign record's position


def test_groups_are_independent(inbox: Any) -> None:
    mid = str(uuid.uuid4())
    assert claim(inbox, "billing", mid) is True
    assert claim(inbox, "shipping", mid) is True
    assert claim(inbox, "billing", mid) is False
    assert claim(inbox, "ship:ping", mid) is True  # separators in a group name cannot collide


def test_a_rolled_back_claim_leaves_no_trace(inbox: Any) -> None:
    with pytest.raises(RuntimeError), inbox.transaction() as tx:
        assert inbox.claim(tx, "g", "m1") is True
        raise RuntimeError("handler failed")
    assert not inbox.seen("g", "m1")
    assert claim(inbox, "g", "m1") is True


def test_bad_ids_are_message_errors(inbox: Any) -> None:
    for group, mid in (("g", ""), ("g", "x" * 256)):
        with pytest.raises(MessageError), inbox.transaction() as tx:
            inbox.claim(tx, group, mid)
    with pytest.raises(ConfigError), inbox.transaction() as tx:  # the consumer's setting, not the message
        inbox.claim(tx, "", "m")
    assert claim(inbox, "g", "x" * 255) is True
    assert claim(inbox, "g", "\U0001f600" * 255) is True  # the column counts characters, 4-byte ones too


def test_an_id_the_database_cannot_store_is_the_message_s_error_not_an_outage(inbox: Any) -> None:
    """A NUL (PostgreSQL refuses it) or a lone surrogate (no encoding) used to fail every claim as a
    retriable StoreError — retried forever — or escape as a bare UnicodeEncodeError."""
    for mid in ("a\x00b", "x\ud800y"):
        with pytest.raises(MessageError), inbox.transaction() as tx:
            inbox.claim(tx, "g", mid)
        if isinstance(inbox, BatchInbox):
            with pytest.raises(MessageError), inbox.transaction() as tx:
                inbox.claim_many(tx, "g", ["fine", mid])
    assert not inbox.seen("g", "fine")


def test_ids_that_differ_only_in_a_trailing_space_are_never_taken_for_each_other(inbox: Any) -> None:
    """MariaDB's _bin collations pad with spaces: "a " found the claim of "a" and was skipped as its
    duplicate — lost. It must be claimed on its own or refused (a dead letter)."""
    assert claim(inbox, "g", "a") is True
    try:
        assert claim(inbox, "g", "a ") is True
    except MessageError:
        assert isinstance(inbox, SqlInbox) and inbox.dialect in ("mysql", "mariadb")


def test_purge_forgets_claims_older_than_the_retention(inbox: Any) -> None:
    inbox.clock.now = 1000.0
    assert claim(inbox, "g", "old")
    inbox.clock.now = 2000.0
    assert claim(inbox, "g", "new")
    inbox.clock.now = 2500.0
    assert inbox.purge(older_than_s=1000.0) == 1  # cutoff 1500: only "old"
    assert not inbox.seen("g", "old")
    assert inbox.seen("g", "new")
    assert inbox.purge(older_than_s=1000.0) == 0
    assert claim(inbox, "g", "old") is True  # forgotten: a redelivery now would run again


def test_concurrent_claims_of_the_same_ids_have_exactly_one_winner(inbox: Any) -> None:
    ids = [str(uuid.uuid4()) for _ in range(40)]
    wins: Counter[str] = Counter()
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def worker(order: list[str]) -> None:
        try:
            start.wait()
            for mid in order:
                if claim(inbox, "g", mid):
                    with lock:
                        wins[mid] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(ids if i % 2 else ids[::-1],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert wins == Counter({mid: 1 for mid in ids})


def test_sql_effects_commit_and_roll_back_with_the_claim(sql_inbox: Any) -> None:
    inbox = sql_inbox
    effects = sa.Table(f"zl_fx_{uuid.uuid4().hex[:10]}", sa.MetaData(), sa.Column("mid", sa.String(64)))
    effects.create(inbox.engine)
    try:
        with pytest.raises(RuntimeError), inbox.transaction() as tx:
            inbox.claim(tx, "g", "m")
            tx.execute(effects.insert(), {"mid": "m"})
            raise RuntimeError("after the effect")
        with inbox.transaction() as tx:
            assert inbox.claim(tx, "g", "m")
            tx.execute(effects.insert(), {"mid": "m"})
        with inbox.engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(effects)).scalar() == 1
    finally:
        effects.drop(inbox.engine)


def _fx(inbox: Any) -> sa.Table:
    effects = sa.Table(f"zl_fx_{uuid.uuid4().hex[:10]}", sa.MetaData(), sa.Column("mid", sa.String(64)))
    effects.create(inbox.engine)
    return effects


def _rows(inbox: Any, effects: sa.Table) -> list[str]:
    with inbox.engine.connect() as conn:
        return sorted(conn.execute(sa.select(effects.c.mid)).scalars())


def test_a_transaction_that_ended_under_its_block_commits_nothing(sql_inbox: Any) -> None:
    """The block ends the transaction (a raw ROLLBACK, as a handler's own error handling might) and
    carries on: what follows ran outside the claim's transaction and must not commit without it."""
    inbox = sql_inbox
    effects = _fx(inbox)
    try:
        with pytest.raises(TransactionLostError), inbox.transaction() as tx:
            assert inbox.claim(tx, "g", "m")
            tx.execute(effects.insert(), {"mid": "before"})
            tx.exec_driver_sql("ROLLBACK")
            with contextlib.suppress(TransactionLostError):  # SQLite refuses it at once, the others at commit
                tx.execute(effects.insert(), {"mid": "after"})
        assert not inbox.seen("g", "m") and _rows(inbox, effects) == []
        with inbox.transaction() as tx:  # the retry does all of it, once
            assert inbox.claim(tx, "g", "m")
            tx.execute(effects.insert(), [{"mid": "before"}, {"mid": "after"}])
        assert inbox.seen("g", "m") and _rows(inbox, effects) == ["after", "before"]
    finally:
        effects.drop(inbox.engine)


@pytest.mark.mariadb
@pytest.mark.parametrize("ids", [1, 5])
def test_a_swallowed_innodb_deadlock_commits_nothing(tmp_path: Path, ids: int) -> None:
    """InnoDB rolls the whole transaction back on a deadlock — claims and effects — and what a
    handler runs after catching the error starts a new one, which the commit used to commit."""
    for inbox in make_inbox("mariadb", tmp_path):
        effects = _fx(inbox)
        lock = Deadlock(inbox.engine)
        mids = [f"m{i}" for i in range(ids)]
        try:
            with pytest.raises(TransactionLostError), inbox.transaction() as tx:
                assert inbox.claim_many(tx, "g", mids) == set(mids)
                tx.execute(effects.insert(), {"mid": "before"})
                lock.in_handler(tx)
                tx.execute(effects.insert(), {"mid": "after"})
            assert not any(inbox.seen("g", m) for m in mids) and _rows(inbox, effects) == []
        finally:
            lock.drop()
            effects.drop(inbox.engine)


def test_a_bulk_claim_returns_exactly_the_new_ids(sql_inbox: Any) -> None:
    inbox = sql_inbox
    assert isinstance(inbox, BatchInbox)
    assert claim(inbox, "g", "old")
    with inbox.transaction() as tx:  # the relay's duplicates can sit side by side in one run
        assert inbox.claim_many(tx, "g", ["a", "old", "b", "a", "c"]) == {"a", "b", "c"}
    with pytest.raises(RuntimeError), inbox.transaction() as tx:
        assert inbox.claim_many(tx, "g", ["d", "a"]) == {"d"}
        raise RuntimeError("rolled back: d stays unclaimed")
    with inbox.transaction() as tx:
        assert inbox.claim_many(tx, "g", ["d", "c"]) == {"d"}
        assert inbox.claim_many(tx, "other", ["d"]) == {"d"}
    with pytest.raises(MessageError), inbox.transaction() as tx:
        inbox.claim_many(tx, "g", ["e", "x" * 300])
    assert not inbox.seen("g", "e")


def test_a_bulk_claim_keeps_ids_that_mean_something_in_an_array_literal(sql_inbox: Any) -> None:
    """PostgreSQL claims a run as one array of ids: an id that reads as NULL, a separator, a
    brace, a quote or an escape in an array's text form must come back as itself, and only the
    new ones of a long run that half-overlaps the last."""
    inbox = sql_inbox
    odd = ["NULL", "null", "a,b", "{x}", '"q"', "back\\slash", " lead", "t\tab", "é😀", "x" * 255]
    with inbox.transaction() as tx:
        assert inbox.claim_many(tx, "g", odd) == set(odd)
    assert all(inbox.seen("g", m) for m in odd) and not inbox.seen("g", "x")
    first = [f"m{i}" for i in range(600)]
    with inbox.transaction() as tx:
        assert inbox.claim_many(tx, "g", first) == set(first)
    second = [f"m{i}" for i in range(300, 900)] + odd + ["new"] * 3
    with inbox.transaction() as tx:
        assert inbox.claim_many(tx, "g", second) == {f"m{i}" for i in range(600, 900)} | {"new"}


def test_redis_pipeline_effects_commit_with_the_mark(redis_inbox: Any) -> None:
    inbox = redis_inbox
    counter = inbox.prefix + "effect"
    for _ in range(3):
        with inbox.transaction() as tx:
            if inbox.claim(tx, "g", "m"):
                tx.pipeline.incr(counter)
    with pytest.raises(RuntimeError), inbox.transaction() as tx:
        assert inbox.claim(tx, "g", "m2")
        tx.pipeline.incr(counter)
        raise RuntimeError("handler failed")
    assert int(inbox.client.get(counter)) == 1
    assert not inbox.seen("g", "m2")


def test_open_inbox_picks_the_implementation_from_the_url(tmp_path: Path) -> None:
    box = open_inbox(f"sqlite:///{tmp_path / 'x.db'}")
    assert isinstance(box, SqlInbox)
    box.close()


@pytest.mark.postgres
def test_a_frozen_consumer_cannot_hold_a_message_forever() -> None:
    """A consumer frozen mid-transaction (SIGSTOP, a GC pause) holds the inbox row of the message
    it was on. Another consumer's claim of it fails fast and retriably instead of waiting on the
    lock, and the server ends the frozen session, after which the claim goes through."""
    import time

    from tests.conftest import PG_URL, require_service
    from zeroloss.errors import StoreError
    from zeroloss.inbox import SqlInbox

    require_service("postgres")
    table = f"ib_frozen_{int(time.time() * 1000) % 10**9}"
    zombie = SqlInbox(PG_URL, table=table, idle_in_transaction_timeout_s=2)
    survivor = SqlInbox(PG_URL, table=table, lock_timeout_s=0.3)
    zombie.create_schema()
    try:
        with pytest.raises(StoreError, match="commit"), zombie.transaction() as frozen:  # ended by the server
            assert zombie.claim(frozen, "g", "m-1")
            with pytest.raises(StoreError) as info, survivor.transaction() as tx:
                survivor.claim(tx, "g", "m-1")
            assert info.value.retriable and "lock" in str(info.value).lower()
            # The zombie now stays silent past its idle limit; the server ends its session.
            deadline = time.monotonic() + 30
            while True:
                try:
                    with survivor.transaction() as tx:
                        assert survivor.claim(tx, "g", "m-1")
                    break
                except StoreError:
                    assert time.monotonic() < deadline, "the frozen session was never ended"
                    time.sleep(0.2)
        assert survivor.seen("g", "m-1")
    finally:
        zombie.drop_schema()
        zombie.close()
        survivor.close()


@pytest.mark.postgres
@pytest.mark.parametrize("first_commits", [True, False], ids=["commits", "rolls-back"])
def test_a_bulk_claim_waits_for_another_consumer_s_claim_of_the_same_ids(first_commits: bool) -> None:
    """Two consumers with overlapping runs (a rebalance hands a partition over while its old owner
    is still in its transaction): the second's one array statement waits on the first's rows and
    claims exactly what the first did not commit, so each effect happens once."""
    from tests.waiting import wait_until

    require_service("postgres")
    table = f"zl_inbox_{uuid.uuid4().hex[:10]}"
    old, new = SqlInbox(PG_URL, table=table), SqlInbox(PG_URL, table=table)
    old.create_schema()
    got: list[set[str]] = []
    try:
        with contextlib.suppress(RuntimeError), old.transaction() as tx:
            assert old.claim_many(tx, "g", ["a", "b"]) == {"a", "b"}
            pid = tx.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()

            def second() -> None:
                with new.transaction() as tx2:
                    got.append(new.claim_many(tx2, "g", ["b", "c", "a"]))

            waiter = threading.Thread(target=second)
            waiter.start()
            with old.engine.connect() as probe:  # the second claim waits on a row lock the first holds
                wait_until(
                    lambda: (
                        probe.exec_driver_sql(
                            "SELECT count(*) FROM pg_locks w JOIN pg_locks h ON h.transactionid = w.transactionid "
                            f"AND h.granted AND NOT w.granted WHERE h.pid = {int(pid)}"
                        ).scalar_one()
                        > 0
                    ),
                    timeout_s=20,
                    what="the second claim to wait on the first's rows",
                )
            if not first_commits:
                raise RuntimeError("the old owner's handler fails: its claims are rolled back")
        waiter.join(20)
        assert not waiter.is_alive()
        assert got == ([{"c"}] if first_commits else [{"a", "b", "c"}])
        assert all(old.seen("g", m) for m in "abc")
    finally:
        old.drop_schema()
        old.close()
        new.close()


# Is the session with this id waiting for a row lock? (it blocks in the other consumer's claim)
_LOCK_WAIT = {
    "postgresql": ("SELECT pg_backend_pid()", "SELECT count(*) FROM pg_locks WHERE pid = {} AND NOT granted"),
    "mariadb": (
        "SELECT CONNECTION_ID()",
        "SELECT count(*) FROM information_schema.innodb_trx WHERE trx_mysql_thread_id = {} AND trx_state = 'LOCK WAIT'",
    ),
}


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("postgresql", marks=pytest.mark.postgres),
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ],
)
def test_bulk_claims_of_the_same_ids_in_opposite_orders_do_not_deadlock(kind: str) -> None:
    """Two consumers' runs can hold the same ids in different orders (the relay's duplicate
    copies, republished in another order, reach two competing consumers at once). Each bulk
    claim locks its ids in one order whatever the run's order: the second waits for the first
    instead of holding ``b`` while it waits for ``a`` — a deadlock the database breaks after a
    second (PostgreSQL's deadlock_timeout) by failing one run, which then goes one message at a
    time. Reproduced with plain runs of 500: 17 deadlocks in 20 rounds before the order was fixed."""
    from tests.waiting import wait_until

    require_service("postgres" if kind == "postgresql" else kind)
    url = PG_URL if kind == "postgresql" else MARIADB_URL
    table = f"zl_inbox_{uuid.uuid4().hex[:10]}"
    first, second = SqlInbox(url, table=table), SqlInbox(url, table=table)
    first.create_schema()
    whoami, waiting = _LOCK_WAIT[kind]
    got: list[object] = []
    session: list[int] = []
    try:
        with first.transaction() as tx:
            assert first.claim_many(tx, "g", ["a"]) == {"a"}

            def other() -> None:
                try:
                    with second.transaction() as tx2:
                        session.append(int(tx2.exec_driver_sql(whoami).scalar_one()))
                        got.append(second.claim_many(tx2, "g", ["b", "a"]))
                except Exception as exc:  # a deadlock victim: the assertion below names it
                    got.append(exc)

            waiter = threading.Thread(target=other)
            waiter.start()
            with first.engine.connect() as probe:
                wait_until(
                    lambda: bool(session) and probe.exec_driver_sql(waiting.format(session[0])).scalar_one() > 0,
                    timeout_s=20,
                    what="the second run's claim to wait on the first's row",
                )
            # the rest of the first run's ids: with the second holding "b" while it waits for "a",
            # this would wait on it in turn
            assert first.claim_many(tx, "g", ["b"]) == {"b"}
        waiter.join(20)
        assert not waiter.is_alive()
        assert got == [set()], f"the second run failed: {got}"
    finally:
        first.drop_schema()
        first.close()
        second.close()


@pytest.mark.postgres
def test_a_bulk_claim_uses_the_table_an_engine_s_schema_translate_map_names() -> None:
    """An app's Engine with one schema per tenant (``schema_translate_map``): every statement of
    the inbox — the bulk claim too — must use the tenant's table. Claims written to another
    table (the search path's one of the same name) made one tenant's messages duplicates of
    another's (lost), and left a redelivery free to be claimed again (a second effect)."""
    require_service("postgres")
    base = sa.create_engine(sa.make_url(PG_URL).set(drivername="postgresql+psycopg"))
    suffix = uuid.uuid4().hex[:8]
    schemas, table = [f"zl_tenant1_{suffix}", f"zl_tenant2_{suffix}"], f"zl_inbox_{suffix}"
    with base.begin() as c:  # the same table on the search path, where untranslated SQL goes
        for s in schemas:
            c.exec_driver_sql(f"CREATE SCHEMA {s}")
    SqlInbox(base, table=table).create_schema()
    tenants = [SqlInbox(base.execution_options(schema_translate_map={None: s}), table=table) for s in schemas]
    try:
        for t in tenants:
            t.create_schema()
            with t.transaction() as tx:
                assert t.claim_many(tx, "g", ["x", "y"]) == {"x", "y"}  # each tenant's own first claim
            assert t.seen("g", "x") and t.seen("g", "y")
            with t.transaction() as tx:
                assert t.claim(tx, "g", "x") is False  # the one-at-a-time path finds the bulk claim
        assert not SqlInbox(base, table=table).seen("g", "x")
    finally:
        with base.begin() as c:
            c.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
            for s in schemas:
                c.exec_driver_sql(f"DROP SCHEMA {s} CASCADE")
        base.dispose()
