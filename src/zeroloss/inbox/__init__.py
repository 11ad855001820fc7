"""The inbox: what a consumer group has already done (``base``), kept in the application's SQL
database (``sql``) or in Redis (``redis``)."""

from __future__ import annotations

import sqlalchemy as sa

from zeroloss.inbox.base import MAX_ID_LEN, BatchInbox, Inbox, check_ids, id_problem
from zeroloss.inbox.redis import RedisInbox, RedisTx
from zeroloss.inbox.sql import SqlInbox, inbox_table, transaction_aborted

__all__ = [
    "MAX_ID_LEN",
    "BatchInbox",
    "Inbox",
    "RedisInbox",
    "RedisTx",
    "SqlInbox",
    "check_ids",
    "id_problem",
    "inbox_table",
    "open_inbox",
    "transaction_aborted",
]


def open_inbox(url: str | sa.Engine) -> Inbox:
    """An inbox from a URL: ``redis://…`` / ``rediss://…`` → RedisInbox, any SQL URL (or a
    SQLAlchemy Engine) → SqlInbox."""
    if isinstance(url, str) and url.startswith(("redis://", "rediss://", "unix://")):
        return RedisInbox(url)
    return SqlInbox(url)
