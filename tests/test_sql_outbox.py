"""SQL-specific behaviour of SqlOutbox: transactions, URLs and errors, several relays, leases, purge."""

from __future__ import annotations

import asyncio
import logging
import random
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from tests.conftest import MARIADB_URL, PG_URL, require_service
from tests.waiting import wait_until
from zeroloss.errors import ConfigError, MessageError, MissingExtraError, StoreError, UnknownMessageError
from zeroloss.outbox.base import Delivered, State
from zeroloss.outbox.sql import SqlOutbox
from zeroloss.sqlurl import normalize_url

SQL_KINDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
    pytest.param("mariadb", id="mariadb", marks=pytest.mark.mariadb),
]
SERVER_KINDS = SQL_KINDS[1:]
MakeOutbox = Callable[..., SqlOutbox]


def _url(kind: str, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'outbox.db'}"
    require_service("postgres" if kind == "postgresql" else "mariadb")
    return PG_URL if kind == "postgresql" else MARIADB_URL


@pytest.fixture(params=SQL_KINDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return _url(request.param, tmp_path)


@pytest.fixture
def make_outbox(url: str) -> Iterator[MakeOutbox]:
    """Each call is another SqlOutbox (another "relay", own engine) on the same fresh table."""
    table = f"zl_test_{uuid.uuid4().hex[:10]}"
    made: list[SqlOutbox] = []

    def make(**kw: Any) -> SqlOutbox:
        outbox = SqlOutbox(url, table=table, **kw)
        if not made:
            outbox.create_schema()
        made.append(outbox)
        return outbox

    yield make
    if made:
        made[0].drop_schema()
    for outbox in made:
        outbox.close()


@pytest.fixture
def business(make_outbox: MakeOutbox) -> Iterator[tuple[SqlOutbox, sa.Table]]:
    """An outbox plus an application table in the same database."""
    outbox = make_outbox()
    biz = sa.Table(
        f"zl_biz_{uuid.uuid4().hex[:10]}",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("note", sa.String(50)),
    )
    biz.create(outbox.engine)
    yield outbox, biz
    biz.drop(outbox.engine)


def _count(outbox: SqlOutbox) -> int:
    with outbox.engine.connect() as conn:
        return int(conn.scalar(sa.select(sa.func.count()).select_from(outbox.table)) or 0)


# -- the producer's transaction ----------------------------------------------------------------


def test_add_in_a_rolled_back_transaction_leaves_no_message(business: tuple[SqlOutbox, sa.Table]) -> None:
    outbox, biz = business
    with outbox.engine.connect() as conn:
        tx = conn.begin()
        conn.execute(sa.insert(biz).values(id=1, note="order"))
        mid = outbox.add(conn, topic="orders", value=b"x")
        tx.rollback()
    with pytest.raises(UnknownMessageError):
        outbox.get(mid)
    assert _count(outbox) == 0
    with Session(outbox.engine) as session:
        session.execute(sa.insert(biz).values(id=2, note="order"))
        outbox.add(session, topic="orders", value=b"y")
        session.rollback()
    assert _count(outbox) == 0


def test_add_commits_together_with_the_business_row(business: tuple[SqlOutbox, sa.Table]) -> None:
    outbox, biz = business
    with outbox.engine.begin() as conn:
        conn.execute(sa.insert(biz).values(id=1, note="order 1"))
        mid = outbox.add(conn, topic="orders", value=b"o1", key=b"cust-7", headers=[("a", b"\xff"), ("a", b"")])
    with Session(outbox.engine) as session, session.begin():
        session.execute(sa.insert(biz).values(id=2, note="order 2"))
        more = outbox.add_many(session, [{"topic": "orders", "value": b"o2"}, {"topic": "audit", "value": b""}])
    with outbox.engine.connect() as conn:
        assert conn.scalars(sa.select(biz.c.id).order_by(biz.c.id)).all() == [1, 2]
    state, msg = outbox.get(mid)
    assert state is State.PENDING
    assert (msg.key, msg.headers) == (b"cust-7", (("a", b"\xff"), ("a", b"")))
    assert [m.id for m in outbox.list(State.PENDING)] == [mid, *more]


def test_invalid_messages_are_refused_before_anything_is_written(make_outbox: MakeOutbox) -> None:
    outbox = make_outbox()
    outbox.max_message_bytes = 10
    with outbox.engine.begin() as conn:
        with pytest.raises(MessageError, match="exceeds the limit"):
            outbox.add(conn, topic="t", value=b"x" * 11)
        with pytest.raises(MessageError, match="topic"):
            outbox.add_many(conn, [{"topic": "ok", "value": b"1"}, {"topic": "bad topic", "value": b"2"}])
        with pytest.raises(ConfigError, match="Connection, Session"):
            outbox.add(outbox.engine, topic="t", value=b"x")
    assert _count(outbox) == 0


@pytest.mark.postgres
def test_async_add_joins_the_callers_async_transaction_on_postgresql(tmp_path: Path) -> None:
    pytest.importorskip("greenlet", reason="SQLAlchemy's asyncio support needs greenlet")
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    outbox = SqlOutbox(_url("postgresql", tmp_path), table=f"zl_test_{uuid.uuid4().hex[:10]}")
    outbox.create_schema()

    async def produce() -> tuple[str, str, str, list[str]]:
        aengine = create_async_engine(normalize_url(PG_URL).replace("+psycopg:", "+psycopg_async:"))
        try:
            async with aengine.begin() as conn:
                committed = await outbox.add(conn, topic="t", value=b"a", key=b"k")
            async with aengine.connect() as conn:
                tx = await conn.begin()
                rolled_back = await outbox.add(conn, topic="t", value=b"b")
                await tx.rollback()
            async with AsyncSession(aengine) as session, session.begin():
                in_session = await outbox.add(session, topic="t", value=b"c", key=b"k")
                many = await outbox.add_many(session, [{"topic": "t", "value": b"d"}])
        finally:
            await aengine.dispose()
        return committed, rolled_back, in_session, many

    try:
        committed, rolled_back, in_session, many = asyncio.run(produce())
        assert outbox.get(committed)[1].key == b"k"
        with pytest.raises(UnknownMessageError):
            outbox.get(rolled_back)
        assert [m.id for m in outbox.claim(10, lease_s=30)] == [committed, in_session, *many]
    finally:
        outbox.drop_schema()
        outbox.close()


# -- URLs and database errors ------------------------------------------------------------------


def test_urls_as_users_write_them() -> None:
    assert normalize_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("postgres://u:pw@h:5433/db") == "postgresql+psycopg://u:pw@h:5433/db"
    assert normalize_url("mariadb://root@h/db") == "mysql+pymysql://root@h/db?charset=utf8mb4"
    assert normalize_url("mysql://root@h/db?charset=latin1") == "mysql+pymysql://root@h/db?charset=latin1"
    assert normalize_url("sqlite:///app.db") == "sqlite+pysqlite:///app.db"


@pytest.mark.parametrize("bad", ["foo://x", "not a url", "postgresql://u@h:notaport/db", "redis://h/0"])
def test_unusable_urls_raise_config_error_saying_what_is_accepted(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"accepted: sqlite:///path\.db, postgresql://"):
        SqlOutbox(bad)


@pytest.mark.parametrize(
    ("url", "package", "extra"),
    [
        ("postgresql://u@h/db", "psycopg", "postgres"),
        ("mariadb://u@h/db", "pymysql", "mysql"),
    ],
)
def test_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch, url: str, package: str, extra: str) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # import now fails as if not installed
    with pytest.raises(MissingExtraError, match=rf"zeroloss\[{extra}\]") as err:
        SqlOutbox(url)
    assert (err.value.package, err.value.extra) == (package, extra)


