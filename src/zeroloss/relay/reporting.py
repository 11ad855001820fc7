"""What the relay says (logger ``zeroloss.relay``, INFO unless noted) and its readiness: a start
line naming source, target and settings (passwords masked); a progress line every
``progress_every_s`` while there is anything to say; one WARNING when the broker or the store
goes away and one line when it is back (the tries between are DEBUG); a summary when it stops.
:class:`RelayReports` is a mixin of :class:`~zeroloss.relay.loop.Relay`, whose state it reads.
A relay given ``on_progress`` hands it each :class:`RelayProgress` instead of logging the line
(``zeroloss relay --drain`` on a terminal draws a bar with it)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from zeroloss import metrics
from zeroloss.backoff import backoff_s
from zeroloss.brokers.base import Broker
from zeroloss.errors import BrokerError, StoreError
from zeroloss.logs import Progress, age
from zeroloss.outbox.base import OutboxStore, State
from zeroloss.relay.settings import RelayCounters, RelaySettings

log = logging.getLogger("zeroloss.relay")


@dataclass(frozen=True, slots=True)
class RelayProgress:
    """What one progress report says: the progress line's figures."""

    delivered: int
    rate: float  # delivered per second since the previous report
    failed: int  # failed by this relay
    backlog: int  # pending and sending
    oldest_pending_age_s: float | None
    failed_in_outbox: int  # failed messages waiting for a person, whoever failed them
    broker_down_s: float | None  # how long the broker has been unavailable, None while it answers
    broker_error: str


class RelayReports:
    """The relay's outage bookkeeping, progress lines and readiness (its state is set by
    ``Relay.__init__``)."""

    store: OutboxStore
    broker: Broker
    settings: RelaySettings
    counters: RelayCounters
    _stop: threading.Event
    _outage: int
    _store_problem: str | None
    _store_failures: int
    _store_ever_answered: bool
    _store_failing_retriably: bool
    _store_down_since: float | None
    _broker_problem: str | None
    _broker_down_since: float | None
    _broker_last_error: str
    _progress: Progress
    _quiet: bool
    on_progress: Callable[[RelayProgress], None] | None

    def readiness(self) -> tuple[bool, str]:
        """(ready, why): the store answered the last iteration and the broker is not in an outage."""
        if self._store_problem is not None:
            return False, f"outbox store: {self._store_problem}"
        if self._broker_problem is not None:
            return False, f"broker outage ({self._outage} consecutive failures): {self._broker_problem}"
        return True, "ok"

    def describe(self) -> str:
        """Source, target and settings in one line, passwords masked (the start line)."""
        from zeroloss.registry import safe_url

        s = self.settings
        return (
            f"{safe_url(_where(self.store))} -> {safe_url(_where(self.broker))} (batch {s.batch_size}, "
            f"max attempts {s.max_attempts}, lease {s.lease_s:g}s, backoff {s.backoff_base_s:g}-"
            f"{s.max_backoff_s:g}s, progress every "
            f"{'never' if s.progress_every_s is None else f'{s.progress_every_s:g}s'})"
        )

    def summary(self) -> str:
        """The line logged at stop: totals and how long it ran."""
        c = self.counters
        return (
            f"relay stopped after {age(self._progress.elapsed())}: {c.delivered} delivered, {c.failed} failed, "
            f"{c.retried} sent again later (retries, held, unacknowledged), {c.broker_errors} broker and "
            f"{c.store_errors} store failures"
        )

    def _store_failed(self, exc: StoreError) -> None:
        self.counters.store_errors += 1
        self._store_failures += 1
        self._store_problem = str(exc)
        metrics.relay_error("store")
        delay = backoff_s(self._store_failures, self.settings.backoff_base_s, self.settings.max_backoff_s)
        # An outage that turns into a refusal waiting will not end (the database back without the
        # outbox table, or refusing the login) is said at ERROR too, not at DEBUG under the first.
        worse = self._store_down_since is not None and self._store_failing_retriably and not exc.retriable
        self._store_failing_retriably = exc.retriable
        if self._store_down_since is None or worse:
            self._store_down_since = self._store_down_since or time.monotonic()
            log.error("outbox store failed: %s; retrying with backoff (next in %.1fs)", exc, delay)
        else:
            log.debug("outbox store still failing: %s; next try in %.1fs", exc, delay)
        self._stop.wait(delay)

    def _store_answered(self) -> None:
        if self._store_down_since is not None:
            log.info(
                "outbox store is back after %s (%d failed tries)",
                age(time.monotonic() - self._store_down_since),
                self._store_failures,
            )
            self._store_down_since = None
        self._store_problem = None
        self._store_failures = 0
        self._store_ever_answered = True

    def _broker_failed(self, exc: BrokerError, what: str) -> None:
        """The first failure of an outage is a WARNING; the tries after it are DEBUG."""
        self._broker_last_error = str(exc)
        if self._broker_down_since is None:
            self._broker_down_since = time.monotonic()
            log.warning(
                "broker unavailable (%s); %s; messages wait in pending, no attempts spent, retrying with backoff",
                exc,
                what,
            )
        else:
            log.debug("broker still unavailable (%s); %s", exc, what)

    def _broker_answered(self) -> None:
        if self._broker_down_since is not None:
            log.info("broker is back after %s", age(time.monotonic() - self._broker_down_since))
            self._broker_down_since = None

    def _report(self) -> None:
        """The progress line: what was delivered since the last one and what is still waiting."""
        c = self.counters
        rate = self._progress.rate(c.delivered)
        try:
            stats = self.store.stats(delivered=False)  # the backlog only: not the audit history
        except StoreError as exc:  # the loop reports the outage itself
            log.debug("no progress line: %s", exc)
            return
        backlog = stats.counts.get(State.PENDING, 0) + stats.counts.get(State.SENDING, 0)
        if rate == 0 and backlog == 0 and self._broker_down_since is None:
            if self._quiet:
                return  # idle: said once, not every interval
            self._quiet = True
        else:
            self._quiet = False
        down_s = None if self._broker_down_since is None else time.monotonic() - self._broker_down_since
        report = RelayProgress(
            c.delivered,
            rate,
            c.failed,
            backlog,
            stats.oldest_pending_age_s,
            stats.counts.get(State.FAILED, 0),
            down_s,
            self._broker_last_error,
        )
        if self.on_progress is not None:
            self.on_progress(report)
        else:
            _log_progress(report)

    def _refresh_stats(self) -> None:
        """The outbox gauges; a store that cannot answer now is retried at the next refresh."""
        try:
            stats = self.store.stats()
        except StoreError as exc:
            log.warning("cannot refresh outbox metrics: %s", exc)
            return
        metrics.observe_stats(stats, path=getattr(self.store, "root", None))


def _log_progress(p: RelayProgress) -> None:
    down = "" if p.broker_down_s is None else f"; broker down for {age(p.broker_down_s)}: {p.broker_error}"
    log.info(
        "relay progress: %d delivered (%.1f/s), %d failed by this relay; backlog %d (oldest pending %s); "
        "%d failed in the outbox waiting for a person%s",
        p.delivered,
        p.rate,
        p.failed,
        p.backlog,
        age(p.oldest_pending_age_s),
        p.failed_in_outbox,
        down,
    )


def _where(part: object) -> str:
    """The URL (or path) a store or broker was opened with, for the start line."""
    url = getattr(part, "url", None)
    if isinstance(url, str):
        return url
    if (root := getattr(part, "root", None)) is not None:
        return f"spool://{root}"
    if isinstance(bootstrap := getattr(part, "bootstrap", None), str):
        return f"kafka://{bootstrap}"
    return type(part).__name__
