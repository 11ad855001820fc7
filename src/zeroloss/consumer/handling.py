"""The one handling loop every broker's messages go through: attempts, backoff, outages, dead letters.

A message is handled in one inbox transaction (claim its id, run ``handler(msg, tx)``, commit);
a claim that exists already makes it a duplicate. What happens after is the broker's half, given
as a :class:`Settlement` — Kafka marks an offset done and may pass the message to a retry topic,
the others ack it or touch it while it waits.
The details: docs/design.md, "consumer/handling.py". (Just over 400 lines: attempts, outages
and shared transactions are one state machine.)"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from sqlalchemy.exc import DBAPIError

from zeroloss.backoff import backoff_s
from zeroloss.consumer.dead_letters import ParkingLot
from zeroloss.consumer.kafka_txn import KafkaTransactions, Outbound, TxnAborted
from zeroloss.errors import MalformedMessageError, MessageError, StoreError, StoreSetupError, TransactionLostError
from zeroloss.inbox import BatchInbox, Inbox, transaction_aborted
from zeroloss.logs import age, brief
from zeroloss.received import BatchHandler, Handler, Received

log = logging.getLogger(__name__)

RUN_BUDGET_S = 2.0  # about how long one shared inbox transaction may stay open


class TransactionAborted(Exception):
    """A handler left its inbox transaction failed: it counts as the handler's failure."""


class HandlerFailed(Exception):
    """The handler raised ``exc`` (or left its transaction aborted)."""

    def __init__(self, exc: Exception) -> None:
        super().__init__(str(exc))
        self.exc = exc


class _BatchFailed(HandlerFailed):
    """A batch handler raised: roll back; its messages are taken one by one to find which."""


class _RunAgain(Exception):
    """A handler in a shared transaction raised: roll back, and run the messages before it again."""


# The database is not set up for the handler's statements: a table, column, function or schema
# that does not exist, or a right not granted. Every message would fail the same way until someone
# runs the migrations or grants the right, so it is the deployment's fault, not the message's.
_SCHEMA_SQLSTATES = {
    "42P01": "no such table",
    "42703": "no such column",
    "42883": "no such function",
    "3F000": "no such schema",
    "42501": "permission denied",
}  # PostgreSQL
_SCHEMA_MYSQL = {
    1146: "no such table",
    1054: "no such column",
    1305: "no such function",
    1049: "no such database",
    1142: "permission denied",
    1143: "permission denied",
}
# SQLite says it in words: "no such table: t", "no such column: c", "table t has no column named c"
_SCHEMA_SQLITE = re.compile(r"^(?:(no such (?:table|column|function))|table \S+ has no column named )")


def schema_problem(exc: BaseException) -> str | None:
    """What is missing from the database, when ``exc`` says the handler's schema is not there."""
    if isinstance(exc, StoreSetupError):  # the handler's outbox.add(tx, ...): its table never made
        return (schema_problem(exc.__cause__) if exc.__cause__ is not None else None) or "its outbox not set up"
    if not isinstance(exc, DBAPIError):
        return None
    orig = exc.orig
    if (
        state := getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    ) in _SCHEMA_SQLSTATES:  # psycopg2: pgcode
        return _SCHEMA_SQLSTATES[state]
    args: tuple[object, ...] = getattr(orig, "args", ())
    if args and isinstance(args[0], int) and args[0] in _SCHEMA_MYSQL:
        return _SCHEMA_MYSQL[args[0]]
    if (m := _SCHEMA_SQLITE.match(str(orig))) is None:
        return None
    return m.group(1) or "no such column"


def is_outage(exc: BaseException) -> bool:
    """A failure of the infrastructure or the deployment rather than of the message: do not spend
    an attempt (the database is down, or not set up for the handler: :func:`schema_problem`)."""
    if isinstance(exc, StoreSetupError):
        return True  # an outbox the handler writes to, not set up: the deployment's, as schema_problem
    if isinstance(exc, StoreError):
        return exc.retriable
    return isinstance(exc, DBAPIError) and (bool(exc.connection_invalidated) or schema_problem(exc) is not None)