def test_sqlite_in_a_missing_directory_is_explained(tmp_path: Path) -> None:
    outbox = SqlOutbox(f"sqlite:///{tmp_path}/nonexistent/dir/x.db")  # nothing connects yet
    with pytest.raises(StoreError, match="directory exists") as err:
        outbox.create_schema()
    assert not err.value.retriable
    outbox.close()


def test_unreachable_server_is_retriable_and_the_password_is_masked() -> None:
    outbox = SqlOutbox("postgresql://zl:s3cret@127.0.0.1:1/test")
    with pytest.raises(StoreError, match=r"postgresql://zl:\*\*\*@127\.0\.0\.1:1/test") as err:
        outbox.claim(10, lease_s=30)
    assert err.value.retriable
    assert "s3cret" not in str(err.value)
    outbox.close()


def test_a_missing_table_tells_to_run_zeroloss_init(url: str) -> None:
    outbox = SqlOutbox(url, table=f"zl_missing_{uuid.uuid4().hex[:8]}")
    with pytest.raises(StoreError, match=r"does not exist .*zeroloss init --source"):
        outbox.claim(10, lease_s=30)
    with outbox.engine.connect() as conn, pytest.raises(StoreError, match="zeroloss init"):
        outbox.add(conn, topic="t", value=b"x")
    outbox.close()


