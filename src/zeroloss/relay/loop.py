"""The relay's loop (:class:`Relay`): recover → claim → give up on the exhausted → publish → mark.
Each broker outcome maps to one store move (DELIVERED → ``success``, RETRY → ``pending`` with a
backoff, REJECTED → ``failed``, HELD and UNDECIDED → ``pending`` unchanged); a broker-wide failure
puts the batch back unspent and the relay backs off; a store failure leaves the claimed messages
under their lease for ``recover``. The whole argument: docs/design.md ("The relay")."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

from zeroloss import metrics
from zeroloss.backoff import backoff_s
from zeroloss.brokers.base import Broker, Interruptible, Status
from zeroloss.errors import BrokerError, ConfigError, StoreError
from zeroloss.logs import Progress
from zeroloss.message import Message
from zeroloss.outbox.base import ClaimsAfterRecording, Delivered, OutboxStore, Resolver, State, Wakeable
from zeroloss.relay.reporting import RelayProgress, RelayReports
from zeroloss.relay.settings import NOT_STARTED, RelayCounters, RelaySettings

log = logging.getLogger("zeroloss.relay")


class Relay(RelayReports):
    """Moves messages from ``store`` to ``broker`` until stopped (``run``) or drained (``drain``)."""

    def __init__(
        self,
        store: OutboxStore,
        broker: Broker,
        settings: RelaySettings | None = None,
        *,
        resolver: Resolver | None = None,
        on_progress: Callable[[RelayProgress], None] | None = None,
    ) -> None:
        """``on_progress``: called with each progress report instead of logging its line."""
        self.store = store
        self.broker = broker
        self.settings = settings or RelaySettings()
        self.resolver = resolver
        self.on_progress = on_progress
        self.counters = RelayCounters()
        self._stop = threading.Event()
        self._outage = 0  # consecutive broker-wide failures, for the relay's own backoff
        self._next_recover = 0.0
        self._next_stats = 0.0
        self._store_problem: str | None = NOT_STARTED  # for readiness; None once the store answers
        self._store_failures = 0  # consecutive store failures, for their own backoff
        self._store_ever_answered = False  # until then a store refusing us is a start-up's: exit 2
        self._store_failing_retriably = False  # the store's outage so far was one waiting may end
        self._broker_problem: str | None = None
        self._prepared = False  # has the broker been connected (Kafka: predecessor fenced)?
        self._progress = Progress(self.settings.progress_every_s)
        self._quiet = False  # the last progress line said "nothing to do": say it once
        self._broker_down_since: float | None = None  # monotonic, for "broker is back after …"
        self._broker_last_error = ""
        self._store_down_since: float | None = None
        # In run()/drain(), a batch's deliveries are recorded in the next claim's transaction
        # (one commit per batch, not two) when the store can; until then they stay ``sending``.
        self._looping = False
        self._unrecorded: list[Delivered] = []
        # When the broker acknowledged them: the latency metric ends there, not at the recording
        # (the next claim may be slow, or wait out a store outage). One time is enough: every
        # publish follows a claim that recorded the batch before, so at most one batch waits.
        self._acked_at = 0.0

    def stop(self) -> None:
        """Ask the loop to return soon: a batch the broker has acknowledged is marked; one it has
        not (a broker that does not answer) is cut short and goes back to ``pending``."""
        self._stop.set()
        if isinstance(self.broker, Interruptible):
            self.broker.interrupt()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        """Relay until :meth:`stop` (the CLI calls it on SIGTERM/SIGINT)."""
        log.info("relay started: %s", self.describe())
        self._progress = Progress(self.settings.progress_every_s)
        try:
            self._refuse_a_wrong_store_first()
            self._prepare()
            with self._recording_with_the_next_claim():
                self._run()
        finally:
            log.info("%s", self.summary())

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                handled = self.run_once()
            except StoreError as exc:
                self._refuse_a_wrong_store(exc)
                self._store_failed(exc)
                continue
            if self._progress.due():
                self._report()
            if handled == 0:
                self._idle()

    def _refuse_a_wrong_store(self, exc: StoreError) -> None:
        """Wrong role, password, database or table at start-up: waiting cannot fix it, so a
        ConfigError (the CLI's exit 2), in ``run()`` and ``drain()`` alike. Start-up lasts until
        the store first answers: a relay started while the database was coming up (refused for a
        moment, retried) and then finding no table is refused too, not left retrying forever."""
        if not exc.retriable and not self._store_ever_answered:
            raise ConfigError(f"{exc} (waiting will not fix this; the relay did not start)") from exc

    def _refuse_a_wrong_store_first(self) -> None:
        """A missing table or a refused login is said before the broker is connected: with a broker
        down too, the error waited out the broker's connect timeout (30 s by default). An outage
        is left to the loop, which retries it."""
        try:
            self.store.stats(delivered=False)
        except StoreError as exc:
            self._refuse_a_wrong_store(exc)

    def drain(self, timeout_s: float = 60.0) -> None:
        """Relay until nothing is left to send but parked messages (tests, ``relay --drain``);
        messages waiting out a backoff are waited for. TimeoutError past the deadline."""
        deadline = time.monotonic() + timeout_s
        log.info("relay started (until drained): %s", self.describe())
        self._progress = Progress(self.settings.progress_every_s)
        try:
            self._refuse_a_wrong_store_first()
            self._prepare()
            with self._recording_with_the_next_claim():
                while not self._stop.is_set():
                    try:
                        moved = self.run_once()
                    except StoreError as exc:
                        self._refuse_a_wrong_store(exc)
                        raise
                    if moved:
                        if self._progress.due():
                            self._report()
                        continue
                    # an empty claim recorded the last batch: nothing is held back
                    stats = self.store.stats(delivered=False)
                    if stats.counts[State.SENDING] == 0 and stats.counts[State.PENDING] <= stats.parked:
                        return
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"outbox not drained within {timeout_s}s: {stats.counts}")
                    if self._progress.due():
                        self._report()
                    self._idle()
        finally:
            if self.on_progress is not None:  # where it ended, before the summary (a bar at its last place)
                self._report()
            log.info("%s", self.summary())

    @contextlib.contextmanager
    def _recording_with_the_next_claim(self) -> Iterator[None]:
        """Inside: deliveries wait for the next claim's transaction; on the way out (stop, error,
        drained) whatever still waits is recorded on its own."""
        self._looping = True
        try:
            yield
        finally:
            self._looping = False
            try:
                self._record()
            except StoreError as exc:  # under their lease still: recovered and sent again, never lost
                log.warning(
                    "%d delivered messages may not be marked delivered (%s): any the store did not record "
                    "stay under their lease and are sent again when it expires (same zeroloss-id; an inbox "
                    "drops the copy)",
                    len(self._unrecorded),
                    exc,
                )
                self._unrecorded.clear()

    def _claim(self) -> list[Message]:
        """Claim the next batch; with the last batch's deliveries in the same transaction if the
        store can (if it fails, neither happened and they are still ours to record)."""
        s = self.settings
        if self._unrecorded and isinstance(self.store, ClaimsAfterRecording):
            batch = self.store.succeed_and_claim(self._unrecorded, s.batch_size, s.lease_s)
            self._recorded()
            return batch
        self._record()
        return self.store.claim(s.batch_size, s.lease_s)

    def _record(self) -> None:
        if self._unrecorded:
            self.store.succeed(self._unrecorded)
            self._recorded()

    def _recorded(self) -> None:
        self.counters.delivered += len(self._unrecorded)
        metrics.relay_delivered((d.message for d in self._unrecorded), now=self._acked_at)
        self._unrecorded = []

    def _prepare(self) -> None:
        """Connect the broker before there is work (Kafka: fence a crashed predecessor's open
        transaction, which otherwise holds read_committed consumers back until this relay
        happens to publish). A broker that is down is retried while idle and by the first publish."""
        prepare = getattr(self.broker, "prepare", None)
        if self._prepared or prepare is None:
            return
        try:
            prepare()
            self._prepared = True
        except BrokerError as exc:
            if self._stop.is_set():  # stop() interrupted the connect: not a broker failure
                return
            self.counters.broker_errors += 1  # the closing summary and the metric count it too
            metrics.relay_error("broker")
            self._broker_failed(exc, "not reachable yet, trying again while idle")
            return
        self._broker_answered()

    def _idle(self) -> None:
        """Nothing to send: wait ``idle_wait_s``, or less where the store can say new work
        arrived (PostgreSQL NOTIFY), so a commit is picked up at once, not at the next poll."""
        self._prepare()
        if isinstance(self.store, Wakeable):
            self.store.wait_for_work(self.settings.idle_wait_s, self._stop)
        else:
            self._stop.wait(self.settings.idle_wait_s)

    def run_once(self) -> int:
        """One iteration; returns how many messages it moved (0 = nothing to do)."""
        s = self.settings
        now = time.monotonic()
        if s.stats_every_s is not None and now >= self._next_stats:
            self._refresh_stats()
            self._next_stats = now + s.stats_every_s
        if now >= self._next_recover:
            # Ours first: a batch left unrecorded by a store outage longer than its lease would
            # otherwise be put back to pending, for another relay to claim and send again.
            self._record()
            report = self.store.recover(self.resolver)
            if report.lease_expired or report.doubt or report.malformed or report.discarded:
                log.warning("recovered: %s", report)
            if s.success_retention_s is not None:
                self.store.purge_success(s.success_retention_s)
            self._next_recover = time.monotonic() + s.recover_every_s  # from its end: a slow resolver waits too
        batch = self._claim()
        self._store_answered()
        if not batch:
            return 0
        self.counters.claimed += len(batch)
        metrics.relay_claimed(len(batch))
        exhausted, held, live = [], [], []
        parked_keys: set[bytes] = set()
        for m in batch:  # oldest first, so a key is parked before its later messages come up
            if m.key is not None and m.key in parked_keys:
                held.append(m)
            elif m.attempts >= s.max_attempts:
                exhausted.append(m)
                if m.key is not None:
                    parked_keys.add(m.key)
            else:
                live.append(m)
        if exhausted:
            self._fail(exhausted, "attempts exhausted")
        if held:  # back to pending unchanged: they now wait behind the failed one
            self.store.retry(held)
            self.counters.held += len(held)
            metrics.relay_outcome("held", len(held))
        if live:
            self._publish(live)
        return len(batch)

    def _publish(self, batch: Sequence[Message]) -> None:
        started = time.monotonic()
        try:
            with self._lease_renewed(batch):
                outcomes = self.broker.publish(batch)
                acked_at = time.time()  # before the renewer's join: an extend may be in flight
        except BrokerError as exc:
            if self._stop.is_set():  # cut short by stop(): a normal shutdown, not an outage
                log.info("stopping: %d messages not acknowledged go back to pending, unspent", len(batch))
                self.store.retry(batch)
                return
            metrics.relay_published(time.monotonic() - started, ok=False)
            metrics.relay_error("broker")
            metrics.relay_outcome("outage", len(batch))
            self.counters.broker_errors += 1
            self._outage += 1
            delay = self._relay_backoff(exc)
            self._broker_problem = str(exc)  # readiness: an outage once a publish failed
            self._broker_failed(exc, f"{len(batch)} messages back to pending for {delay:.1f}s")
            until = self.store.now() + delay
            self.store.retry([replace(m, not_before=until, last_error=str(exc)) for m in batch])
            self._stop.wait(delay)
            return
        metrics.relay_published(time.monotonic() - started, ok=True)
        log.debug("published a batch of %d in %.0f ms", len(batch), 1000 * (time.monotonic() - started))
        self._broker_answered()
        self._broker_problem = None
        self._outage = 0
        delivered, retry, failed = [], [], []
        undecided: list[str] = []  # the errors of the UNDECIDED ones
        for o in outcomes:
            m = o.message
            if o.status is Status.DELIVERED:
                delivered.append(Delivered(m, o.location or ""))
            elif o.status is Status.RETRY:
                attempts = m.attempts + 1
                delay = backoff_s(attempts, self.settings.backoff_base_s, self.settings.max_backoff_s)
                retry.append(replace(m, attempts=attempts, not_before=self.store.now() + delay, last_error=o.error))
                log.info("message %s: retry %d in %.1fs: %s", m.id, attempts, delay, o.error)
            elif o.status is Status.REJECTED:
                failed.append(replace(m, attempts=m.attempts + 1, last_error=o.error))
            elif o.status is Status.UNDECIDED:  # not its fault: back at the head of its key, nothing spent
                retry.append(m)
                undecided.append(o.error or "no answer")
            else:  # HELD: back in line behind its key, nothing spent
                retry.append(m)
                self.counters.held += 1
        self._unrecorded += delivered
        self._acked_at = acked_at
        if not (self._looping and isinstance(self.store, ClaimsAfterRecording)):
            self._record()
        if undecided:
            log.warning(
                "%d of %d messages not acknowledged in this batch (%s); sent again with the next",
                len(undecided),
                len(outcomes),
                undecided[0],
            )
        if retry:
            self.store.retry(retry)
            self.counters.retried += len(retry)
            self.counters.undecided += len(undecided)
            held_n = sum(1 for o in outcomes if o.status is Status.HELD)
            metrics.relay_outcome("retry", len(retry) - held_n - len(undecided))
            metrics.relay_outcome("held", held_n)
            metrics.relay_outcome("undecided", len(undecided))
        if failed:
            self._fail(failed, None)

    @contextlib.contextmanager
    def _lease_renewed(self, batch: Sequence[Message]) -> Iterator[None]:
        """Renew the batch's lease every third of it while the publish runs: a publish that
        outlives its lease (a slow broker, many Kafka rounds) would let another relay claim and
        send the same messages at the same time."""
        lease_s = self.settings.lease_s
        done = threading.Event()

        def renew() -> None:
            while not done.wait(lease_s / 3):
                try:
                    held = self.store.extend(batch, lease_s)
                except StoreError as exc:  # the lease may run out: duplicates, never a loss
                    log.warning("could not renew the lease of %d messages in flight: %s", len(batch), exc)
                    continue
                if held < len(batch):
                    log.warning(
                        "%d of %d messages in flight lost their lease (expired and recovered): they may be sent twice",
                        len(batch) - held,
                        len(batch),
                    )

        renewer = threading.Thread(target=renew, name="zeroloss-lease", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            done.set()
            renewer.join()

    def _fail(self, messages: Sequence[Message], reason: str | None) -> None:
        moved = [replace(m, last_error=reason or m.last_error) for m in messages]
        for m in moved:
            log.error("message %s to failed after %d attempts: %s", m.id, m.attempts, m.last_error)
        self.store.fail(moved)
        self.counters.failed += len(moved)
        metrics.relay_outcome("exhausted" if reason else "rejected", len(moved))  # only exhaustion gives a reason

    def _relay_backoff(self, exc: Exception) -> float:
        return backoff_s(max(1, self._outage), self.settings.backoff_base_s, self.settings.max_backoff_s)
