"""The SQL outbox's indexes: PostgreSQL's partial ones, and the upgrade of a table made by the
previous version (full claim/key/done/wait indexes) by ``zeroloss init``."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from tests.conftest import MARIADB_URL, require_service
from tests.conftest import PG_URL as SHARED_PG_URL
from zeroloss.cli import main
from zeroloss.outbox.base import Delivered, State
from zeroloss.outbox.sql import SqlOutbox

# A database of this module's own: CREATE INDEX CONCURRENTLY waits for every older transaction
# *of its database*, and in the shared one other workers' tests hold some past the 10 s an app's
# create_schema() waits (seen in CI: "index … NOT added: a transaction open since before the build").
PG_URL = SHARED_PG_URL.rsplit("/", 1)[0] + "/test_indexes"
# One worker: this module's tests would otherwise hold back each other's builds the same way.
pytestmark = pytest.mark.xdist_group("pg_indexes")

PARTIAL = ("pending", "live", "wait", "done")
OLD_DDL = {  # what the previous version's create_schema made, besides the primary key
    "claim": "(state, id, not_before)",
    "key": "(key_hash, id)",
    "done": "(state, done_at)",
    "wait": "(state, not_before)",
}


def indexes(outbox: SqlOutbox) -> dict[str, bool]:
    """index name → valid, for the outbox table (primary key left out)."""
    with outbox.engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE i.indrelid = to_regclass(%(t)s) AND NOT i.indisprimary",
            {"t": outbox.table.name},
        ).all()
    return {name: valid for name, valid in rows}


@pytest.fixture(scope="module")
def own_database() -> None:
    require_service("postgres")
    admin = sa.create_engine(SHARED_PG_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            name = PG_URL.rsplit("/", 1)[1]
            if not conn.exec_driver_sql("SELECT 1 FROM pg_database WHERE datname = %(n)s", {"n": name}).scalar():
                conn.exec_driver_sql(f"CREATE DATABASE {name}")
    finally:
        admin.dispose()


@pytest.fixture
def pg_outbox(own_database: None) -> Iterator[SqlOutbox]:
    outbox = SqlOutbox(PG_URL, table=f"zl_ix_{uuid.uuid4().hex[:10]}")
    yield outbox
    outbox.drop_schema()
    outbox.close()


def make_previous_version_table(outbox: SqlOutbox) -> None:
    """The same table as the previous version left it: its four full indexes, no partial ones."""
    outbox.create_schema()
    t = outbox.table.name
    with outbox.engine.begin() as conn:
        for suffix in PARTIAL:
            conn.exec_driver_sql(f"DROP INDEX ix_{t}_{suffix}")
        for suffix, columns in OLD_DDL.items():
            conn.exec_driver_sql(f"CREATE INDEX ix_{t}_{suffix} ON {t} {columns}")


def add_keyed(outbox: SqlOutbox, n: int) -> list[str]:
    with outbox.engine.begin() as conn:
        return outbox.add_many(conn, [{"topic": "t", "value": b"%d" % i, "key": b"k%d" % (i % 3)} for i in range(n)])


def drain_in_order(outbox: SqlOutbox, ids: list[str]) -> None:
    """Claim 4 at a time until empty: everything comes out once, oldest first."""
    seen: list[str] = []
    before = outbox.stats().counts[State.SUCCESS]
    while batch := outbox.claim(4, lease_s=60):
        seen += [m.id for m in batch]
        outbox.succeed([Delivered(m, "t/0/0") for m in batch])
    assert seen == ids
    assert outbox.stats().counts[State.SUCCESS] == before + len(ids)


@pytest.mark.postgres
def test_a_new_postgresql_table_has_only_the_partial_indexes(pg_outbox: SqlOutbox) -> None:
    assert pg_outbox.create_schema() == []  # a new table: nothing to report as an upgrade
    t = pg_outbox.table.name
    assert indexes(pg_outbox) == {f"ix_{t}_{s}": True for s in PARTIAL}
    drain_in_order(pg_outbox, add_keyed(pg_outbox, 10))


def test_sqlite_keeps_the_full_indexes_the_claim_reads(tmp_path: Path) -> None:
    outbox = SqlOutbox(f"sqlite:///{tmp_path / 'o.db'}", table="zl_ix")
    outbox.create_schema()
    try:
        names = {ix["name"] for ix in sa.inspect(outbox.engine).get_indexes("zl_ix")}
        assert names == {f"ix_zl_ix_{s}" for s in ("claim", "done", "wait")}
    finally:
        outbox.close()


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)])
def test_init_on_a_previous_version_table_says_the_key_index_may_be_dropped(kind: str, tmp_path: Path) -> None:
    """MariaDB/SQLite tables of earlier versions have ix_key, which no statement reads and every
    add writes: init says how to drop it, and claims work with it and after it is gone."""
    if kind == "mariadb":
        require_service("mariadb")
    url = f"sqlite:///{tmp_path / 'o.db'}" if kind == "sqlite" else MARIADB_URL
    outbox = SqlOutbox(url, table=f"zl_ix_{uuid.uuid4().hex[:8]}")
    t = outbox.table.name
    outbox.create_schema()
    try:
        with outbox.engine.begin() as conn:  # what the previous version's create_schema also made
            conn.exec_driver_sql(f"CREATE INDEX ix_{t}_key ON {t} {OLD_DDL['key']}")
        ids = add_keyed(outbox, 6)
        drop = f"DROP INDEX ix_{t}_key" + (f" ON {t}" if kind == "mariadb" else "")
        result = CliRunner().invoke(main, ["init", "--source", url, "--table", t])
        assert result.exit_code == 0, result.output
        assert f"index ix_{t}_key is no longer read" in result.output and drop in result.output, result.output
        first = outbox.claim(3, lease_s=60)
        outbox.succeed([Delivered(m, "t/0/0") for m in first])
        with outbox.engine.begin() as conn:
            conn.exec_driver_sql(drop)
        assert outbox.create_schema() == []  # nothing more to say
        assert [m.id for m in first] == ids[:3]
        drain_in_order(outbox, ids[3:])
    finally:
        outbox.drop_schema()
        outbox.close()


@pytest.mark.postgres
def test_a_previous_version_table_keeps_working_and_init_upgrades_it(
    pg_outbox: SqlOutbox, caplog: pytest.LogCaptureFixture
) -> None:
    make_previous_version_table(pg_outbox)
    t = pg_outbox.table.name
    ids = add_keyed(pg_outbox, 12)
    first = pg_outbox.claim(4, lease_s=60)  # the relay of this version on the old table: works as before
    assert [m.id for m in first] == ids[:4]
    pg_outbox.succeed([Delivered(m, "t/0/0") for m in first])
    assert f"zeroloss init --source {pg_outbox.url} --table {t}" in caplog.text  # and says how to upgrade

    result = CliRunner().invoke(main, ["init", "--source", PG_URL, "--table", t])
    assert result.exit_code == 0, result.output
    for added in ("pending", "live"):
        assert f"added index ix_{t}_{added} " in result.output
    for kept in ("done", "wait"):  # the old full ones still serve: left alone
        assert f"ix_{t}_{kept} " not in result.output
    for old in ("claim", "key"):
        assert f"DROP INDEX CONCURRENTLY ix_{t}_{old}" in result.output
    assert indexes(pg_outbox) == {f"ix_{t}_{s}": True for s in (*PARTIAL, "claim", "key")}

    again = CliRunner().invoke(main, ["init", "--source", PG_URL, "--table", t])
    assert again.exit_code == 0 and "added index" not in again.output, again.output
    upgraded = SqlOutbox(PG_URL, table=t)  # a relay started after the upgrade uses them
    try:
        drain_in_order(upgraded, ids[4:])
        assert upgraded._partial_indexes is True
    finally:
        upgraded.close()


@pytest.mark.postgres
def test_init_rebuilds_an_index_an_interrupted_build_left_invalid(pg_outbox: SqlOutbox) -> None:
    pg_outbox.create_schema()
    t = pg_outbox.table.name
    with pg_outbox.engine.begin() as conn:  # what a CREATE INDEX CONCURRENTLY cut short leaves behind
        conn.exec_driver_sql(f"UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'ix_{t}_pending'::regclass")
    assert indexes(pg_outbox)[f"ix_{t}_pending"] is False
    changes = pg_outbox.create_schema()
    assert any(f"added index ix_{t}_pending " in c for c in changes), changes
    assert indexes(pg_outbox) == {f"ix_{t}_{s}": True for s in PARTIAL}


@pytest.mark.postgres
def test_a_claim_on_a_backlog_not_analyzed_yet_walks_the_pending_index(pg_outbox: SqlOutbox) -> None:
    """A backlog that just arrived has no statistics: the planner took the table for nearly empty
    and sorted every pending row (on disk, at 100k) for each claim. The claim's own statements,
    replayed in one transaction, must walk the pending rows in id order instead."""
    pg_outbox.create_schema()
    with pg_outbox.engine.begin() as conn:
        pg_outbox.add_many(conn, [{"topic": "t", "value": b"x" * 200, "key": b"k%d" % (i % 100)} for i in range(5000)])
    seen: list[tuple[str, object]] = []

    def record(conn: object, cursor: object, statement: str, parameters: object, context: object, many: bool) -> None:
        seen.append((statement, parameters))

    sa.event.listen(pg_outbox.engine, "before_cursor_execute", record)
    try:
        assert len(pg_outbox.claim(500, lease_s=60)) == 500
    finally:
        sa.event.remove(pg_outbox.engine, "before_cursor_execute", record)
    with pg_outbox.engine.connect() as conn, conn.begin() as tx:
        plan = ""
        for statement, params in seen:
            if "FOR UPDATE SKIP LOCKED" in statement:
                plan = "\n".join(conn.exec_driver_sql("EXPLAIN " + statement, params).scalars())  # type: ignore[arg-type]
                break
            if statement.lstrip().upper().startswith("SELECT"):
                conn.exec_driver_sql(statement, params)  # type: ignore[arg-type]
        tx.rollback()
    assert f"ix_{pg_outbox.table.name}_pending" in plan and "Sort" not in plan, plan


@pytest.mark.postgres
def test_a_row_another_claim_holds_locked_stops_its_key_at_that_row(pg_outbox: SqlOutbox) -> None:
    """The per-key re-check: another relay's claim, not committed yet, holds k's 2nd message locked
    (SKIP LOCKED passes over it, and it is not ``sending`` yet). This claim may take k's 1st message,
    never its 3rd and later ones; the other keys are untouched."""
    pg_outbox.create_schema()
    with pg_outbox.engine.begin() as conn:
        ids = pg_outbox.add_many(
            conn, [{"topic": "t", "value": b"%d" % i, "key": b"k" if i % 2 else b"j"} for i in range(12)]
        )
    k_ids = ids[1::2]
    other = pg_outbox.engine.connect()
    try:
        with other.begin():
            other.exec_driver_sql(
                f"SELECT id FROM {pg_outbox.table.name} WHERE id = %(i)s FOR UPDATE", {"i": k_ids[1]}
            ).all()
            got = [m.id for m in pg_outbox.claim(100, lease_s=60)]
            assert got == sorted(set(ids[0::2]) | {k_ids[0]})
    finally:
        other.close()
    pg_outbox.succeed([Delivered(m, "t/0/0") for m in pg_outbox.list(State.SENDING, 100)])
    assert [m.id for m in pg_outbox.claim(100, lease_s=60)] == k_ids[1:]  # the lock gone: the rest, in order


@pytest.mark.postgres
@pytest.mark.parametrize("table_before", ["none", "previous version"])
def test_replicas_calling_create_schema_at_once_all_start(pg_outbox: SqlOutbox, table_before: str) -> None:
    """Four app replicas start together and each calls ``create_schema()``: on a new database, and
    after an upgrade on a previous version's table (each then builds the partial indexes
    CONCURRENTLY). Before the schema lock, all but one failed on PostgreSQL's catalog races
    (duplicate pg_type key, "already exists", "tuple concurrently updated", deadlock)."""
    if table_before == "previous version":
        make_previous_version_table(pg_outbox)
    errors: list[BaseException] = []

    def replica() -> None:
        outbox = SqlOutbox(PG_URL, table=pg_outbox.table.name)
        try:
            outbox.create_schema()
        except BaseException as exc:  # collected: the assertion names them all
            errors.append(exc)
        finally:
            outbox.close()

    threads = [threading.Thread(target=replica) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    t = pg_outbox.table.name
    assert all(indexes(pg_outbox)[f"ix_{t}_{s}"] for s in PARTIAL), indexes(pg_outbox)
    drain_in_order(pg_outbox, add_keyed(pg_outbox, 6))


@pytest.mark.postgres
def test_an_apps_create_schema_gives_up_an_upgrade_an_old_transaction_holds_back(pg_outbox: SqlOutbox) -> None:
    """CREATE INDEX CONCURRENTLY waits for every older snapshot in the database (here a REPEATABLE
    READ session that never touches the outbox, as a pg_dump is): an app calling create_schema()
    at start-up on a previous version's table gives up after ``upgrade_wait_s``, says what to run,
    leaves no invalid index behind, and its relay claims as before; ``zeroloss init`` (no bound)
    adds them once the transaction has ended."""
    make_previous_version_table(pg_outbox)
    ids = add_keyed(pg_outbox, 6)
    t = pg_outbox.table.name
    with pg_outbox.engine.connect().execution_options(isolation_level="REPEATABLE READ") as old, old.begin():
        old.exec_driver_sql("SELECT 1").all()  # its snapshot is now older than any index build
        changes = pg_outbox.create_schema(upgrade_wait_s=0.3)
        assert [c for c in changes if "NOT added" in c] == [
            f"outbox table {t!r}: index ix_{t}_pending NOT added: a transaction open since before the build "
            f"(a pg_dump, a REPEATABLE READ session) held it back past 0.3s; the relay works without it, only "
            f"slower; add it with: zeroloss init --source {pg_outbox.url} --table {t}"
        ]
        assert indexes(pg_outbox) == {f"ix_{t}_{s}": True for s in OLD_DDL}  # nothing half-built left
        with pg_outbox.engine.connect() as conn:  # no pooled connection keeps the build's lock timeout
            assert conn.exec_driver_sql("SHOW lock_timeout").scalar() == "0"
        drain_in_order(pg_outbox, ids)
    result = CliRunner().invoke(main, ["init", "--source", PG_URL, "--table", t])
    assert result.exit_code == 0 and f"added index ix_{t}_pending " in result.output, result.output
    assert all(indexes(pg_outbox)[f"ix_{t}_{s}"] for s in PARTIAL)
