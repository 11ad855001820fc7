"""The SQL outbox's statements on MariaDB and SQLite: which index each of a claim's reads goes
through (not the delivered history), the delivered mark as one statement, ``add`` as one INSERT."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from tests.conftest import MARIADB_URL, require_service
from zeroloss.outbox.base import Delivered
from zeroloss.outbox.sql import SqlOutbox


@pytest.fixture
def mariadb() -> Iterator[SqlOutbox]:
    require_service("mariadb")
    outbox = SqlOutbox(MARIADB_URL, table=f"zl_test_{uuid.uuid4().hex[:10]}")
    outbox.create_schema()
    yield outbox
    outbox.drop_schema()
    outbox.close()


@pytest.fixture
def sqlite(tmp_path: Path) -> Iterator[SqlOutbox]:
    outbox = SqlOutbox(f"sqlite:///{tmp_path / 'outbox.db'}", table="zl_test")
    outbox.create_schema()
    yield outbox
    outbox.close()


def _statements(outbox: SqlOutbox, call: Any) -> list[tuple[str, Any]]:
    """The SQL and parameters of every statement ``call`` runs on the outbox's engine."""
    seen: list[tuple[str, Any]] = []

    def note(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        seen.append((statement, params))

    event.listen(outbox.engine, "before_cursor_execute", note)
    try:
        call()
    finally:
        event.remove(outbox.engine, "before_cursor_execute", note)
    return seen


@pytest.mark.mariadb
def test_mariadb_claim_reads_go_through_the_backlog_indexes_not_the_history(mariadb: SqlOutbox) -> None:
    """Without FORCE INDEX the optimizer walked the primary key from the oldest (delivered) row
    for the candidates and the re-check, and the whole table for the blocked keys."""
    outbox = mariadb
    with outbox.engine.begin() as conn:
        outbox.add_many(conn, [{"topic": "t", "value": b"x", "key": b"k%d" % (i % 10)} for i in range(3000)])
    for _ in range(4):  # 2,000 delivered, 1,000 pending
        outbox.succeed([Delivered(m, "t/0/0") for m in outbox.claim(500, lease_s=60)])
    with outbox.engine.begin() as conn:
        conn.exec_driver_sql(f"ANALYZE TABLE {outbox.table.name}")
    reads = [(s, p) for s, p in _statements(outbox, lambda: outbox.claim(100, lease_s=60)) if s.startswith("SELECT")]
    table = outbox.table.name
    plans = {}
    with outbox.engine.connect() as conn:
        for sql, params in reads:
            if "information_schema" in sql or "UNIX_TIMESTAMP" in sql:
                continue
            rows = conn.exec_driver_sql("EXPLAIN " + sql.replace(" FOR UPDATE SKIP LOCKED", ""), params).all()
            plans[sql] = [(r.type, r.key) for r in rows if r.table == table]
    assert len(plans) == 3, plans  # the blocked keys, the candidates, the re-check
    for sql, plan in plans.items():
        assert plan and all(kind != "ALL" and key != "PRIMARY" for kind, key in plan), (sql, plan)
        assert all(key in (f"ix_{table}_claim", f"ix_{table}_wait") for _, key in plan), (sql, plan)


def test_sqlite_candidate_scan_reads_pending_ids_in_order_without_sorting(sqlite: SqlOutbox) -> None:
    """Through ix_wait SQLite read every due pending row and sorted them all for each claim
    (with no statistics, as an app's database is unless someone runs ANALYZE)."""
    outbox = sqlite
    with outbox.engine.begin() as conn:
        outbox.add_many(conn, [{"topic": "t", "value": b"x", "key": b"k%d" % (i % 10)} for i in range(3000)])
    outbox.succeed([Delivered(m, "t/0/0") for m in outbox.claim(2000, lease_s=60)])
    with outbox.engine.begin() as conn:
        stmt = outbox.claim_statement(outbox.now(), 50, ("a" * 32,))
        sql = str(stmt.compile(dialect=outbox.engine.dialect, compile_kwargs={"literal_binds": True}))
        plan = " / ".join(str(r[3]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql))
    assert "ix_zl_test_claim" in plan and "TEMP B-TREE" not in plan, plan


@pytest.mark.mariadb
def test_mariadb_claims_without_the_hinted_indexes_still_deliver_in_key_order(mariadb: SqlOutbox) -> None:
    """A table whose claim/wait indexes an operator dropped: FORCE INDEX naming them would be an
    error, so the claim reads as the optimizer chooses."""
    outbox = mariadb
    with outbox.engine.begin() as conn:
        for suffix in ("claim", "wait"):
            conn.exec_driver_sql(f"DROP INDEX ix_{outbox.table.name}_{suffix} ON {outbox.table.name}")
        ids = outbox.add_many(conn, [{"topic": "t", "value": b"%d" % i, "key": b"k%d" % (i % 3)} for i in range(30)])
    got: list[str] = []
    batch = outbox.claim(7, lease_s=60)
    while batch:
        got += [m.id for m in batch]
        batch = outbox.succeed_and_claim([Delivered(m, "t/0/0") for m in batch], 7, lease_s=60)
    assert got == ids


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)])
def test_delivered_mark_is_one_statement_and_keeps_every_location(kind: str, request: pytest.FixtureRequest) -> None:
    """MariaDB: one UPDATE over JSON_TABLE (PyMySQL's executemany sent one UPDATE per row)."""
    outbox: SqlOutbox = request.getfixturevalue(kind)
    with outbox.engine.begin() as conn:
        outbox.add_many(conn, [{"topic": "t", "value": b"x"} for _ in range(300)])
    claimed = outbox.claim(300, lease_s=60)
    where = {m.id: f"t/0/{n} 'q\" \\ é ✓" for n, m in enumerate(claimed)}
    ran = _statements(outbox, lambda: outbox.succeed([Delivered(m, where[m.id]) for m in claimed]))
    updates = [s for s, _ in ran if s.lstrip().upper().startswith("UPDATE")]
    if kind == "mariadb":  # not an executemany: PyMySQL sends those one statement per row
        assert len(updates) == 1 and "JSON_TABLE" in updates[0], updates
    assert all(outbox.location(i) == loc for i, loc in where.items())
    assert outbox.stats().counts.get(next(s for s in outbox.states if s.value == "success")) == 300
    # Delivered twice (a relay that lost its lease): the first record stays.
    outbox.succeed([Delivered(claimed[0], "t/9/9")])
    assert outbox.location(claimed[0].id) == where[claimed[0].id]


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)])
def test_add_is_one_insert(kind: str, request: pytest.FixtureRequest) -> None:
    outbox: SqlOutbox = request.getfixturevalue(kind)
    with outbox.engine.begin() as conn:
        ran = _statements(outbox, lambda: outbox.add(conn, topic="t", value=b"1", key="k", headers={"h": b"\0"}))
    assert len(ran) == 1 and ran[0][0].startswith("INSERT"), ran
    (first,) = outbox.claim(10, lease_s=60)
    assert (first.topic, first.value, first.key, first.headers, first.attempts) == ("t", b"1", b"k", (("h", b"\0"),), 0)


