"""The seam between the relay and wherever messages wait: the :class:`OutboxStore` Protocol.

States (the one vocabulary, see DESIGN.md): ``tmp`` → ``pending`` → ``sending`` →
``success`` | ``pending`` (retry) | ``failed``; spool only: ``doubt`` and ``malformed``.

Per-key order is the store's job at claim time: a pending message is claimable only when no
*earlier* message with the same key is still ``pending`` outside this claim (waiting out a
backoff, or locked by another relay), ``sending`` or ``failed`` (spool: or ``doubt``). Such a message therefore
*parks* its key until an operator requeues or purges it; messages without a key never wait.
"""

from __future__ import annotations

import builtins
import enum
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from zeroloss.errors import ConfigError
from zeroloss.message import Message


class State(enum.StrEnum):
    """Where a message is; the value is also the spool directory name and the SQL column value."""

    TMP = "tmp"
    PENDING = "pending"
    SENDING = "sending"
    SUCCESS = "success"
    FAILED = "failed"
    DOUBT = "doubt"
    MALFORMED = "malformed"


PURGEABLE = frozenset({State.FAILED, State.DOUBT, State.MALFORMED})
"""The states whose messages an operator may delete (:meth:`OutboxStore.purge`)."""


def check_purgeable(state: State) -> None:
    """ConfigError unless ``state`` is one whose messages may be purged."""
    if state not in PURGEABLE:
        raise ConfigError(
            f"cannot purge {state.value!r} messages; only {', '.join(sorted(s.value for s in PURGEABLE))} can be purged"
        )


def id_floor(unix_s: float) -> str:
    """The smallest UUIDv7 string of the given time: every id created at or after ``unix_s``
    compares ``>=`` to it (ids are lowercase hex with the millisecond time in front)."""
    h = f"{max(0, int(unix_s * 1000)):012x}"
    return f"{h[:8]}-{h[8:]}"


Resolver = Callable[[str], bool | None]
"""Given a spool transaction id: True if the app's transaction committed, False if it rolled
back, None if it cannot tell (the files then go to ``doubt``). One that raises could not ask: the
files stay in ``tmp`` and the next recover asks again. Ready-made ones: :mod:`.resolvers`."""


@dataclass(frozen=True, slots=True)
class Delivered:
    """A message the broker acknowledged, and where the broker put it (e.g. ``orders/2/1543``)."""

    message: Message
    location: str


@dataclass(slots=True)
class Stats:
    """What ``zeroloss status`` shows: a count for every state, so nothing hides."""

    counts: dict[State, int]
    oldest_pending_age_s: float | None = None
    oldest_age_s: dict[State, float] = field(default_factory=dict)
    """Per non-empty state: seconds since its oldest message was created (``malformed``: since
    its oldest file was last modified, as its content cannot be trusted)."""
    expired_leases: int = 0
    parked: int = 0
    disk_free_bytes: int | None = None
    """Spool only: bytes an unprivileged writer can still use on the spool's filesystem."""
    disk_total_bytes: int | None = None
    """Spool only: used + free bytes (blocks reserved for root left out), so that
    ``1 - free / total`` is the used share ``df`` shows."""
    oldest_pending_error: str | None = None
    """Why the oldest ``pending`` message is still waiting, as the relay last recorded it (a
    broker outage, a retry's error), so ``status`` can say what holds the backlog back."""
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(slots=True)
class RecoveryReport:
    """What :meth:`OutboxStore.recover` did."""

    lease_expired: int = 0
    promoted: int = 0
    discarded: int = 0
    doubt: int = 0
    malformed: int = 0


