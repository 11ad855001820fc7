"""What every side of the SQL outbox shares: :class:`SqlCore` holds the state (engine, table,
dialect, this instance's claim token, the statements built once), the database's clock, one
transaction retried on deadlock, and the translation of database errors into StoreError. The
producer, relay, operator and schema sides are its subclasses; ``SqlOutbox`` is all of them."""

from __future__ import annotations

import logging
import math
import os
import random
import secrets
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from zeroloss.errors import ConfigError, StoreError, StoreSetupError
from zeroloss.logs import first_line
from zeroloss.outbox.base import State
from zeroloss.outbox.sql.table import outbox_table
from zeroloss.sqlurl import engine_of

log = logging.getLogger("zeroloss.outbox.sql")
T = TypeVar("T")

BLOCKING = (State.PENDING.value, State.SENDING.value, State.FAILED.value)
"""A row in one of these states holds back the later rows of its key."""
CHUNK = 1000  # ids per IN (...) list
_TX_ATTEMPTS = 5

_CLOCK_CHECK_S = 60.0
_SERVER_CLOCK = {  # Unix seconds with sub-second precision, as the server sees it
    "postgresql": "SELECT EXTRACT(EPOCH FROM clock_timestamp())",
    "mysql": "SELECT UNIX_TIMESTAMP(NOW(6))",
    "sqlite": "SELECT (julianday('now') - 2440587.5) * 86400.0",
}


def chunks(items: Sequence[T], n: int = CHUNK) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _is_transient(exc: DBAPIError) -> bool:
    """Deadlock / serialization failure / lock wait timeout: the whole transaction may be retried."""
    if getattr(exc.orig, "sqlstate", None) in ("40P01", "40001", "55P03"):
        return True
    args: tuple[object, ...] = getattr(exc.orig, "args", ())
    return bool(args) and args[0] in (1213, 1205)


