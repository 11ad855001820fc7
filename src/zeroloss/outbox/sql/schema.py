"""The SQL outbox's schema: create (or upgrade) the table, its indexes per dialect and the
optional NOTIFY trigger, under a per-table lock so replicas starting together do not race;
drop it. Why the lock: docs/design.md ("The SQL outbox")."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from zeroloss.errors import ConfigError
from zeroloss.outbox.sql.core import SqlCore
from zeroloss.outbox.sql.table import NON_PG_UNUSED_INDEXES, PG_PARTIAL_INDEXES

log = logging.getLogger("zeroloss.outbox.sql")

_POLL_S = 0.05


@contextmanager
def schema_lock(engine: sa.Engine, table: str) -> Iterator[None]:
    """Hold ``table``'s schema lock for the block (PostgreSQL; elsewhere a no-op).

    It is *tried* in a loop, not waited for with ``pg_advisory_lock``: a waiting statement holds a
    snapshot, and the holder's ``CREATE INDEX CONCURRENTLY`` waits for every older snapshot to
    end, a cycle PostgreSQL breaks by cancelling one of them (the index build, left invalid)."""
    if engine.dialect.name != "postgresql":
        yield
        return
    digest = hashlib.blake2b(f"zeroloss schema {table}".encode(), digest_size=8).digest()
    key = int.from_bytes(digest, "big", signed=True)  # pg_try_advisory_lock takes a bigint
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        said = False
        while not conn.exec_driver_sql("SELECT pg_try_advisory_lock(%(k)s)", {"k": key}).scalar():
            if not said:
                log.info("table %s: another process is creating or upgrading it; waiting for it to finish", table)
                said = True
            time.sleep(_POLL_S)  # the holder may be building an index over a large table: no deadline
        try:
            yield
        finally:
            conn.exec_driver_sql("SELECT pg_advisory_unlock(%(k)s)", {"k": key})


class SqlSchema(SqlCore):
    """``create_schema`` / ``drop_schema`` (``zeroloss init``, or the application at start-up)."""

    def create_schema(self, *, notify: bool = False, upgrade_wait_s: float | None = 10.0) -> list[str]:
        """Create the table and its indexes if missing (idempotent); returns what it added to a
        table that already existed (an upgrade), for ``zeroloss init`` to say. ``notify``
        (PostgreSQL): also the trigger that wakes an idle relay at each commit — see docs/design.md
        ("The SQL outbox") for its cost; added only if missing, so running it on a live outbox takes no lock.

        ``upgrade_wait_s`` (PostgreSQL, a table of an earlier version): a ``CREATE INDEX
        CONCURRENTLY`` waits for every transaction holding a snapshot older than it, anywhere in
        the database (a pg_dump, a REPEATABLE READ report); an application calling this at start-up
        gives up after that long, says so and starts (the relay works without them, only slower).
        ``None`` (``zeroloss init``): wait as long as it takes."""
        added: list[str] = []
        with self._errors("create the outbox table"), schema_lock(self.engine, self.table.name):
            existed = sa.inspect(self.engine).has_table(self.table.name)
            self.table.metadata.create_all(self.engine, checkfirst=True)
            if self._dialect == "postgresql":
                added += self._create_partial_indexes(existed, upgrade_wait_s)
            elif existed:
                added += self._unused_index_advice()
            if not notify:
                return added
            if self._dialect != "postgresql":
                raise ConfigError(f"notify needs PostgreSQL; {self._dialect} has no NOTIFY (the relay polls)")
            table = self.engine.dialect.identifier_preparer.quote(self.table.name)
            with self.engine.begin() as conn:
                exists = conn.exec_driver_sql(
                    "SELECT 1 FROM pg_trigger WHERE tgname = %(t)s AND tgrelid = to_regclass(%(r)s)",
                    {"t": f"{self.channel}_notify", "r": table},
                ).first()
                if exists:
                    return added
                conn.exec_driver_sql(
                    f"CREATE OR REPLACE FUNCTION {self.channel}_notify() RETURNS trigger LANGUAGE plpgsql AS "
                    f"$$ BEGIN PERFORM pg_notify('{self.channel}', ''); RETURN NULL; END $$"
                )
                conn.exec_driver_sql(
                    f"CREATE TRIGGER {self.channel}_notify AFTER INSERT ON {table} "
                    f"FOR EACH STATEMENT EXECUTE FUNCTION {self.channel}_notify()"
                )
        return added

    def _create_partial_indexes(self, existed: bool, wait_s: float | None) -> list[str]:
        """PostgreSQL: the indexes of :data:`~zeroloss.outbox.sql.table.PG_PARTIAL_INDEXES`, each
        of the backlog or of the history only, so a claim's scans no longer walk past delivered
        rows. On a table of an earlier version the missing ones are built ``CONCURRENTLY`` (the app
        keeps writing); one left invalid by an interrupted build is dropped and built again."""
        quote = self.engine.dialect.identifier_preparer.quote
        table = quote(self.table.name)
        added = []
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:

            def valid(name: str) -> bool | None:  # None: no such index on this table
                return conn.exec_driver_sql(
                    "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                    "WHERE i.indrelid = to_regclass(%(t)s) AND c.relname = %(n)s",
                    {"t": table, "n": name},
                ).scalar()

            for suffix, (columns, where) in PG_PARTIAL_INDEXES.items():
                name = f"ix_{self.table.name}_{suffix}"
                state = valid(name)
                if state:
                    continue
                if state is not None:  # an interrupted CONCURRENTLY build leaves it invalid: unused, yet updated
                    conn.exec_driver_sql(f"DROP INDEX CONCURRENTLY IF EXISTS {quote(name)}")
                how = "CONCURRENTLY " if existed else ""
                try:
                    if existed and wait_s is not None:  # this connection only; reset before it goes back to the pool
                        conn.exec_driver_sql(f"SET lock_timeout = {max(1, int(wait_s * 1000))}")
                    conn.exec_driver_sql(f"CREATE INDEX {how}{quote(name)} ON {table} ({columns}) WHERE {where}")
                except DBAPIError as exc:
                    if getattr(exc.orig, "sqlstate", None) != "55P03":
                        raise
                    # Held back by an old transaction: the half-built index would be updated by
                    # every write and used by no read; drop it (no wait: nothing uses it).
                    conn.exec_driver_sql(f"DROP INDEX CONCURRENTLY IF EXISTS {quote(name)}")
                    added.append(
                        f"outbox table {self.table.name!r}: index {name} NOT added: a transaction open "
                        f"since before the build (a pg_dump, a REPEATABLE READ session) held it back past "
                        f"{wait_s}s; the relay works without it, only slower; add it with: zeroloss init "
                        f"--source {self.url} --table {self.table.name}"
                    )
                    log.warning("%s", added[-1])
                    break  # the next build would wait for the same transaction
                finally:
                    conn.exec_driver_sql("RESET lock_timeout")
                if existed:
                    added.append(
                        f"outbox table {self.table.name!r}: added index {name} ({columns}) WHERE {where}, "
                        "so claims no longer walk the delivered rows"
                    )
            if existed:
                for old in (f"ix_{self.table.name}_claim", f"ix_{self.table.name}_key"):
                    if valid(old) is not None:
                        added.append(
                            f"outbox table {self.table.name!r}: index {old} is no longer used on PostgreSQL "
                            f"and slows every relay write; drop it once no older relay runs: "
                            f"DROP INDEX CONCURRENTLY {quote(old)}"
                        )
        for line in added:
            log.info("%s", line)
        return added

    def _unused_index_advice(self) -> list[str]:
        """MariaDB/SQLite, a table of an earlier version: how to drop the indexes nothing reads."""
        quote = self.engine.dialect.identifier_preparer.quote
        have = {ix["name"] for ix in sa.inspect(self.engine).get_indexes(self.table.name)}
        advice = []
        for suffix in NON_PG_UNUSED_INDEXES:
            name = f"ix_{self.table.name}_{suffix}"
            if name in have:
                on = f" ON {quote(self.table.name)}" if self._dialect == "mysql" else ""
                advice.append(
                    f"outbox table {self.table.name!r}: index {name} is no longer read and slows every "
                    f"add; drop it (relays of any version work without it): DROP INDEX {quote(name)}{on}"
                )
                log.info("%s", advice[-1])
        return advice

    def drop_schema(self) -> None:
        with self._errors("drop the outbox table"):
            self.table.metadata.drop_all(self.engine, checkfirst=True)
            if self._dialect == "postgresql":
                with self.engine.begin() as conn:
                    conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS {self.channel}_notify()")