@runtime_checkable
class OutboxStore(Protocol):
    """Where committed messages wait for the relay: what the relay needs, and no more (the
    operators' side is :class:`OutboxAdmin`). Every method is safe to call from any process
    sharing the store; a relay's view is always "what I claimed under my lease"."""

    def claim(self, limit: int, lease_s: float) -> list[Message]:
        """Move up to ``limit`` due ``pending`` messages to ``sending`` under a lease of
        ``lease_s`` seconds and return them oldest first, honouring per-key order."""
        ...

    def now(self) -> float:
        """The store's clock in Unix seconds, which leases and ``not_before`` are measured by (SQL:
        the database server's, so relays on hosts with skewed clocks agree; spool: this machine's)."""
        ...

    def extend(self, messages: Sequence[Message], lease_s: float) -> int:
        """Renew the lease on those of ``messages`` this relay still holds in ``sending`` to
        ``lease_s`` from now (a publish that runs long); returns how many it still held."""
        ...

    def succeed(self, delivered: Sequence[Delivered]) -> None:
        """``sending`` → ``success``, recording where the broker put each one."""
        ...

    def retry(self, messages: Sequence[Message]) -> None:
        """``sending`` → ``pending``, storing each message's new ``attempts``, ``not_before``
        and ``last_error`` exactly as given (the relay computes them)."""
        ...

    def fail(self, messages: Sequence[Message]) -> None:
        """``sending`` → ``failed``, storing ``attempts`` and ``last_error`` as given."""
        ...

    def recover(self, resolver: Resolver | None = None) -> RecoveryReport:
        """Return ``sending`` messages whose lease expired to ``pending``; spool: resolve
        leftover ``tmp`` files and quarantine unreadable ones."""
        ...

    def purge_success(self, older_than_s: float) -> int:
        """Delete ``success`` records older than ``older_than_s`` seconds (retention)."""
        ...

    def stats(self, *, delivered: bool = True) -> Stats:
        """Counts per state and the ages an operator needs. ``delivered=False``: the ``success``
        count and age are not read (left 0 / absent), for callers that need only the backlog
        (the relay's drain check and progress line): counting the delivered history kept for
        audit reads all of it, 150-360 ms at 1M rows on PostgreSQL."""
        ...

    def close(self) -> None:
        """Release connections and files."""
        ...


@runtime_checkable
class OutboxAdmin(OutboxStore, Protocol):
    """The relay's store plus what operators and ``audit`` do with it: look messages up, give
    failed ones another chance or delete them, page through the delivered, send lost ones again."""

    states: frozenset[State]
    """The states this kind of store can hold (``doubt`` and ``malformed`` only occur in a spool)."""

    def get(self, message_id: str) -> tuple[State, Message]:
        """The message with that id and its state; UnknownMessageError if there is none."""
        ...

    def list(self, state: State, limit: int = 100) -> list[Message]:
        """Up to ``limit`` messages in ``state``, oldest first (for operators)."""
        ...

    def location(self, message_id: str) -> str:
        """Where the broker put a ``success`` message (``topic/partition/offset`` or the broker's
        own terms); UnknownMessageError if it is not in ``success``."""
        ...

    def requeue(self, message_ids: Sequence[str]) -> int:
        """``failed`` (or spool ``doubt``) → ``pending`` with attempts reset to 0 and no
        backoff, which also un-parks their keys. Returns how many moved; ids in other states
        raise UnknownMessageError naming them, and nothing moves."""
        ...

    def purge(self, state: State, message_ids: Sequence[str] | None = None) -> int:
        """Delete messages an operator gave up on: ``failed``, ``doubt`` or ``malformed`` (for
        ``malformed`` the ids are the quarantined file names); ``None`` deletes every one in
        ``state``. Returns how many were deleted. Ids not in ``state`` raise UnknownMessageError
        naming them, and nothing is deleted; any other state raises ConfigError. Deleting a
        ``failed`` message un-parks its key."""
        ...

    def list_success(
        self, since_s: float | None = None, *, after_id: str | None = None, limit: int = 1000
    ) -> builtins.list[Delivered]:
        """Up to ``limit`` ``success`` messages with where the broker put them, in id (= creation)
        order: those created in the last ``since_s`` seconds (all when None) and, for paging,
        with an id greater than ``after_id``. For ``audit``."""
        ...

    def resend(self, message_ids: Sequence[str]) -> int:
        """``success`` → ``pending`` with attempts reset, no backoff and the location forgotten,
        so the relay publishes them again under the same id (``audit --repair``, for records the
        broker lost). Returns how many moved; ids not in ``success`` raise UnknownMessageError
        naming them, and nothing moves."""
        ...


@runtime_checkable
class Wakeable(Protocol):
    """A store that can tell an idle relay that new work arrived."""

    def wait_for_work(self, timeout_s: float, interrupt: threading.Event) -> None:
        """Return once new messages may be waiting, after ``timeout_s`` at most, or when
        ``interrupt`` is set."""
        ...


@runtime_checkable
class ClaimsAfterRecording(Protocol):
    """A store that records one batch delivered and claims the next in one transaction: one
    commit (a WAL flush) and one round of connection checkout per batch fewer."""

    def succeed_and_claim(self, delivered: Sequence[Delivered], limit: int, lease_s: float) -> list[Message]:
        """:meth:`OutboxStore.succeed` then :meth:`OutboxStore.claim`, committed together: the
        claim sees the batch delivered (its keys' next messages may go), and if it fails, neither
        happened (the delivered ones stay ``sending`` under their lease, to be recorded again)."""
        ...
