"""The SQL outbox table and the mapping between its rows and :class:`~zeroloss.message.Message`."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql

from zeroloss.errors import ConfigError
from zeroloss.message import Message
from zeroloss.outbox.base import State

_TABLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,49}$")
_BLOB = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
_TEXT = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")


def _ascii(n: int) -> sa.types.TypeEngine[str]:
    """A short ASCII string compared bytewise everywhere (ids must sort the same in SQL and Python)."""
    return (
        sa.String(n)
        .with_variant(mysql.VARCHAR(n, charset="ascii", collation="ascii_bin"), "mysql", "mariadb")
        .with_variant(postgresql.VARCHAR(n, collation="C"), "postgresql")
    )


def outbox_table(name: str, metadata: sa.MetaData | None = None) -> sa.Table:
    """The outbox table definition (also what ``zeroloss init`` creates)."""
    if not _TABLE_RE.match(name):
        raise ConfigError(f"invalid outbox table name {name!r}: use 1-50 letters, digits or _")
    c = sa.Column
    return sa.Table(
        name,
        metadata if metadata is not None else sa.MetaData(),
        c("id", _ascii(36), primary_key=True),  # UUIDv7: primary-key order is time order
        c("topic", sa.String(249), nullable=False),
        c("msg_key", _BLOB, nullable=True),
        c("key_hash", _ascii(32), nullable=True),  # indexable stand-in for msg_key
        c("value", _BLOB, nullable=False),
        c("headers", _TEXT, nullable=True),  # JSON [[name, hex bytes], ...]
        c("state", _ascii(16), nullable=False),
        c("attempts", sa.Integer, nullable=False, default=0),
        c("not_before", sa.Double, nullable=False, default=0.0),
        c("lease_until", sa.Double, nullable=True),
        c("claimed_by", _ascii(64), nullable=True),
        c("created_at", sa.Double, nullable=False),
        c("last_error", _TEXT, nullable=True),
        c("location", sa.String(255), nullable=True),
        c("done_at", sa.Double, nullable=True),
        # PostgreSQL gets partial indexes instead (PG_PARTIAL_INDEXES, made by create_schema).
        # No (key_hash, id) index elsewhere any more: no statement read it (the claim's re-check
        # goes through ix_claim), and every add wrote it (NON_PG_UNUSED_INDEXES).
        sa.Index(f"ix_{name}_claim", "state", "id", "not_before").ddl_if(dialect=_NOT_PG),  # type: ignore[arg-type]
        sa.Index(f"ix_{name}_done", "state", "done_at").ddl_if(dialect=_NOT_PG),  # type: ignore[arg-type]
        sa.Index(f"ix_{name}_wait", "state", "not_before").ddl_if(dialect=_NOT_PG),  # type: ignore[arg-type]
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
    )


_NOT_PG = ("sqlite", "mysql", "mariadb")  # ddl_if takes a tuple at run time; its stub says str
NON_PG_UNUSED_INDEXES = ("key",)
"""MariaDB/SQLite: index suffixes that tables of earlier versions have and no statement reads
(each only costs every add a write); ``zeroloss init`` says they may be dropped."""
_UNDELIVERED = "state IN ('pending', 'sending', 'failed')"
PG_PARTIAL_INDEXES = {
    # The claim's candidate scan: pending rows in id order, not the delivered history before them.
    "pending": ("id", "state = 'pending'"),
    # The claim's per-key re-check and the parked-key count: each key's undelivered rows only.
    "live": ("key_hash, id", _UNDELIVERED),
    # Keys in a backoff, sending (blocked keys, expired leases) and failed rows.
    "wait": ("state, not_before", _UNDELIVERED),
    # Retention: the oldest delivered rows.
    "done": ("done_at", "state = 'success'"),
}
"""PostgreSQL's indexes besides the primary key (``SqlOutbox.create_schema`` makes them; MariaDB
has no partial indexes): suffix → (columns, predicate). Each holds either the backlog or the
history, never both, so an index stays as small as what it serves, and a message's two
updates (claimed, delivered) write 3 and 2 index entries instead of 5 and 5. Tables made by
earlier versions have full ``claim``/``key``/``done``/``wait`` indexes; ``zeroloss init``
adds the missing ones and says which old ones may be dropped."""


def key_hash(key: bytes | None) -> str | None:
    return None if key is None else hashlib.blake2b(key, digest_size=16).hexdigest()


def message_of(row: Any) -> Message:
    headers = tuple((str(k), bytes.fromhex(v)) for k, v in json.loads(row.headers)) if row.headers else ()
    return Message(
        id=row.id,
        topic=row.topic,
        value=bytes(row.value),
        key=None if row.msg_key is None else bytes(row.msg_key),
        headers=headers,
        created_at=float(row.created_at),
        attempts=int(row.attempts),
        not_before=float(row.not_before),
        last_error=row.last_error,
    )


def messages_of(rows: Any) -> list[Message]:
    """:func:`message_of` for rows of exactly (id, topic, msg_key, key_hash, value, headers,
    created_at, attempts, not_before, last_error) from PostgreSQL, whose driver returns the
    Python types already: unpacked as tuples, a quarter of a 2,000-row claim's time went to
    reading a SQLAlchemy Row's attributes one by one (bench/results/notes.md). ``bytes()`` stays:
    psycopg2 (a user's own engine) returns bytea as memoryview; on bytes it is the same object."""
    return [
        Message(
            i,
            topic,
            bytes(value),
            None if key is None else bytes(key),
            tuple((str(k), bytes.fromhex(v)) for k, v in json.loads(headers)) if headers else (),
            created_at,
            attempts,
            not_before,
            last_error,
        )
        for i, topic, key, _hash, value, headers, created_at, attempts, not_before, last_error in rows
    ]


def row_of(msg: Message) -> dict[str, Any]:
    """The INSERT parameters for a new ``pending`` message."""
    return {
        "id": msg.id,
        "topic": msg.topic,
        "msg_key": msg.key,
        "key_hash": key_hash(msg.key),
        "value": msg.value,
        "state": State.PENDING.value,
        "attempts": msg.attempts,
        "not_before": msg.not_before,
        "created_at": msg.created_at,
        "headers": json.dumps([[k, v.hex()] for k, v in msg.headers]) if msg.headers else None,
    }
