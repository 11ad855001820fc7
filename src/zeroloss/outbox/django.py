"""``outbox.add`` through Django's own database connection, inside ``transaction.atomic()``.

Django's ORM does not run on SQLAlchemy, but its connection is the one running the business
transaction: the outbox's INSERT goes through it (``connection.cursor()``), compiled for the
outbox's dialect in Django's ``%s`` parameter style, so the message commits or rolls back with
the ``atomic`` block. Outside an ``atomic`` block Django would autocommit the message on its own,
before the business rows — so that is refused. Django is never imported here: its connection is
recognised by its module and attributes.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from zeroloss.errors import ConfigError


def is_django_connection(conn: object) -> bool:
    """True for ``django.db.connection`` (a proxy in ``django.utils.connection`` that forwards to the
    default alias's wrapper) or ``connections[alias]`` (the wrapper, in ``django.db.backends``)."""
    return (
        type(conn).__module__.startswith("django.")
        and hasattr(conn, "in_atomic_block")
        and hasattr(conn, "vendor")
        and hasattr(conn, "cursor")
    )


def insert(conn: Any, table: sa.Table, dialect: sa.Dialect, rows: list[dict[str, Any]]) -> None:
    """INSERT ``rows`` into the outbox ``table`` through Django's connection ``conn``."""
    if not conn.in_atomic_block:
        raise ConfigError(
            "outbox.add() through Django's connection outside transaction.atomic(): Django would commit the "
            "message at once, apart from your changes; put both in one `with transaction.atomic():` block"
        )
    ours = "mysql" if dialect.name in ("mysql", "mariadb") else dialect.name
    if conn.vendor != ours:
        raise ConfigError(
            f"Django's connection is {conn.vendor}, the outbox's engine {ours}: give SqlOutbox "
            "the URL of Django's own database"
        )
    # Django's cursors take %s placeholders on every backend (its SQLite cursor turns them into ?)
    dialect_class: Any = type(dialect)
    compiled = sa.insert(table).compile(dialect=dialect_class(paramstyle="format"), column_keys=list(rows[0]))
    names = compiled.positiontup or []
    with conn.cursor() as cursor:
        cursor.executemany(str(compiled), [[row[n] for n in names] for row in rows])