def test_create_schema_is_idempotent(make_outbox: MakeOutbox) -> None:
    outbox = make_outbox()
    outbox.create_schema()
    assert _count(outbox) == 0


# -- several relays ----------------------------------------------------------------------------


@pytest.mark.slow
def test_succeed_and_claim_records_the_batch_and_claims_its_keys_next_messages(make_outbox: MakeOutbox) -> None:
    """One transaction: the claim sees the batch it records as delivered, so a key's next
    message comes in the same call; nothing delivered is left ``sending``."""
    outbox = make_outbox()
    with outbox.engine.begin() as conn:
        ids = outbox.add_many(conn, [{"topic": "t", "value": b"%d" % i, "key": b"k"} for i in range(3)])
    first = outbox.claim(1, lease_s=60)
    assert [m.id for m in first] == ids[:1]
    assert outbox.claim(10, lease_s=60) == []  # k's next waits while its first is sending
    second = outbox.succeed_and_claim([Delivered(first[0], "t/0/0")], 1, lease_s=60)
    assert [m.id for m in second] == ids[1:2]
    assert [d.location for d in outbox.list_success(limit=10)] == ["t/0/0"]
    last = outbox.succeed_and_claim([Delivered(second[0], "t/0/1")], 10, lease_s=60)
    assert [m.id for m in last] == ids[2:]
    assert outbox.succeed_and_claim([Delivered(last[0], "t/0/2")], 10, lease_s=60) == []
    assert outbox.stats().counts[State.SUCCESS] == 3 and outbox.stats().counts[State.SENDING] == 0


