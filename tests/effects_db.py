"""An inbox and an effects table in one real database, for the consumer tests: each handled message
writes an effect row (deliberately without a unique constraint), so a lost or doubled effect shows."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.conftest import MARIADB_URL, PG_URL, require_service
from zeroloss.consumer import Received
from zeroloss.inbox import SqlInbox


def effects_table(name: str) -> sa.Table:
    return sa.Table(
        name,
        sa.MetaData(),
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("msg_id", sa.String(255), nullable=False),
        sa.Column("msg_key", sa.String(64)),
        sa.Column("attempts", sa.Integer),
    )


@dataclass
class Db:
    """An inbox plus an effects table (deliberately without a unique constraint) in one database."""

    url: str
    inbox: SqlInbox
    effects: sa.Table

    def record(self, msg: Received, tx: sa.Connection) -> None:
        key = msg.key.decode() if msg.key is not None else None
        tx.execute(self.effects.insert(), {"msg_id": msg.id, "msg_key": key, "attempts": msg.attempts})

    def counts(self) -> Counter[str]:
        with self.inbox.engine.connect() as conn:
            return Counter(
                dict(
                    conn.execute(
                        sa.select(self.effects.c.msg_id, sa.func.count()).group_by(self.effects.c.msg_id)
                    ).all()
                )
            )

    def order(self) -> dict[str | None, list[str]]:
        out: dict[str | None, list[str]] = {}
        with self.inbox.engine.connect() as conn:
            for mid, key in conn.execute(
                sa.select(self.effects.c.msg_id, self.effects.c.msg_key).order_by(self.effects.c.seq)
            ):
                out.setdefault(key, []).append(mid)
        return out


def make_db(kind: str, tmp_path: Path) -> Generator[Db, None, None]:
    suffix = uuid.uuid4().hex[:10]
    target: str | sa.Engine
    if kind in ("postgresql", "psycopg2"):
        require_service("postgres")
        url = target = PG_URL
        if kind == "psycopg2":  # a user's own engine on the other PostgreSQL driver
            pytest.importorskip("psycopg2")
            target = sa.create_engine(sa.make_url(PG_URL).set(drivername="postgresql+psycopg2"))
    elif kind == "mariadb":
        require_service("mariadb")
        url = target = MARIADB_URL
    else:
        url = target = f"sqlite:///{tmp_path / 'app.db'}"
    inbox = SqlInbox(target, table=f"zl_inbox_{suffix}")
    inbox.create_schema()
    effects = effects_table(f"zl_effects_{suffix}")
    effects.create(inbox.engine)
    try:
        yield Db(url, inbox, effects)
    finally:
        effects.drop(inbox.engine)
        inbox.drop_schema()
        inbox.close()
        if isinstance(target, sa.Engine):
            target.dispose()


def assert_exactly_once(db: Db, ids: list[str]) -> None:
    counts = db.counts()
    missing = [i for i in ids if counts[i] == 0]
    doubled = {i: n for i, n in counts.items() if n > 1}
    assert not missing, f"{len(missing)} effects lost"
    assert not doubled, f"{len(doubled)} effects applied more than once"
    assert set(counts) == set(ids)