@pytest.fixture
def other_schema(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[SqlOutbox, sa.Engine, str]]:
    """The outbox in its default schema, and an app engine that also reaches a second schema
    (SQLite: an attached database; MariaDB: another database)."""
    outbox: SqlOutbox = request.getfixturevalue(request.param)
    if request.param == "sqlite":
        schema = "other"
        app = sa.create_engine(outbox.engine.url)
        attach = f"ATTACH DATABASE '{tmp_path / 'other.db'}' AS other"
        event.listen(app, "connect", lambda dbapi_conn, _: dbapi_conn.execute(attach))
    else:
        schema = f"zl_other_{uuid.uuid4().hex[:8]}"
        app = outbox.engine
        with app.begin() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {schema}")
    try:
        yield outbox, app, schema
    finally:
        if request.param == "mariadb":
            with app.begin() as conn:
                conn.exec_driver_sql(f"DROP DATABASE {schema}")
        else:
            app.dispose()


@pytest.mark.parametrize("other_schema", ["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)], indirect=True)
def test_add_on_a_schema_translated_connection_inserts_into_the_mapped_schema(
    other_schema: tuple[SqlOutbox, sa.Engine, str],
) -> None:
    """The precompiled INSERT names no schema: on a connection with a schema_translate_map it
    would land in the default schema's outbox table (which exists here), not the mapped one."""
    outbox, app, schema = other_schema
    with app.begin() as conn:
        translated = conn.execution_options(schema_translate_map={None: schema})
        outbox.table.metadata.create_all(translated)
        mid = outbox.add(translated, topic="t", value=b"mapped")
    t = outbox.table
    with app.connect() as conn:  # execution_options sets the map on this connection itself
        mapped = conn.execution_options(schema_translate_map={None: schema})
        assert mapped.scalar(sa.select(t.c.value).where(t.c.id == mid)) == b"mapped"
    with app.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(t)) == 0


def test_the_insert_is_compiled_once_per_driver(sqlite: SqlOutbox) -> None:
    with sqlite.engine.begin() as conn:
        for _ in range(3):
            sqlite.add(conn, topic="t", value=b"x")
    assert list(sqlite._insert_sql) == [("sqlite", "pysqlite", "qmark")]
    assert sa.inspect(sqlite.engine).has_table(sqlite.table.name)


@pytest.mark.mariadb
def test_mariadb_an_index_dropped_under_a_running_relay_is_noticed(mariadb: SqlOutbox) -> None:
    """The index names are read once; FORCE INDEX naming one dropped since (error 1176) makes
    the claim read them again instead of failing until the relay restarts."""
    outbox = mariadb
    with outbox.engine.begin() as conn:
        ids = outbox.add_many(conn, [{"topic": "t", "value": b"%d" % i, "key": b"k"} for i in range(4)])
    first = outbox.claim(2, lease_s=60)
    with outbox.engine.begin() as conn:
        conn.exec_driver_sql(f"DROP INDEX ix_{outbox.table.name}_claim ON {outbox.table.name}")
    rest = outbox.succeed_and_claim([Delivered(m, "t/0/0") for m in first], 10, lease_s=60)
    assert [m.id for m in first + rest] == ids


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)])
def test_ids_that_need_quoting_are_marked_delivered(kind: str, request: pytest.FixtureRequest) -> None:
    """The delivered mark sends ids inside one JSON text on MariaDB: ids with quotes, backslashes,
    placeholders or control characters (rows written by hand or by another tool) each get their own
    location, none is left in ``sending`` to be published again when its lease expires."""
    outbox: SqlOutbox = request.getfixturevalue(kind)
    t = outbox.table
    odd = ['a"b', "c'd", "e\\f", 'g\\"h', "%s%%", "?x", "\x01\x7f", "i\nj", "k]l[", "m,n", "0" * 36]
    with outbox.engine.begin() as conn:
        conn.execute(
            sa.insert(t),
            [
                {
                    "id": i,
                    "topic": "t",
                    "value": b"v",
                    "state": "pending",
                    "attempts": 0,
                    "not_before": 0.0,
                    "created_at": 0.0,
                }
                for i in odd
            ],
        )
    claimed = outbox.claim(100, lease_s=60)
    assert sorted(m.id for m in claimed) == sorted(odd)
    outbox.succeed([Delivered(m, f"at {m.id!r}") for m in claimed])
    with outbox.engine.connect() as conn:
        marked = {r.id: (r.state, r.location) for r in conn.execute(sa.select(t.c.id, t.c.state, t.c.location))}
    assert marked == {i: ("success", f"at {i!r}") for i in odd}