_STORE, _SCHEMA = "store", "schema"  # the kinds of outage Handling.say_outage tells apart


class Settlement(Protocol):
    """The broker's half of handling one message."""

    def done(self) -> None:
        """It succeeded or was a duplicate (Kafka: nothing yet, the caller marks the offset; others: ack)."""
        ...

    def dead_letter(self, error: BaseException, attempts: int, first_failure: float) -> bool:
        """Store it as a dead letter; True once stored, False if stopping interrupted."""
        ...

    def retry_later(self, error: Exception, attempts: int, first_failure: float) -> bool | None:
        """Pass it on to be retried elsewhere (Kafka retry topics): True once passed, False if
        stopping interrupted; None where it is retried in place."""
        ...

    def before_backoff(self) -> bool:
        """Before waiting out a backoff (Kafka: commit what is done); False: stop here."""
        ...

    def after_backoff(self) -> None:
        """After the wait, before the next try (others: keep the delivery ours)."""
        ...


Finished = Callable[[str, str, "Received | None", "float | None"], None]


@dataclass(slots=True)
class Handling:
    """The handler, the inbox and the retry rules, shared by the Kafka and subscription loops."""

    group: str
    inbox: Inbox | None
    txn: KafkaTransactions | None
    max_attempts: int
    backoff_base_s: float
    max_backoff_s: float
    transaction_batch: int
    stop: threading.Event
    finished: Finished  # (topic, outcome, message, started): counters and metrics
    count_store_error: Callable[[], None]
    # where a dead letter that no broker would take is kept (zeroloss.consumer.dead_letters)
    parking: ParkingLot = field(default_factory=lambda: ParkingLot("zeroloss-parked"))
    handler: Handler | None = None
    handle_many: BatchHandler | None = None  # a batch handler's call for a shared transaction's fresh messages
    handler_s: float = 0.0  # moving average of one handler call, for the shared transactions' size
    # an outage (the inbox's store down, or the handler's database not set up: _SCHEMA) is said
    # once at ERROR, again only if it changes kind, and its end at INFO; the tries between are DEBUG
    down_since: float | None = None  # monotonic
    down_kind: str | None = None

    def run_limit(self) -> int:
        """Messages per shared transaction: ``transaction_batch``, fewer when handlers are slow,
        so a transaction stays open about RUN_BUDGET_S at most — not long enough to meet the
        inbox's idle-in-transaction timeout or to hold its row locks for long. A batch handler's
        runs stay ``transaction_batch`` long: its call may cost the same whatever the run's size
        (a bulk HTTP request), and shrinking the runs then only divides the throughput."""
        if self.handle_many is not None:
            return self.transaction_batch
        # multiplied, not divided: a clock too coarse to see a call (0 s, again and again) decays
        # the average toward 0 until RUN_BUDGET_S / handler_s is inf, which int() refuses
        if self.handler_s * self.transaction_batch <= RUN_BUDGET_S:
            return self.transaction_batch
        return max(1, int(RUN_BUDGET_S / self.handler_s))

    def handle(
        self,
        msg: Received,
        settle: Settlement,
        *,
        attempts: int = 0,
        first_failure: float | None = None,
        failure: Exception | None = None,
    ) -> bool:
        """Handle ``msg`` to the end: True once it succeeded, was a duplicate, was passed on or
        was dead-lettered; False if stopping interrupted a wait (it will be redelivered).
        ``failure``: its handler already raised this once, in a shared transaction."""
        outages = 0
        while True:
            error: Exception
            if failure is not None:  # the first attempt already ran, in a shared transaction
                error, faulty, failure = failure, True, None
            else:
                started = time.monotonic()
                try:
                    fresh = self.attempt(replace(msg, attempts=attempts + 1))
                except TxnAborted:
                    raise
                except HandlerFailed as failed:
                    error, faulty = failed.exc, not is_outage(failed.exc)
                except MessageError as exc:  # the inbox refused the id itself
                    return settle.dead_letter(exc, attempts, first_failure or time.time())
                except Exception as exc:  # the inbox failed (StoreError, or anything unexpected from it)
                    error, faulty = exc, False
                else:
                    self.say_back()
                    settle.done()
                    self.finished(msg.topic, "processed" if fresh else "duplicate", msg, started)
                    if not fresh:
                        log.debug("message %s: duplicate, skipped", msg.id)
                    return True
            if faulty:
                self.say_back()  # the handler's own failure: its database answered, so no outage now
                attempts += 1
                first_failure = first_failure or time.time()
                if isinstance(error, (MessageError, MalformedMessageError)):  # poison: no retry can fix it
                    return settle.dead_letter(error, attempts, first_failure)
                passed = settle.retry_later(error, attempts, first_failure)
                if passed is not None:
                    return passed
                if attempts >= self.max_attempts:
                    return settle.dead_letter(error, attempts, first_failure)
                self.finished(msg.topic, "retry", None, None)
                delay = backoff_s(attempts, self.backoff_base_s, self.max_backoff_s)
                log.warning(
                    "message %s failed (attempt %d of %d): %s; again in %.2fs",
                    msg.id,
                    attempts,
                    self.max_attempts,
                    brief(error),
                    delay,
                )
            else:  # not the message's fault: no attempt spent
                outages += 1
                self.count_store_error()
                delay = backoff_s(outages, self.backoff_base_s, self.max_backoff_s)
                self.say_outage(msg, error, delay)
            if not settle.before_backoff():
                return False
            if self.stop.wait(delay):
                log.info("stopping: message %s left for redelivery", msg.id)
                return False
            settle.after_backoff()

    def say_outage(self, msg: Received, error: Exception, delay: float) -> None:
        """Log one try that failed for nobody's fault: ERROR the first time (or when the kind of
        outage changes), DEBUG while it lasts, so a long outage is not a wall of identical lines."""
        missing = schema_problem(error)
        kind = _STORE if missing is None else _SCHEMA
        if self.down_since is not None and self.down_kind == kind:
            log.debug(
                "message %s: %s still fails (%s); again in %.1fs",
                msg.id,
                "the inbox's store" if kind == _STORE else "the handler's database",
                brief(error),
                delay,
            )
            return
        if self.down_since is None:
            self.down_since = time.monotonic()
        self.down_kind = kind
        if missing is not None:
            log.error(
                "message %s: the handler's database is not set up for it, %s (%s); not the message's "
                "fault, so no attempt is spent: run the migrations or grant the right; retrying with "
                "backoff (next in %.1fs)",
                msg.id,
                missing,
                brief(error),
                delay,
            )
        else:
            log.error(
                "message %s: the inbox's store failed (%s); retrying with backoff (next in %.1fs)",
                msg.id,
                brief(error),
                delay,
            )

    def say_back(self) -> None:
        """The end of an outage said by :meth:`say_outage`, once, at INFO."""
        if self.down_since is None:
            return
        back = "the handler's database is set up" if self.down_kind == _SCHEMA else "the inbox is back"
        log.info("consumer %s: %s after %s", self.group, back, age(time.monotonic() - self.down_since))
        self.down_since = self.down_kind = None

    def attempt(self, msg: Received) -> bool:
        """One try in one transaction; True if the handler ran, False for a duplicate."""
        if self.txn is not None:
            out = Outbound(msg.id, msg.timestamp_ms)
            self.call(msg, out)
            self.txn.add(out.messages)
            return True
        if self.inbox is None:
            self.call(msg, None)
            return True
        try:
            with self.inbox.transaction() as tx:
                if not self.inbox.claim(tx, self.group, msg.id):
                    return False
                self.call(msg, tx)
        except TransactionLostError as exc:  # the handler caught the error that ended it
            raise HandlerFailed(exc) from exc
        return True

    def call(self, msg: Received, tx: Any) -> None:
        assert self.handler is not None
        self._guarded(self.handler, msg, tx)

    def call_many(self, msgs: list[Received], tx: Any) -> None:
        assert self.handle_many is not None
        self._guarded(self.handle_many, msgs, tx)

    @staticmethod
    def _guarded(fn: Callable[[Any, Any], None], arg: Any, tx: Any) -> None:
        """``fn(arg, tx)``; HandlerFailed when it raised or left its transaction aborted."""
        try:
            fn(arg, tx)
        except Exception as exc:
            raise HandlerFailed(exc) from exc
        if transaction_aborted(tx):
            raise HandlerFailed(
                TransactionAborted(
                    "the handler returned after a database error it caught: its transaction is aborted and "
                    "would commit nothing; let the error propagate, or wrap the statement in tx.begin_nested()"
                )
            )

    def shared_transaction(self, msgs: list[Received]) -> tuple[list[tuple[bool, float]], Exception | None] | None:
        """One inbox transaction for ``msgs``: one bulk claim, the handlers of the fresh ones, one
        commit. Returns, for the messages that committed (a prefix of ``msgs``), (fresh, when its
        handling began), and the exception of the message after them if its handler raised. A
        handler that raises rolls the whole transaction back; the messages before it run again in
        a new one (their effects were undone with it) and the failed one counts that run as its
        first attempt. None if the transaction itself failed (the database went away, the commit
        failed): none of it happened."""
        assert isinstance(self.inbox, BatchInbox)
        failure: Exception | None = None
        outcomes: list[tuple[bool, float]] = []
        while msgs:
            started = time.monotonic()
            outcomes = []
            try:
                with self.inbox.transaction() as tx:
                    fresh = self.inbox.claim_many(tx, self.group, [m.id for m in msgs])
                    if self.handle_many is not None:
                        outcomes = self._batch(msgs, fresh, tx, started)
                        break
                    for n, msg in enumerate(msgs):
                        if msg.id not in fresh:
                            outcomes.append((False, started))
                            continue
                        fresh.discard(msg.id)  # the same id twice in one run: the second is a duplicate
                        began = time.monotonic()
                        try:
                            self.call(msg, tx)
                        except HandlerFailed as failed:
                            if is_outage(failed.exc):
                                raise
                            failure, msgs = failed.exc, msgs[:n]
                            raise _RunAgain() from None
                        outcomes.append((True, began))
                        self.handler_s = 0.9 * self.handler_s + 0.1 * (time.monotonic() - began)
            except _RunAgain:
                continue
            except TxnAborted:
                raise
            except _BatchFailed as failed:  # which message? each alone says, with its own attempts
                log.warning(
                    "consumer %s: the batch handler raised on %d messages (%s); taking them one by one",
                    self.group,
                    len(msgs),
                    brief(failed.exc),
                )
                return None
            except TransactionLostError as exc:  # a handler caught a deadlock: which one? each alone says
                log.warning(
                    "consumer %s: a transaction of %d messages was lost under its handlers (%s); "
                    "taking them one by one",
                    self.group,
                    len(msgs),
                    exc,
                )
                return None
            except Exception as exc:  # StoreError, a lost connection, an outage: nothing in the run happened
                self.count_store_error()
                cause = exc.exc if isinstance(exc, HandlerFailed) else exc  # an outage met by a handler
                log.warning(
                    "consumer %s: a transaction of %d messages failed (%s); taking them one by one",
                    self.group,
                    len(msgs),
                    brief(cause),
                )
                return None
            break
        return (outcomes if msgs else []), failure

    def _batch(self, msgs: list[Received], fresh: set[str], tx: Any, started: float) -> list[tuple[bool, float]]:
        """The batch handler's one call for the fresh messages of ``msgs`` (a repeated id: the
        second is a duplicate); _BatchFailed when it raised, an outage as itself."""
        todo: list[Received] = []
        outcomes: list[tuple[bool, float]] = []
        for msg in msgs:
            is_fresh = msg.id in fresh
            fresh.discard(msg.id)
            outcomes.append((is_fresh, started))
            if is_fresh:
                todo.append(msg)
        if todo:
            began, n = time.monotonic(), len(todo)  # counted before: the handler may empty its list
            try:
                self.call_many(todo, tx)
            except HandlerFailed as failed:
                if is_outage(failed.exc):
                    raise
                raise _BatchFailed(failed.exc) from None
            per_message = (time.monotonic() - began) / n
            self.handler_s = 0.9 * self.handler_s + 0.1 * per_message
        return outcomes
