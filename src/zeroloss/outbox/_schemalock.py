"""One process at a time creates or upgrades a table's schema (PostgreSQL: a session advisory lock).

Applications call ``create_schema()`` at start-up, often from several replicas at once. Without
the lock, PostgreSQL's catalog races make all but one fail ("duplicate key value violates unique
constraint pg_type_typname_nsp_index", "relation … already exists", "tuple concurrently
updated", or a deadlock between two ``CREATE INDEX CONCURRENTLY``), i.e. a replica that does not
start. Other databases: no lock (SQLite's file lock and MariaDB's metadata locks already serialise).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa

log = logging.getLogger(__name__)

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