class SqlCore:
    """One outbox table opened: the state every side uses, and the shared plumbing."""

    states = frozenset({State.PENDING, State.SENDING, State.SUCCESS, State.FAILED})
    """No ``tmp``, ``doubt`` or ``malformed``: the row commits with the app's transaction, and
    the database keeps it intact."""

    def __init__(
        self,
        url: str | sa.Engine | None = None,
        *,
        table: str = "zeroloss_outbox",
        engine: sa.Engine | None = None,
        max_message_bytes: int = 1_000_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.table = outbox_table(table)
        self._clock = clock  # this machine's; leases and backoffs are kept in the database's (_now)
        self._clock_offset = 0.0
        self._clock_checked = -math.inf
        # SqlOutbox(url), SqlOutbox(engine), and the older SqlOutbox(url, engine=engine) (the URL
        # was only shown then; the engine is what is used)
        if engine is not None and isinstance(url, sa.Engine) and url is not engine:
            raise ConfigError("SqlOutbox got two different engines: pass one, SqlOutbox(engine)")
        given = engine if engine is not None else url
        if given is None:
            raise ConfigError("SqlOutbox needs a SQL URL or a SQLAlchemy Engine: SqlOutbox('sqlite:///app.db')")
        self.engine, self._owns_engine = engine_of(given, "SqlOutbox")
        shown = sa.engine.make_url(url) if isinstance(url, str) else self.engine.url
        self.url = shown.render_as_string(hide_password=True)  # as the user wrote it, password masked
        self._url_masks_a_password = shown.password is not None
        self.max_message_bytes = max_message_bytes
        name = self.engine.dialect.name
        self._dialect = "mysql" if name in ("mysql", "mariadb") else name
        self._token = f"{socket.gethostname()[:32]}:{os.getpid()}:{secrets.token_hex(6)}"
        self.channel = f"zeroloss_{self.table.name.lower()}"  # the NOTIFY channel of this table
        # succeed() on PostgreSQL. `id = ANY` keeps the primary-key index in the plan: joining on
        # the unnest alone lets the planner scan the whole table, history included. A row already
        # in success keeps its done_at and location through the CASEs: a `state <> 'success'` in
        # the WHERE is estimated at one row once the statistics are mostly history (a table kept
        # for audit), and the planner re-read the whole unnest for each row it found: n x n id
        # comparisons, 110-170 ms for 1,000 ids after 1M delivered rows instead of 8-15 ms.
        table = self.engine.dialect.identifier_preparer.quote(self.table.name)
        self._succeed_pg = sa.text(
            f"UPDATE {table} AS t SET state = 'success', lease_until = NULL, "
            "done_at = CASE WHEN t.state = 'success' THEN t.done_at ELSE :now END, "
            "location = CASE WHEN t.state = 'success' THEN t.location ELSE v.loc END "
            "FROM unnest(CAST(:ids AS text[]), CAST(:locs AS text[])) AS v(id, loc) "
            "WHERE t.id = v.id AND t.id = ANY(CAST(:ids AS text[]))"
        )
        # succeed() on MariaDB/MySQL: JSON_TABLE (MariaDB 10.6, MySQL 8.0) turns the pairs into
        # rows, read first in array order (sorted ids: the lock order of every relay write), each
        # joined to its row by primary key. STRAIGHT_JOIN fixes that order: on a small table the
        # optimizer would scan the table and probe the pairs.
        self._succeed_mysql = sa.text(
            f"UPDATE JSON_TABLE(:pairs, '$[*]' COLUMNS("
            "id VARCHAR(36) CHARACTER SET ascii COLLATE ascii_bin PATH '$[0]', "
            "loc VARCHAR(255) CHARACTER SET utf8mb4 PATH '$[1]')) AS v "
            f"STRAIGHT_JOIN {table} AS t ON t.id = v.id "
            "SET t.state = 'success', t.done_at = :now, t.lease_until = NULL, t.location = v.loc "
            "WHERE t.state <> 'success'"
        )
        # claim()'s per-key re-check on PostgreSQL: each key's first undelivered rows in id order,
        # one more than its candidates (enough to find the first that is not one). Per key, an
        # ORDER BY id LIMIT is answered from the (key_hash, id) indexes, and the partial one holds
        # no delivered rows: the cost does not grow with the history, whatever the statistics say.
        blocking = ", ".join(f"'{s}'" for s in BLOCKING)
        self._recheck_pg = sa.text(
            "SELECT k.h, x.id FROM unnest(CAST(:keys AS text[]), CAST(:n AS int[])) AS k(h, n) "
            f"CROSS JOIN LATERAL (SELECT t.id FROM {table} AS t WHERE t.key_hash = k.h "
            f"AND t.state IN ({blocking}) AND t.id <= :max ORDER BY t.id LIMIT k.n) AS x"
        )
        # claim()'s blocked keys on PostgreSQL with its partial indexes, read from the `wait`
        # index (state, not_before). Each part asks for that index's order, and the claim's
        # transaction has sorting off, so no other index is chosen: once the statistics are
        # mostly history, every partial index looks empty, and the planner took the `live` or
        # `pending` one and filtered its whole backlog (9 ms per claim over 20k pending after 1M
        # delivered rows; 0.6 ms through `wait`, the round trip included).
        self._blocked_pg = sa.text(
            f"(SELECT key_hash FROM {table} WHERE state IN ('sending', 'failed') AND key_hash IS NOT NULL "
            "ORDER BY state, not_before) UNION "
            f"(SELECT key_hash FROM {table} WHERE state = 'pending' AND not_before > :now AND key_hash IS NOT NULL "
            "ORDER BY state, not_before)"
        )
        # claim() on PostgreSQL with its partial indexes: one statement (was four round trips:
        # blocked keys, candidates, re-check, UPDATE → sending). `cand` locks the due pending rows
        # of keys not blocked, oldest first (the blocked keys read as before, as a hashed subplan:
        # as an InitPlan array, `key_hash <> ALL(ARRAY(…))`, each scanned row, those other relays
        # hold locked included, was compared with every blocked key in turn — 1.0-1.9 s a claim
        # of 1,000 with 3 other relays holding 3,000 keys, where main's array parameter, a
        # constant to the planner, is hashed: the 0.55x of 4 relays, bench/results/notes.md);
        # `blockers` is the re-check: per candidate key, the first undelivered row up to the key's
        # last candidate that is not a candidate (a row another relay holds locked or claimed);
        # (`NOT IN` a hashed subplan: `NOT EXISTS` was planned as a nested-loop anti join over the
        # CTE whenever the statistics saw few pending rows, each walked row against every
        # candidate: 3 s for a claim of 10,000 on three keys; ids are never NULL, so it is the same
        # test); `chosen` keeps each key's candidates before it, and `upd` moves them to `sending`, by
        # primary key (`id = ANY`: joined to `chosen`, estimated at hundreds of rows whatever the
        # claim found, the planner scanned the whole table to update 20 rows: 7 ms at 22k rows). One
        # snapshot serves all parts, which is enough: a row blocks if it is undelivered in that
        # snapshot, and one committed after it was committed after every candidate (visible in
        # it), so sending the candidates first keeps commit order. Rows dropped stay locked until
        # COMMIT, as before.
        cols = "id, topic, msg_key, key_hash, value, headers, created_at, attempts, not_before, last_error"
        self._claim_pg = (
            f"WITH cand AS MATERIALIZED (SELECT {cols} FROM {table} "
            "WHERE state = 'pending' AND not_before <= %(now)s AND (key_hash IS NULL OR key_hash NOT IN ("
            f"(SELECT key_hash FROM {table} WHERE state IN ('sending', 'failed') AND key_hash IS NOT NULL "
            "ORDER BY state, not_before) UNION "
            f"(SELECT key_hash FROM {table} WHERE state = 'pending' AND not_before > %(now)s "
            "AND key_hash IS NOT NULL ORDER BY state, not_before))) "
            "ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED), "
            "keys AS (SELECT key_hash AS h, count(*) + 1 AS n, max(id) AS last FROM cand "
            "WHERE key_hash IS NOT NULL GROUP BY key_hash), "
            "blockers AS (SELECT k.h, min(x.id) AS first FROM keys AS k CROSS JOIN LATERAL "
            f"(SELECT t.id FROM {table} AS t WHERE t.key_hash = k.h AND t.state IN ({blocking}) "
            "AND t.id <= k.last ORDER BY t.id LIMIT k.n) AS x "
            "WHERE x.id NOT IN (SELECT c.id FROM cand AS c) GROUP BY k.h), "
            "chosen AS (SELECT c.* FROM cand AS c LEFT JOIN blockers AS b ON b.h = c.key_hash "
            "WHERE b.first IS NULL OR c.id < b.first), "
            f"upd AS (UPDATE {table} SET state = 'sending', lease_until = %(until)s, claimed_by = %(token)s "
            "WHERE id = ANY(ARRAY(SELECT id FROM chosen))) "
            "SELECT * FROM chosen"
        )
        self._partial_indexes: bool | None = None  # PostgreSQL: unknown until the first claim
        self._claim_plan_pg = sa.text(
            "SELECT set_config('enable_bitmapscan', 'off', true), set_config('enable_sort', 'off', true)"
        )  # this transaction only
        # The one-statement claim's: the same, and room enough that its blocked keys are always a
        # hashed subplan (a hash table probed once per scanned row). The planner hashes a subplan
        # only if its *estimated* size fits in hash_mem (work_mem x hash_mem_multiplier, 8 MB by
        # default); a table whose statistics count many failed rows would get a plain subplan,
        # the blocked keys read again for every row the candidate scan passes. The real table is
        # as large as the blocked keys, as the array main's statements pass.
        self._claim_plan_one_pg = sa.text(
            "SELECT set_config('enable_bitmapscan', 'off', true), set_config('enable_sort', 'off', true), "
            "set_config('hash_mem_multiplier', '1000', true)"
        )  # this transaction only
        # add() on SQLite/MariaDB: (dialect, driver, paramstyle) -> the INSERT's SQL, positional key order
        self._insert_sql: dict[tuple[str, str, str], tuple[str, tuple[str, ...] | None]] = {}
        self._index_names: frozenset[str] | None = None  # MariaDB/MySQL: read at the first claim
        self._listener: Any = None  # a pooled connection held in LISTEN by an idle relay
        self._can_listen = True

    def __repr__(self) -> str:
        return f"SqlOutbox({self.url!r}, table={self.table.name!r})"

    def now(self) -> float:
        return self._now()

    def _now(self) -> float:
        """The database server's clock (Unix seconds), as this machine's clock plus an offset
        measured once a minute: relays on several hosts then agree on when a lease expires and a
        backoff ends, whatever their own clocks say. The offset is off by at most half a round trip."""
        local = self._clock()
        if local - self._clock_checked > _CLOCK_CHECK_S:
            try:
                with self.engine.connect() as conn:
                    before = self._clock()
                    server = float(conn.execute(sa.text(_SERVER_CLOCK[self._dialect])).scalar_one())
                    after = self._clock()
                self._clock_offset = server - (before + after) / 2
                self._clock_checked = after
                if abs(self._clock_offset) > 1:
                    log.warning(
                        "this machine's clock is %.1fs %s the database's; leases and backoffs follow the database",
                        abs(self._clock_offset),
                        "behind" if self._clock_offset > 0 else "ahead of",
                    )
            except DBAPIError as exc:  # the statement that needs the time will report the outage
                log.debug("cannot read the database clock: %s", exc)
            local = self._clock()
        return local + self._clock_offset

    def _tx(self, fn: Callable[[sa.Connection], T], what: str, *, write: bool = True) -> T:
        """Run ``fn`` in one transaction of its own; retry it whole on deadlock/serialization failure."""
        attempt = 0
        while True:
            attempt += 1
            try:
                with self.engine.connect() as conn:
                    if self._dialect == "sqlite" and write:
                        conn.execution_options(zeroloss_immediate=True)  # BEGIN IMMEDIATE: see sqlurl
                    elif self._dialect in ("mysql", "postgresql") and not self._owns_engine:
                        # The app's Engine may autocommit (a claim's row locks would end with each
                        # statement: another relay claims the same rows) or run REPEATABLE READ;
                        # ours run as written.
                        conn.execution_options(isolation_level="READ COMMITTED")
                    with conn.begin():
                        return fn(conn)
            except DBAPIError as exc:
                args: tuple[object, ...] = getattr(exc.orig, "args", ())
                if attempt < _TX_ATTEMPTS and args[:1] == (1176,) and self._index_names:
                    # FORCE INDEX names an index dropped since it was read: read them again
                    log.info(
                        "%s: an index of %s was dropped (%s); reading its indexes again",
                        what,
                        self.table.name,
                        exc.orig,
                    )
                    self._index_names = None
                    continue
                if attempt < _TX_ATTEMPTS and _is_transient(exc):
                    log.debug("%s: transient database conflict (%s), retrying", what, exc.orig)
                    time.sleep(random.uniform(0.002, 0.02) * attempt)
                    continue
                raise self._store_error(exc, what) from exc

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except DBAPIError as exc:
            raise self._store_error(exc, what) from exc

    def _table_option(self) -> str:
        return table_option(self.table.name)

    def _store_error(self, exc: DBAPIError, what: str) -> StoreError:
        detail = str(exc.orig).strip()
        args: tuple[object, ...] = getattr(exc.orig, "args", ())
        code = args[0] if args else None
        # psycopg 3 says ``sqlstate``, psycopg2 (a user's own Engine) ``pgcode``
        sqlstate = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
        if sqlstate == "42P01" or code == 1146 or "no such table" in detail:
            return StoreSetupError(
                f"cannot {what}: the outbox table {self.table.name!r} does not exist in {self.url}; "
                f"create it with: zeroloss init --source {self.url}{self._table_option()}"
                + (" (your password in place of ***: it is not printed)" if self._url_masks_a_password else ""),
            )
        if "unable to open database file" in detail:
            return StoreSetupError(
                f"cannot {what}: cannot open the SQLite database {self.url} ({detail}); "
                f"check that its directory exists and is writable",
            )
        refused = (
            "password authentication failed",
            "is not permitted to log in",  # not 'role "': 'too many connections for role "app"' waits
            "does not exist",
            "Access denied",
            "Unknown database",
            "no pg_hba.conf entry",
        )
        # Refused credentials or database: the server answered, and waiting will not change it.
        if (
            sqlstate in ("28P01", "28000", "3D000")
            or code in (1044, 1045, 1049, 1698)
            or (isinstance(exc, sa.exc.OperationalError) and any(r in detail for r in refused))
        ):
            return StoreSetupError(
                f"cannot {what}: {self.url} refused us: {detail.splitlines()[0] if detail else detail}; "
                "check the user, password and database name in the URL",
            )
        if code == 1064 and "SKIP LOCKED" in (exc.statement or ""):
            return StoreSetupError(f"{self.url}: the SQL outbox needs MariaDB 10.6+ or MySQL 8.0+ (SKIP LOCKED)")
        transient = isinstance(exc, sa.exc.OperationalError) or exc.connection_invalidated
        return StoreError(f"cannot {what} in {self.url}: {first_line(detail)}", retriable=transient)


def table_option(table: str | None) -> str:
    """`` --table NAME`` for a hint's command when the table is not the default: without it
    the command would create ``zeroloss_outbox`` and leave the error as it was."""
    return "" if table in (None, "zeroloss_outbox") else f" --table {table}"
