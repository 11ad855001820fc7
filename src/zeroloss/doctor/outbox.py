"""``zeroloss doctor`` on the outbox (``--source``): reachable and initialised, and the database's
durability settings (PostgreSQL ``fsync``/``synchronous_commit``, MariaDB/MySQL
``innodb_flush_log_at_trx_commit``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from zeroloss.doctor.base import Check, Verdict
from zeroloss.errors import ConfigError, StoreSetupError, ZerolossError

if TYPE_CHECKING:
    from zeroloss.outbox.base import Stats

log = logging.getLogger("zeroloss.doctor.checks")  # doctor's logger name, as before the split


def source_checks(url: str, table: str = "zeroloss_outbox") -> list[Check]:
    from zeroloss.registry import open_store

    init = f"zeroloss init --source {url}"
    if table != "zeroloss_outbox" and not url.startswith("spool:"):
        init += f" --table {table}"  # without it init makes zeroloss_outbox, and this check fails again
    try:
        store = open_store(url, table=table)
    except (ConfigError, StoreSetupError) as exc:  # a spool or SQLite file not there: as an uninitialised table
        return [Check("outbox reachable", Verdict.FAIL, str(exc), init)]
    try:
        stats: Stats | None = None
        try:
            stats = store.stats()
        except ZerolossError as exc:
            checks = [
                Check(
                    "outbox reachable",
                    Verdict.FAIL,
                    str(exc),
                    f"start the database, or create the outbox: {init}",
                )
            ]
        else:
            total = sum(stats.counts.values())
            checks = [Check("outbox reachable", Verdict.OK, f"{type(store).__name__}: {total} message(s)")]
        if stats is not None and stats.disk_total_bytes and stats.disk_free_bytes is not None:
            used = 100.0 * (1 - stats.disk_free_bytes / stats.disk_total_bytes)
            v = Verdict.FAIL if used > 90 else Verdict.WARN if used > 80 else Verdict.OK
            checks.append(
                Check(
                    "spool disk",
                    v,
                    f"{used:.0f}% used",
                    "" if v is Verdict.OK else "free space on the spool's filesystem",
                )
            )
        engine = getattr(store, "engine", None)
        if engine is not None:
            checks += _database_checks(engine)
        return checks
    finally:
        store.close()


def _database_checks(engine: Any) -> list[Check]:
    import sqlalchemy as sa

    dialect = engine.dialect.name
    if dialect == "postgresql":
        wanted = {"fsync": ("on",), "synchronous_commit": ("on", "remote_write", "remote_apply")}
        query: Callable[[Any, str], str] = lambda c, k: str(c.execute(sa.text(f"SHOW {k}")).scalar())  # noqa: E731
    elif dialect in ("mysql", "mariadb"):
        wanted = {"innodb_flush_log_at_trx_commit": ("1",)}
        query = lambda c, k: str(c.execute(sa.text(f"SELECT @@{k}")).scalar())  # noqa: E731
    else:
        return []
    checks = []
    try:
        conn = engine.connect()
    except sa.exc.DBAPIError as exc:
        return [Check("database settings", Verdict.SKIP, f"cannot connect: {exc.orig}")]
    with conn:
        for key, good in wanted.items():
            try:
                value = query(conn, key)
            except sa.exc.DBAPIError as exc:
                checks.append(Check(f"database {key}", Verdict.WARN, f"cannot read it: {exc.orig}"))
                continue
            ok = value.lower() in good
            checks.append(
                Check(
                    f"database {key}",
                    Verdict.OK if ok else Verdict.FAIL,
                    f"{key}={value}"
                    + (
                        ""
                        if ok
                        else ": a commit the app saw can vanish in a crash after the relay published its message"
                    ),
                    "" if ok else f"set {key}={good[0]}",
                )
            )
    return checks
