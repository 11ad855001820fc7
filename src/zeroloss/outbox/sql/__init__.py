"""The SQL outbox: one table in the application's own database (SQLite, PostgreSQL, MariaDB/MySQL);
how it claims, leases, keeps per-key order and wakes an idle relay: docs/design.md ("The SQL
outbox"). ``table.py`` defines the table, ``core.py`` holds what every side shares, ``schema.py``
creates it, ``writer.py`` is the application's side (``add``), ``relay_side.py`` the relay's,
``admin.py`` the operators'.

``SqlOutbox`` is all of them as mixins over ``SqlCore``, as ``FileSpool`` is: one object with one
state (engine, clock, claim token), each side's methods in its own module; composition would add
a forwarding method for every call of a class users import whole.
"""

from __future__ import annotations

from zeroloss.outbox.sql.admin import SqlAdmin
from zeroloss.outbox.sql.relay_side import SqlRelaySide
from zeroloss.outbox.sql.schema import SqlSchema
from zeroloss.outbox.sql.table import key_hash, outbox_table
from zeroloss.outbox.sql.writer import SqlWriter

__all__ = ["SqlOutbox", "key_hash", "outbox_table"]


class SqlOutbox(SqlWriter, SqlRelaySide, SqlAdmin, SqlSchema):
    """An :class:`~zeroloss.outbox.base.OutboxStore` in one SQL table (SQLAlchemy Core)."""

    def close(self) -> None:
        self._stop_listening()
        if self._owns_engine:
            self.engine.dispose()