@pytest.mark.parametrize("merged", [False, True], ids=["claim-then-succeed", "succeed-and-claim"])
def test_two_relays_claim_disjointly_completely_and_in_key_order(make_outbox: MakeOutbox, merged: bool) -> None:
    """Two SqlOutbox instances, two threads each, 2000 messages over 40 keys (+ keyless), random
    batch sizes and some retries. Intentions are recorded *before* the database call, so a claim
    that sees a message as claimable proves its earlier same-key messages were already released.
    ``merged``: each batch's deliveries are recorded by the next claim's transaction, as the relay
    does (``succeed_and_claim``; fewer messages: the same interleavings, less time)."""
    relays = [make_outbox(), make_outbox()]
    n_keys, total = 40, 600 if merged else 2000
    keys = [None if i % 5 == 0 else b"k%d" % (i % n_keys) for i in range(total)]
    with relays[0].engine.begin() as conn:
        ids = relays[0].add_many(conn, [{"topic": "t", "value": b"%d" % i, "key": k} for i, k in enumerate(keys)])
    key_of = dict(zip(ids, keys, strict=True))
    by_key: dict[bytes, list[str]] = {}
    for mid, k in zip(ids, keys, strict=True):
        if k is not None:
            by_key.setdefault(k, []).append(mid)

    lock = threading.Lock()
    done: set[str] = set()
    held: set[str] = set()
    problems: list[str] = []
    retried = [0]

    def relay(outbox: SqlOutbox, seed: int) -> None:
        rnd = random.Random(seed)
        deadline = time.monotonic() + 240
        unrecorded: list[Delivered] = []  # merged: delivered, recorded with the next claim
        try:
            while time.monotonic() < deadline:
                with lock:
                    if len(done) == total and not unrecorded:
                        return
                if merged:
                    batch = outbox.succeed_and_claim(unrecorded, rnd.randint(1, 40), lease_s=600)
                    unrecorded = []
                else:
                    batch = outbox.claim(rnd.randint(1, 40), lease_s=600)
                if not batch:
                    time.sleep(0.005)  # poll: the rest is held by the other relays
                    continue
                batch_ids = {m.id for m in batch}
                with lock:
                    for m in batch:
                        if m.id in held or m.id in done:
                            problems.append(f"{m.id} claimed while held or done")
                        k = key_of[m.id]
                        if k is not None:
                            early = [e for e in by_key[k] if e < m.id and e not in done and e not in batch_ids]
                            if early:
                                problems.append(f"{m.id} claimed before earlier same-key {early[0]}")
                        held.add(m.id)
                retry_keys = {key_of[m.id] for m in batch if key_of[m.id] and not m.attempts and rnd.random() < 0.05}
                again = [m for m in batch if key_of[m.id] in retry_keys]
                ok = [m for m in batch if key_of[m.id] not in retry_keys]
                with lock:
                    held.difference_update(m.id for m in batch)
                    done.update(m.id for m in ok)
                    retried[0] += len(again)
                outbox.retry([replace(m, attempts=m.attempts + 1, not_before=0.0, last_error="x") for m in again])
                if merged:
                    unrecorded = [Delivered(m, f"t/0/{m.id}") for m in ok]
                else:
                    outbox.succeed([Delivered(m, f"t/0/{m.id}") for m in ok])
        except BaseException as exc:
            problems.append(f"relay crashed: {exc!r}")

    threads = [threading.Thread(target=relay, args=(relays[i % 2], i)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert problems == []
    assert done == set(ids)
    stats = relays[1].stats()
    assert stats.counts[State.SUCCESS] == total
    assert sum(stats.counts.values()) == total
    assert retried[0] > 0


def test_sqlite_claims_are_disjoint_across_processes(tmp_path: Path) -> None:
    url, table = f"sqlite:///{tmp_path / 'o.db'}", "zl_procs"
    outbox = SqlOutbox(url, table=table)
    outbox.create_schema()
    with outbox.engine.begin() as conn:
        ids = outbox.add_many(conn, [{"topic": "t", "value": b"%d" % i} for i in range(600)])
    go = tmp_path / "go"
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from zeroloss.outbox.sql import SqlOutbox
        o = SqlOutbox({url!r}, table={table!r})
        deadline = time.monotonic() + 60
        while not Path({str(go)!r}).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        while batch := o.claim(3, lease_s=600):
            print(*(m.id for m in batch), flush=True)
        o.close()
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    go.touch()
    outputs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    claimed = [i for out in outputs for i in out]
    assert len(claimed) == len(set(claimed)) and set(claimed) == set(ids)
    outbox.close()


def test_retry_and_fail_by_a_relay_that_lost_its_lease_change_nothing(
    make_outbox: MakeOutbox, caplog: pytest.LogCaptureFixture
) -> None:
    slow, other = make_outbox(), make_outbox()
    with slow.engine.begin() as conn:
        mid = slow.add(conn, topic="t", value=b"x", key=b"K")
    [mine] = slow.claim(1, lease_s=0.05)
    wait_until(lambda: other.recover().lease_expired == 1, what="the lease to expire")
    caplog.set_level(logging.WARNING, logger="zeroloss.outbox.sql")
    slow.retry([replace(mine, attempts=1, not_before=time.time() + 3600, last_error="late")])
    assert other.get(mid)[0] is State.PENDING  # recovered, not claimed: still untouched
    [theirs] = other.claim(1, lease_s=600)
    slow.retry([replace(mine, attempts=1, not_before=time.time() + 3600, last_error="late")])
    slow.fail([replace(mine, attempts=9, last_error="late")])
    state, msg = other.get(mid)
    assert (state, msg.attempts, msg.last_error) == (State.SENDING, 0, None)
    assert mid in caplog.text and "no longer holds it" in caplog.text
    other.retry([replace(theirs, attempts=1, not_before=0.0, last_error="mine")])
    assert other.get(mid)[1].last_error == "mine"


@pytest.mark.parametrize("skew_s", [3600.0, -3600.0], ids=["fast-clock", "slow-clock"])
def test_relays_with_skewed_clocks_agree_on_leases_and_backoffs(make_outbox: MakeOutbox, skew_s: float) -> None:
    """Leases and backoffs follow the database's clock (issue 11, item 13): a relay whose clock is
    an hour fast must not expire another's live lease, one an hour slow must not see a backoff as due
    early or a lease as alive long after it ran out."""
    honest, skewed = make_outbox(), make_outbox(clock=lambda: time.time() + skew_s)
    with honest.engine.begin() as conn:
        a = honest.add(conn, topic="t", value=b"a", key=b"A")
        b = honest.add(conn, topic="t", value=b"b", key=b"B")
    [held] = honest.claim(1, lease_s=600)
    assert skewed.recover().lease_expired == 0  # fast clock: would have expired it
    assert skewed.get(a)[0] is State.SENDING
    [mb] = skewed.claim(1, lease_s=600)
    assert mb.id == b
    skewed.retry([replace(mb, attempts=1, not_before=skewed.now() + 600, last_error="backing off")])
    assert honest.claim(10, lease_s=600) == []  # due in ten minutes by the database's clock
    assert abs(skewed.now() - honest.now()) < 5
    honest.retry([replace(held, attempts=1, not_before=honest.now() - 1, last_error="x")])
    assert [m.id for m in skewed.claim(10, lease_s=600)] == [a]  # slow clock: sees it as due


def test_requeue_with_a_non_failed_id_changes_nothing(make_outbox: MakeOutbox) -> None:
    outbox = make_outbox()
    with outbox.engine.begin() as conn:
        a = outbox.add(conn, topic="t", value=b"a")
        b = outbox.add(conn, topic="t", value=b"b")
    [ma, mb] = outbox.claim(2, lease_s=60)
    outbox.fail([replace(ma, attempts=3, last_error="bad")])
    with pytest.raises(UnknownMessageError, match=b):
        outbox.requeue([a, b])
    assert outbox.get(a)[0] is State.FAILED
    assert outbox.requeue([a]) == 1
    state, msg = outbox.get(a)
    assert (state, msg.attempts, msg.not_before, msg.last_error) == (State.PENDING, 0, 0.0, "bad")
    assert mb.id == b


def test_purge_deletes_in_chunks_and_keeps_recent_and_unsent(make_outbox: MakeOutbox) -> None:
    outbox = make_outbox()
    with outbox.engine.begin() as conn:
        outbox.add_many(conn, [{"topic": "t", "value": b"%d" % i} for i in range(27)])
    sent = outbox.claim(25, lease_s=60)
    outbox.succeed([Delivered(m, "t/0/0") for m in sent])
    assert outbox.purge_success(older_than_s=3600, chunk=10) == 0
    deletes: list[str] = []

    def spy(_conn: Any, _cur: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE"):
            deletes.append(statement)

    sa.event.listen(outbox.engine, "before_cursor_execute", spy)
    assert outbox.purge_success(older_than_s=0, chunk=10) == 25
    assert len(deletes) == 3
    counts = outbox.stats().counts
    assert (counts[State.SUCCESS], counts[State.PENDING]) == (0, 2)


def test_stats_counts_every_state_and_expired_leases(make_outbox: MakeOutbox) -> None:
    outbox = make_outbox()
    with outbox.engine.begin() as conn:
        outbox.add_many(conn, [{"topic": "t", "value": b"1"}, {"topic": "t", "value": b"2"}])
    outbox.claim(1, lease_s=0.01)
    wait_until(lambda: outbox.stats().expired_leases == 1, what="an expired lease")
    stats = outbox.stats()
    assert set(stats.counts) == set(State)
    assert (stats.counts[State.SENDING], stats.counts[State.PENDING], stats.counts[State.DOUBT]) == (1, 1, 0)
    assert stats.oldest_pending_age_s is not None and stats.oldest_pending_age_s >= 0


@pytest.mark.postgres
def test_postgresql_claim_scan_uses_the_pending_index(tmp_path: Path) -> None:
    outbox = SqlOutbox(_url("postgresql", tmp_path), table=f"zl_test_{uuid.uuid4().hex[:10]}")
    outbox.create_schema()
    try:
        with outbox.engine.begin() as conn:
            outbox.add_many(conn, [{"topic": "t", "value": b"x"} for _ in range(2000)])
        outbox.succeed([Delivered(m, "t/0/0") for m in outbox.claim(1900, lease_s=60)])  # mostly history
        with outbox.engine.begin() as conn:
            conn.exec_driver_sql(f"ANALYZE {outbox.table.name}")
            conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
            stmt = outbox.claim_statement(time.time(), 50)
            sql = str(stmt.compile(dialect=outbox.engine.dialect, compile_kwargs={"literal_binds": True}))
            plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + sql))
        # The partial index of pending rows: the delivered history is not in it, nothing to skip.
        assert f"ix_{outbox.table.name}_pending" in plan and "Sort" not in plan, plan
        assert "SKIP LOCKED" in sql
    finally:
        outbox.drop_schema()
        outbox.close()


def test_a_deadlocked_transaction_is_retried_whole_and_other_errors_are_translated(tmp_path: Path) -> None:
    outbox = SqlOutbox(f"sqlite:///{tmp_path / 'o.db'}")
    calls: list[int] = []

    def deadlock_once(conn: sa.Connection) -> int:
        calls.append(1)
        if len(calls) == 1:
            raise sa.exc.OperationalError("UPDATE", {}, Exception(1213, "Deadlock found"))
        return 42

    assert outbox._tx(deadlock_once, "test") == 42
    assert len(calls) == 2

    def always(conn: sa.Connection) -> int:
        raise sa.exc.OperationalError("UPDATE", {}, Exception(1213, "Deadlock found"))

    with pytest.raises(StoreError, match=r"cannot test in sqlite:///.*Deadlock found") as err:
        outbox._tx(always, "test")
    assert err.value.retriable
    outbox.close()


def test_an_idle_relay_is_woken_by_a_commit_on_postgresql() -> None:
    require_service("postgres")
    outbox = SqlOutbox(PG_URL, table=f"zl_wake_{uuid.uuid4().hex[:8]}")
    outbox.create_schema(notify=True)
    outbox.create_schema(notify=True)  # idempotent: the trigger is there, nothing is touched
    stop = threading.Event()
    woken = threading.Event()
    try:
        outbox.wait_for_work(0.01, stop)  # starts listening (and times out: nothing happened)

        def idle_relay() -> None:
            outbox.wait_for_work(600, stop)  # a timeout far beyond the join below
            woken.set()

        t = threading.Thread(target=idle_relay)
        t.start()
        with outbox.engine.begin() as conn:
            outbox.add(conn, topic="t", value=b"v")
        t.join(60)
        assert woken.is_set(), "the commit's NOTIFY did not wake the waiting relay"
    finally:
        stop.set()
        outbox.drop_schema()
        try:
            with outbox.engine.connect() as conn:  # drop_schema removed the trigger's function too
                assert (
                    conn.exec_driver_sql(
                        "SELECT count(*) FROM pg_proc WHERE proname = %(p)s", {"p": f"{outbox.channel}_notify"}
                    ).scalar()
                    == 0
                )
        finally:
            outbox.close()


def test_where_nothing_notifies_the_relay_polls(tmp_path: Path) -> None:
    outbox = SqlOutbox(f"sqlite:///{tmp_path / 'o.db'}")
    outbox.create_schema()
    stop = threading.Event()
    stop.set()
    outbox.wait_for_work(600, stop)  # returns at once: the relay is stopping
    outbox.close()


def test_notify_is_opt_in_and_for_postgresql_only(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from zeroloss.cli import main

    require_service("postgres")
    table = f"zl_nt_{uuid.uuid4().hex[:8]}"
    outbox = SqlOutbox(PG_URL, table=table)

    def triggers() -> int:
        with outbox.engine.connect() as conn:
            return int(
                conn.exec_driver_sql(
                    "SELECT count(*) FROM pg_trigger WHERE tgname = %(t)s", {"t": f"{outbox.channel}_notify"}
                ).scalar_one()
            )

    try:
        assert CliRunner().invoke(main, ["init", "--source", PG_URL, "--table", table]).exit_code == 0
        assert triggers() == 0  # NOTIFY serialises commits: not without asking
        res = CliRunner().invoke(main, ["init", "--source", PG_URL, "--table", table, "--notify"])
        assert res.exit_code == 0, res.output
        assert triggers() == 1
        res = CliRunner().invoke(main, ["init", "--source", f"sqlite:///{tmp_path / 'o.db'}", "--notify"])
        assert res.exit_code == 2 and "needs PostgreSQL" in res.output
    finally:
        outbox.drop_schema()
        outbox.close()


def test_a_claim_still_works_with_more_blocked_keys_than_the_server_takes_parameters(
    make_outbox: MakeOutbox,
) -> None:
    """70,000 keys each parked behind a failed message: more than PostgreSQL's 65,535 bind
    parameters (SQLite: 32,766). The claim must still hand out the other keys' messages."""
    from zeroloss.message import new_message
    from zeroloss.outbox.sql.table import row_of

    outbox = make_outbox()
    rows = []
    for i in range(70_000):
        row = row_of(new_message("t", b"x", key=b"parked-%d" % i))
        rows.append({**row, "state": State.FAILED.value})
    with outbox.engine.begin() as conn:
        for start in range(0, len(rows), 5000):
            conn.execute(outbox.table.insert(), rows[start : start + 5000])
        parked = outbox.add(conn, topic="t", value=b"p", key=b"parked-7")  # behind its failed one
        free = outbox.add(conn, topic="t", value=b"f", key=b"free")
        unkeyed = outbox.add(conn, topic="t", value=b"u")
    got = outbox.claim(100, lease_s=30)
    assert [m.id for m in got] == [free, unkeyed]
    assert outbox.get(parked)[0] is State.PENDING


@pytest.mark.postgres
@pytest.mark.parametrize("isolation", ["AUTOCOMMIT", "REPEATABLE READ"])
def test_a_claim_on_the_apps_engine_is_one_read_committed_transaction(isolation: str) -> None:
    """The app's Engine may autocommit or run REPEATABLE READ; the outbox's own transactions run
    READ COMMITTED whatever it says. On an autocommit engine a claim's row locks ended with each
    statement, so another relay's claim took the same rows (4 relays, 30k messages over 100
    keys: thousands of duplicates and keys out of order)."""
    require_service("postgres")
    owned = SqlOutbox(PG_URL, table=f"zl_iso_{uuid.uuid4().hex[:10]}")
    owned.create_schema()
    app = sa.create_engine(normalize_url(PG_URL), isolation_level=isolation)
    shared = SqlOutbox(app, table=owned.table.name)
    with owned.engine.begin() as conn:
        ids = owned.add_many(conn, [{"topic": "t", "value": b"1", "key": b"k"}])
    free_during_claim: list[list[str]] = []

    def after_scan(conn: object, cursor: object, statement: str, *rest: object) -> None:
        if "FOR UPDATE" in statement and not free_during_claim:
            with owned.engine.connect() as other, other.begin():
                t = owned.table
                free_during_claim.append(list(other.scalars(sa.select(t.c.id).with_for_update(skip_locked=True))))

    sa.event.listen(app, "after_cursor_execute", after_scan)
    try:
        got = [m.id for m in shared.claim(10, lease_s=60)]
        level = shared._tx(lambda c: c.exec_driver_sql("SHOW transaction_isolation").scalar(), "read", write=False)
    finally:
        sa.event.remove(app, "after_cursor_execute", after_scan)
        shared.close()
        app.dispose()
        owned.drop_schema()
        owned.close()
    assert got == ids
    assert free_during_claim == [[]]  # its row still locked after the scan, until the claim commits
    assert level == "read committed"
