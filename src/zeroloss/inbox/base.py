"""What a consumer group has already done: the inbox protocol that turns at-least-once delivery
into exactly-once effects, and the limits every inbox puts on group names and message ids.

The consumer opens ``with inbox.transaction() as tx``, calls ``inbox.claim(tx, group, id)`` and,
only when that returns True, runs the handler with ``tx``; the transaction commits the claim and
the handler's effects together. A duplicate delivery finds the claim and skips the handler.
The forms: :class:`zeroloss.inbox.sql.SqlInbox` and :class:`zeroloss.inbox.redis.RedisInbox`.
Message ids are our UUIDv7 ids or, for foreign records without a ``zeroloss-id`` header,
``"topic/partition/offset"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

from zeroloss.errors import ConfigError, MessageError

MAX_ID_LEN = 255


@runtime_checkable
class Inbox(Protocol):
    """Records which (group, message id) pairs have been processed."""

    def transaction(self) -> AbstractContextManager[Any]:
        """A unit of work; what it yields is handed to the handler as ``tx``."""
        ...

    def claim(self, tx: Any, group: str, message_id: str) -> bool:
        """Mark the message processed by ``group`` as part of ``tx``; False if it already was."""
        ...

    def seen(self, group: str, message_id: str) -> bool:
        """Whether a committed claim exists (tests, audit)."""
        ...

    def purge(self, older_than_s: float) -> int:
        """Forget claims older than ``older_than_s``; returns how many. A redelivery older than
        the retention is no longer recognised as a duplicate, so keep it above the longest
        possible redelivery delay (consumer downtime plus the broker's retention)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class BatchInbox(Inbox, Protocol):
    """An inbox whose transaction can hold many messages' claims and effects."""

    def claim_many(self, tx: Any, group: str, message_ids: Sequence[str]) -> set[str]:
        """Claim all of ``message_ids`` in ``tx``; the ones that were not claimed before."""
        ...


def id_problem(value: str) -> str | None:
    """Why ``value`` cannot be a message id (or group name) in every inbox; None if it can.

    Checked where a consumed record becomes a :class:`~zeroloss.received.Received`, and again by
    the claim: an id the database refuses would otherwise fail the claim on every delivery — an
    outage that never heals — instead of making one dead letter."""
    if not isinstance(value, str) or not value:
        return "is empty"
    if len(value) > MAX_ID_LEN:
        return f"is {len(value)} characters long; the inbox's column holds {MAX_ID_LEN}"
    if "\x00" in value:
        return "contains a NUL character, which PostgreSQL cannot store"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (it holds a lone surrogate)"
    return None


def check_ids(group: str, message_id: str) -> None:
    if (why := id_problem(group)) is not None:
        raise ConfigError(f"inbox group {group!r:.80} {why}")
    if (why := id_problem(message_id)) is not None:
        raise MessageError(f"message id {message_id!r:.80} {why}")
