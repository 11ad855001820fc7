"""SQL URLs as users write them, turned into SQLAlchemy engines (shared by the outbox and the inbox).

Accepted: ``sqlite:///path.db``; ``postgresql://user@host/db`` (also ``postgres://``), driven by
psycopg 3; ``mysql://`` and ``mariadb://``, driven by PyMySQL. Explicit SQLAlchemy driver names for
the same drivers (``postgresql+psycopg://``, ``mysql+pymysql://``, ``sqlite+pysqlite://``) work too.

SQLite engines are set up for several writers: WAL journal, a busy timeout, synchronous=FULL, and
real transactions (pysqlite's legacy mode would not BEGIN before a SELECT). A connection whose
execution options contain ``zeroloss_immediate=True`` begins with ``BEGIN IMMEDIATE``, which takes
the write lock up front, so a read-then-write transaction (a claim) cannot interleave with another.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from zeroloss.errors import ConfigError, MissingExtraError

SQLITE_BUSY_TIMEOUT_MS = 30_000

# scheme as written -> (SQLAlchemy drivername, Python package, zeroloss extra, what needs it)
_SCHEMES: dict[str, tuple[str, str, str, str]] = {
    "sqlite": ("sqlite+pysqlite", "sqlite3", "", "SQLite support"),
    "sqlite+pysqlite": ("sqlite+pysqlite", "sqlite3", "", "SQLite support"),
    "postgresql": ("postgresql+psycopg", "psycopg", "postgres", "PostgreSQL support"),
    "postgres": ("postgresql+psycopg", "psycopg", "postgres", "PostgreSQL support"),
    "postgresql+psycopg": ("postgresql+psycopg", "psycopg", "postgres", "PostgreSQL support"),
    "mysql": ("mysql+pymysql", "pymysql", "mysql", "MySQL/MariaDB support"),
    "mariadb": ("mysql+pymysql", "pymysql", "mysql", "MySQL/MariaDB support"),
    "mysql+pymysql": ("mysql+pymysql", "pymysql", "mysql", "MySQL/MariaDB support"),
    "mariadb+pymysql": ("mysql+pymysql", "pymysql", "mysql", "MySQL/MariaDB support"),
}
ACCEPTED = "sqlite:///path.db, postgresql://user@host/db, mysql://user@host/db or mariadb://user@host/db"


def _parse(url: str) -> tuple[URL, tuple[str, str, str, str]]:
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise ConfigError(f"cannot parse SQL URL {url!r} ({exc}); accepted: {ACCEPTED}") from exc
    spec = _SCHEMES.get(parsed.drivername.lower())
    if spec is None:
        raise ConfigError(
            f"unsupported SQL URL scheme {parsed.drivername!r} in "
            f"{parsed.render_as_string(hide_password=True)!r}; accepted: {ACCEPTED}"
        )
    parsed = parsed.set(drivername=spec[0])
    if spec[0] == "mysql+pymysql" and "charset" not in parsed.query:
        parsed = parsed.update_query_dict({"charset": "utf8mb4"})
    return parsed, spec


def normalize_url(url: str) -> str:
    """The SQLAlchemy URL (with driver) for a URL as a user writes it; ConfigError if unusable."""
    return _parse(url)[0].render_as_string(hide_password=False)


def make_engine(url: str, **kwargs: Any) -> sa.Engine:
    """A SQLAlchemy Engine for ``url``; connects lazily (nothing happens on the network here).

    ConfigError for an unparsable URL or unknown scheme, MissingExtraError when the driver
    package is not installed. MySQL/MariaDB engines run in READ COMMITTED (no gap locks).
    """
    parsed, (driver, package, extra, purpose) = _parse(url)
    kwargs.setdefault("pool_pre_ping", True)
    if driver == "mysql+pymysql":
        kwargs.setdefault("isolation_level", "READ COMMITTED")
    try:
        engine = sa.create_engine(parsed, **kwargs)
    except ImportError as exc:
        raise MissingExtraError(package, extra, purpose) from exc
    except (ArgumentError, TypeError, ValueError) as exc:
        raise ConfigError(f"cannot use SQL URL {parsed.render_as_string(hide_password=True)!r}: {exc}") from exc
    if engine.dialect.name == "sqlite":
        configure_sqlite(engine)
    return engine


def configure_sqlite(engine: sa.Engine) -> None:
    """WAL, busy timeout, durable commits and real (optionally IMMEDIATE) transactions. Idempotent."""
    if not event.contains(engine, "connect", _sqlite_connect):
        event.listen(engine, "connect", _sqlite_connect)
    if not event.contains(engine, "begin", _sqlite_begin):
        event.listen(engine, "begin", _sqlite_begin)


def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # pysqlite must not BEGIN on its own; _sqlite_begin does
    cur = dbapi_conn.cursor()
    try:
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = FULL")
    finally:
        cur.close()


def _sqlite_begin(conn: sa.Connection) -> None:
    opts = conn.get_execution_options()
    if opts.get("isolation_level") == "AUTOCOMMIT":
        return
    conn.exec_driver_sql("BEGIN IMMEDIATE" if opts.get("zeroloss_immediate") else "BEGIN")


def engine_of(url_or_engine: object, what: str) -> tuple[sa.Engine, bool]:
    """The Engine for a URL (made here: True, the caller owns and disposes it) or the app's own
    Engine as given (False: the app disposes it). ``what`` names the caller in the errors.

    An AsyncEngine is refused: zeroloss's own statements run synchronously, and an async driver's
    engine cannot (``add`` takes the app's AsyncConnection/AsyncSession all the same)."""
    if isinstance(url_or_engine, str):
        return make_engine(url_or_engine), True
    if isinstance(url_or_engine, sa.Engine):
        if url_or_engine.dialect.name == "sqlite":
            configure_sqlite(url_or_engine)
        return url_or_engine, False
    if hasattr(url_or_engine, "sync_engine"):  # an AsyncEngine, without importing the asyncio extension
        raise ConfigError(
            f"{what} needs a URL or a synchronous Engine, got an AsyncEngine; pass its URL "
            "(e.g. postgresql://…), then give add() your AsyncConnection or AsyncSession"
        )
    raise ConfigError(f"{what} needs a SQL URL (str) or a SQLAlchemy Engine, got {type(url_or_engine).__name__}")
