"""One way in for SQL everywhere: a URL or the app's own SQLAlchemy Engine (issue 15).

``SqlOutbox(engine)``, ``SqlInbox(engine)``, ``Consumer(inbox=engine)`` and ``sql_resolver(engine)``
use the app's engine as it is and leave it to the app to dispose; a URL still makes an engine of
their own. What cannot work (an AsyncEngine, a Connection, two engines) is refused by name."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.conftest import PG_URL, require_service
from zeroloss import Consumer, SqlInbox, SqlOutbox
from zeroloss.errors import ConfigError
from zeroloss.outbox.resolvers import sql_resolver
from zeroloss.sqlurl import make_engine, normalize_url


def _table() -> str:
    return f"zl_seam_{uuid.uuid4().hex[:10]}"


def _round_trip(outbox: SqlOutbox) -> None:
    outbox.create_schema()
    try:
        with outbox.engine.begin() as conn:
            mid = outbox.add(conn, topic="orders", value=b"x")
        assert [m.id for m in outbox.claim(10, 30.0)] == [mid]
    finally:
        outbox.drop_schema()


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_sql_outbox_takes_an_engine_positionally_and_leaves_it_open(kind: str, tmp_path: Path) -> None:
    if kind == "postgresql":
        require_service("postgres")
    url = PG_URL if kind == "postgresql" else f"sqlite:///{tmp_path / 'app.db'}"
    engine = sa.create_engine(normalize_url(url))  # the app's own, made without zeroloss
    try:
        outbox = SqlOutbox(engine, table=_table())
        assert outbox.engine is engine
        assert "password" not in outbox.url
        _round_trip(outbox)
        outbox.close()
        with engine.connect() as conn:  # close() left the app's engine alone
            assert conn.execute(sa.text("SELECT 1")).scalar() == 1
    finally:
        engine.dispose()


def test_the_older_spellings_still_work(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    engine = make_engine(url)
    try:
        for outbox in (SqlOutbox(url, engine=engine, table=_table()), SqlOutbox(engine=engine, table=_table())):
            assert outbox.engine is engine
            _round_trip(outbox)
        _round_trip(SqlOutbox(url, table=_table()))
    finally:
        engine.dispose()


def test_what_cannot_work_is_refused_by_name(tmp_path: Path) -> None:
    pytest.importorskip("greenlet")
    from sqlalchemy.ext.asyncio import create_async_engine

    one = make_engine(f"sqlite:///{tmp_path / 'a.db'}")
    two = make_engine(f"sqlite:///{tmp_path / 'b.db'}")
    # made without connecting, so no server is needed
    aengine = create_async_engine(normalize_url(PG_URL).replace("+psycopg:", "+psycopg_async:"))
    try:
        with pytest.raises(ConfigError, match="two different engines"):
            SqlOutbox(one, engine=two)
        with pytest.raises(ConfigError, match="needs a SQL URL or a SQLAlchemy Engine"):
            SqlOutbox()
        with one.connect() as conn, pytest.raises(ConfigError, match="got Connection"):
            SqlOutbox(conn)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="got int"):
            SqlInbox(5)  # type: ignore[arg-type]
        for make in (SqlOutbox, SqlInbox):
            with pytest.raises(ConfigError, match="AsyncEngine; pass its URL"):
                make(aengine)  # type: ignore[arg-type]
    finally:
        one.dispose()
        two.dispose()


def test_consumer_and_resolver_take_the_apps_engine(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'app.db'}")
    try:
        consumer = Consumer("redis://127.0.0.1:6379/0", group="g", topics=["t"], inbox=engine)
        assert isinstance(consumer.inbox, SqlInbox) and consumer.inbox.engine is engine
        consumer.close()  # the inbox is the consumer's, the engine still the app's
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE txs (id TEXT)"))
            conn.execute(sa.text("INSERT INTO txs VALUES ('t1')"))
        resolve = sql_resolver(engine, "SELECT 1 FROM txs WHERE id = :txid")
        assert resolve("t1") is True
        assert resolve("t2") is False
    finally:
        engine.dispose()
