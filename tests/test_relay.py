"""The relay against real stores and a real broker: delivery, per-key order, retries, outages."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import OutboxHarness, unique_topic
from tests.spool_helpers import fsync_fails_once
from tests.waiting import wait_until
from zeroloss import metrics
from zeroloss.brokers.base import Outcome, Status
from zeroloss.brokers.kafka import KafkaBroker
from zeroloss.embedded_broker import EmbeddedBroker
from zeroloss.errors import BrokerError
from zeroloss.message import Message
from zeroloss.outbox.base import Delivered, State
from zeroloss.outbox.spool import FileSpool
from zeroloss.outbox.sql import SqlOutbox
from zeroloss.readback import read_topic
from zeroloss.relay import Relay, RelaySettings

FAST = RelaySettings(batch_size=100, backoff_base_s=0.01, max_backoff_s=0.05, idle_wait_s=0.01, max_attempts=3)


@pytest.mark.kafka
def test_relay_delivers_everything_in_key_order_and_records_locations(
    outbox: OutboxHarness, kafka: EmbeddedBroker
) -> None:
    topic = unique_topic()
    ids = [outbox.add(topic=topic, value=b"%d" % i, key=b"k%d" % (i % 7)) for i in range(700)]
    broker = KafkaBroker(kafka.url, transactional_id=f"relay-{topic}", timeout_s=15)
    relay = Relay(outbox.store, broker, FAST)
    try:
        relay.drain(timeout_s=120)
    finally:
        broker.close()
    stats = outbox.store.stats()
    assert stats.counts[State.SUCCESS] == 700
    assert stats.counts[State.PENDING] == stats.counts[State.SENDING] == 0
    state, _ = outbox.store.get(ids[0])
    assert state is State.SUCCESS
    seen = read_topic(kafka.url, topic, expect=ids)
    assert set(seen.ids) == set(ids)
    for key, got in seen.order.items():
        want = [ids[i] for i in range(700) if b"k%d" % (i % 7) == key]
        assert got == want, f"key {key!r} out of order"


@dataclass
class ScriptedBroker:
    """A broker double for the relay's decision logic only (the real adapter has its own tests
    against a real broker). ``script`` is consumed one step per publish call: a BrokerError is
    raised, or a dict maps a message value to its reaction ("retry", "reject"); the rest of the
    batch, and every call after the script, is delivered."""

    script: list[object]
    calls: list[list[bytes]] = field(default_factory=list)

    def publish(self, messages: Sequence[Message]) -> list[Outcome]:
        self.calls.append([m.value for m in messages])
        step = self.script.pop(0) if self.script else {}
        if isinstance(step, BrokerError):
            raise step
        assert isinstance(step, dict)
        out, failed_keys = [], set()
        for m in messages:
            status = {"retry": Status.RETRY, "reject": Status.REJECTED}.get(step.get(m.value, ""), Status.DELIVERED)
            if m.key in failed_keys:
                status = Status.HELD  # the Broker contract: nothing passes a failed message of its key
            elif status is not Status.DELIVERED:
                failed_keys.add(m.key)
            location = "x/0/0" if status is Status.DELIVERED else None
            out.append(Outcome(m, status, location=location, error=None if location else "e"))
        return out

    def close(self) -> None:
        pass


@dataclass
class GatedBroker(ScriptedBroker):
    """A ScriptedBroker whose publish calls wait for ``release`` (at most ``hold_s``); ``entered``
    is set when one arrives. ``first_only``: only the first call waits."""

    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    first_only: bool = False
    hold_s: float = 10.0

    def publish(self, messages: Sequence[Message]) -> list[Outcome]:
        if not (self.first_only and self.entered.is_set()):
            self.entered.set()
            self.release.wait(self.hold_s)
        return super().publish(messages)


def test_an_outage_spends_no_attempts_and_a_retry_spends_one(outbox: OutboxHarness) -> None:
    mid = outbox.add(topic="t", value=b"v")
    broker = ScriptedBroker([BrokerError("down"), BrokerError("down"), {b"v": "retry"}])
    Relay(outbox.store, broker, FAST).drain(timeout_s=30)
    state, msg = outbox.store.get(mid)
    assert state is State.SUCCESS
    assert len(broker.calls) == 4
    assert msg.attempts == 1


def test_exhausted_messages_go_to_failed_with_their_reason(outbox: OutboxHarness) -> None:
    mid = outbox.add(topic="t", value=b"v", key=b"K")
    later = outbox.add(topic="t", value=b"w", key=b"K")
    other = outbox.add(topic="t", value=b"x", key=b"L")
    broker = ScriptedBroker([{b"v": "retry"}] * 3)
    relay = Relay(outbox.store, broker, FAST)
    relay.drain(timeout_s=30)
    state, msg = outbox.store.get(mid)
    assert state is State.FAILED
    assert msg.attempts == 3 and msg.last_error == "attempts exhausted"
    assert outbox.store.get(other)[0] is State.SUCCESS
    assert outbox.store.get(later)[0] is State.PENDING  # parked behind the failed one
    assert outbox.store.stats().parked == 1
    outbox.store.requeue([mid])
    relay.drain(timeout_s=30)
    assert outbox.store.get(mid)[0] is State.SUCCESS
    assert outbox.store.get(later)[0] is State.SUCCESS


def test_a_rejected_message_fails_at_once(outbox: OutboxHarness) -> None:
    mid = outbox.add(topic="t", value=b"v")
    Relay(outbox.store, ScriptedBroker([{b"v": "reject"}]), FAST).drain(timeout_s=30)
    state, msg = outbox.store.get(mid)
    assert (state, msg.attempts, msg.last_error) == (State.FAILED, 1, "e")


def test_deliveries_a_failed_claim_did_not_record_are_recorded_once_the_store_is_back(outbox: OutboxHarness) -> None:
    """A SQL store records a batch's deliveries in the next claim's transaction. The table goes
    away while a batch is in flight: that claim fails, so neither happened; the relay keeps the
    deliveries (``sending``, under their lease), backs off, and records them once it is back."""
    if not isinstance(outbox.store, SqlOutbox):
        pytest.skip("only the SQL outbox records deliveries with the next claim")
    for i in range(30):
        outbox.add(topic="t", value=b"%d" % i)
    table = outbox.store.table.name
    broker = GatedBroker([], first_only=True)
    entered, release = broker.entered, broker.release

    def rename(old: str, new: str) -> None:
        with outbox.store.engine.begin() as conn:
            conn.exec_driver_sql(f"ALTER TABLE {old} RENAME TO {new}")

    relay = Relay(
        outbox.store,
        broker,
        RelaySettings(batch_size=10, idle_wait_s=0.01, backoff_base_s=0.02, max_backoff_s=0.1, recover_every_s=3600),
    )
    t = threading.Thread(target=relay.run)
    t.start()
    try:
        assert entered.wait(10)
        rename(table, f"{table}_away")
        release.set()
        wait_until(lambda: relay.counters.store_errors >= 2, what="claims failing on the missing table")
        assert relay.counters.delivered == 0  # published and acknowledged, not recorded yet
        rename(f"{table}_away", table)
        wait_until(lambda: outbox.store.stats().counts[State.SUCCESS] == 30, what="everything recorded")
    finally:
        release.set()
        relay.stop()
        t.join(10)
    assert not t.is_alive()
    assert relay.counters.delivered == 30 and outbox.store.stats().counts[State.SENDING] == 0


def test_a_relay_does_not_count_a_batch_delivered_whose_success_fsync_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A FileSpool whose fsync of success/ failed (once, as Linux reports a lost write): succeed()
    raises, the relay backs off and calls it again with the same batch — which main's spool found
    already moved (in memory) and returned from, so the relay counted it delivered though the
    renames may never reach the disk. The spool now refuses every move until it is reopened."""
    spool = FileSpool(tmp_path / "spool")
    for i in range(5):
        with spool.transaction() as tx:
            tx.add(topic="t", value=b"%d" % i)
    fsync_fails_once(monkeypatch, spool._fds[State.SUCCESS])
    relay = Relay(spool, ScriptedBroker([]), replace(FAST, recover_every_s=3600))
    t = threading.Thread(target=relay.run)
    t.start()
    try:
        wait_until(
            lambda: relay.counters.store_errors >= 3 or relay.counters.delivered > 0,
            what="the relay trying to record the batch again",
        )
    finally:
        relay.stop()
        t.join(10)
        monkeypatch.undo()
        spool.close()
    assert not t.is_alive()
    assert relay.counters.delivered == 0
    assert relay._store_problem is not None and "success failed (Input/output error)" in relay._store_problem


def test_a_relay_records_its_deliveries_before_it_backs_off_or_idles(outbox: OutboxHarness) -> None:
    """Deliveries wait for the next claim's transaction under their lease only: a relay that
    waited with some unrecorded (a broker outage's backoff, an idle outbox) for longer than the
    lease would have them recovered and sent again. The claim before each publish records them,
    so during the backoff the first batch is already ``success``, and an idle relay holds nothing."""
    for i in range(20):
        outbox.add(topic="t", value=b"%d" % i)
    settings = replace(FAST, batch_size=10, backoff_base_s=30, max_backoff_s=30)
    broker = ScriptedBroker([{}, BrokerError("down")])
    relay = Relay(outbox.store, broker, settings)
    t = threading.Thread(target=relay.run)
    t.start()
    try:
        wait_until(lambda: len(broker.calls) == 2, what="the second publish, which fails: a 30 s backoff")
        assert outbox.store.stats().counts[State.SUCCESS] == 10 and relay.counters.delivered == 10
    finally:
        relay.stop()
        t.join(10)
    assert not t.is_alive()
    for i in range(10):  # the failed batch waits out its 30 s backoff; these go now
        outbox.add(topic="t", value=b"new %d" % i)
    relay = Relay(outbox.store, ScriptedBroker([]), settings)
    t = threading.Thread(target=relay.run)
    t.start()
    try:  # the last batch is recorded by the empty claim before the relay idles
        # the relay counts a recording once its commit returned: the rows can show a moment before
        wait_until(
            lambda: outbox.store.stats().counts[State.SUCCESS] == 20 and relay.counters.delivered == 10,
            what="the new ones recorded while idle",
        )
        assert relay.counters.delivered == 10 and outbox.store.stats().counts[State.SENDING] == 0
    finally:
        relay.stop()
        t.join(10)
    assert not t.is_alive()


def test_the_delivery_latency_ends_at_the_broker_ack_not_when_the_next_claim_records_it(
    outbox: OutboxHarness,
) -> None:
    """A SQL store records a batch's deliveries in the next claim's transaction, which may take
    long (a claim over a deep backlog, a store outage): the latency histogram is "creation →
    broker ack", so that wait must not count. The next claim is held until the test has taken a
    time mark; every ack came before the mark, so each observed latency is below mark - creation."""
    if not isinstance(outbox.store, SqlOutbox):
        pytest.skip("only the SQL outbox records deliveries with the next claim")
    ids = [outbox.add(topic="t", value=b"%d" % i) for i in range(3)]
    created = [outbox.store.get(i)[1].created_at for i in ids]
    recording, marked = threading.Event(), threading.Event()

    class SlowToRecord(SqlOutbox):
        def succeed_and_claim(self, delivered: Sequence[Delivered], limit: int, lease_s: float) -> list[Message]:
            if not recording.is_set():
                recording.set()
                assert marked.wait(10)
            return super().succeed_and_claim(delivered, limit, lease_s)

    store = SlowToRecord(outbox.store.engine, table=outbox.store.table.name)
    relay = Relay(store, ScriptedBroker([]), FAST)
    histogram = "zeroloss_relay_delivery_latency_seconds"
    sum_before = metrics.REGISTRY.get_sample_value(f"{histogram}_sum") or 0.0
    count_before = metrics.REGISTRY.get_sample_value(f"{histogram}_count") or 0.0
    t = threading.Thread(target=relay.drain, args=(30,))
    t.start()
    try:
        assert recording.wait(10), "the relay never came to record the batch"
        mark = time.time()
    finally:
        marked.set()
        t.join(30)
    assert not t.is_alive() and relay.counters.delivered == 3
    assert (metrics.REGISTRY.get_sample_value(f"{histogram}_count") or 0.0) - count_before == 3
    observed = (metrics.REGISTRY.get_sample_value(f"{histogram}_sum") or 0.0) - sum_before
    assert observed < sum(mark - c for c in created), "the wait for the next claim was counted as latency"


def test_a_relay_records_its_deliveries_before_it_recovers_their_expired_lease(
    outbox: OutboxHarness, caplog: pytest.LogCaptureFixture
) -> None:
    """The store goes away right after a batch was acknowledged, for longer than the lease: when
    it is back, that batch is delivered and unrecorded, its lease expired. Recovering before
    recording would put it back to ``pending`` (a warning about lost leases, and a moment in which
    another relay may claim and send it again); the relay records it first."""
    if not isinstance(outbox.store, SqlOutbox):
        pytest.skip("only the SQL outbox records deliveries with the next claim")
    for i in range(10):  # one batch: no other lease in flight once the store is back
        outbox.add(topic="t", value=b"%d" % i)
    store = outbox.store
    table = store.table.name
    broker = GatedBroker([], first_only=True)
    entered, release = broker.entered, broker.release

    def rename(old: str, new: str) -> None:
        with store.engine.begin() as conn:
            conn.exec_driver_sql(f"ALTER TABLE {old} RENAME TO {new}")

    def lease_expired() -> bool:
        with store.engine.connect() as conn:
            until = conn.exec_driver_sql(f"SELECT max(lease_until) FROM {table}_away WHERE state = 'sending'").scalar()
        return until is not None and store.now() > until

    settings = RelaySettings(
        batch_size=10,
        lease_s=0.5,
        idle_wait_s=0.01,
        backoff_base_s=0.02,
        max_backoff_s=0.1,
        recover_every_s=0,
        progress_every_s=None,
    )
    relay = Relay(store, broker, settings)
    t = threading.Thread(target=relay.run)
    caplog.set_level(logging.INFO, logger="zeroloss")
    t.start()
    try:
        assert entered.wait(10)
        rename(table, f"{table}_away")
        release.set()
        wait_until(lambda: relay.counters.store_errors >= 1, what="the claim failing on the missing table")
        wait_until(lease_expired, what="the delivered batch's lease to expire")
        rename(f"{table}_away", table)
        wait_until(lambda: store.stats().counts[State.SUCCESS] == 10, what="everything recorded")
    finally:
        release.set()
        relay.stop()
        t.join(10)
    assert not t.is_alive() and relay.counters.delivered == 10
    recovered = [r.getMessage() for r in caplog.records if "with an expired lease to pending" in r.getMessage()]
    assert not recovered, recovered


def test_stop_finishes_the_batch_in_flight(outbox: OutboxHarness) -> None:
    for i in range(50):
        outbox.add(topic="t", value=b"%d" % i)
    broker = GatedBroker([])
    entered, release = broker.entered, broker.release

    relay = Relay(outbox.store, broker, RelaySettings(batch_size=10, idle_wait_s=0.01))
    t = threading.Thread(target=relay.run)
    t.start()
    assert entered.wait(10)
    relay.stop()
    release.set()
    t.join(10)
    assert not t.is_alive()
    stats = outbox.store.stats()
    assert stats.counts[State.SUCCESS] == 10
    assert stats.counts[State.SENDING] == 0
    assert stats.counts[State.PENDING] == 40


def test_a_publish_that_outlives_its_lease_keeps_the_lease(outbox: OutboxHarness) -> None:
    """A slow publish must not let recover() hand the batch to another relay meanwhile: the relay
    renews the lease every third of it until the broker answers (issue 11, item 13)."""
    mid = outbox.add(topic="t", value=b"slow", key=b"k")
    broker = GatedBroker([], hold_s=30)
    entered, release = broker.entered, broker.release

    relay = Relay(outbox.store, broker, RelaySettings(batch_size=10, idle_wait_s=0.01, lease_s=1.0))
    t = threading.Thread(target=relay.drain, kwargs={"timeout_s": 60})
    t.start()
    try:
        assert entered.wait(10)
        past = time.time() + 2.5  # two and a half leases
        while time.time() < past:  # every recover meanwhile finds the lease alive
            assert outbox.store.recover().lease_expired == 0
            assert outbox.store.get(mid)[0] is State.SENDING
            release.wait(0.1)  # never set here: a pause between checks
    finally:
        release.set()
        t.join(30)
    assert outbox.store.get(mid)[0] is State.SUCCESS


def test_extend_renews_only_what_this_relay_still_holds(outbox: OutboxHarness) -> None:
    a, b = outbox.add(topic="t", value=b"a"), outbox.add(topic="t", value=b"b")
    [ma] = outbox.store.claim(1, lease_s=60)
    [mb] = outbox.store.claim(1, lease_s=0.05)
    assert outbox.store.extend([ma], 0.05) == 1  # shortened here, so it expires too
    deadline = time.time() + 0.2
    while time.time() < deadline:  # both leases run out
        threading.Event().wait(0.05)
    assert outbox.store.recover().lease_expired == 2
    assert outbox.store.extend([ma, mb], 60) == 0  # recovered: no longer ours to renew
    assert {outbox.store.get(m)[0] for m in (a, b)} == {State.PENDING}


class _NoBroker:
    """A broker that is never reached: these tests stop at the store."""

    def publish(self, messages: Sequence[Message]) -> list[Outcome]:
        raise AssertionError("nothing should be published")

    def close(self) -> None:
        pass


class _StoreDown:
    """An outbox whose every call fails like a database that is down (retriable) or that
    refuses our credentials (not retriable)."""

    def __init__(self, retriable: bool) -> None:
        self.retriable = retriable

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            from zeroloss.errors import StoreError

            raise StoreError("connection refused" if self.retriable else "role refused", retriable=self.retriable)

        return fail


def test_store_errors_back_off_growing_not_at_a_fixed_pace() -> None:
    relay = Relay(_StoreDown(retriable=True), _NoBroker(), RelaySettings(backoff_base_s=0.5, max_backoff_s=60))
    waits: list[float] = []

    def record(delay: float | None = None) -> bool:
        waits.append(delay or 0.0)
        if len(waits) >= 6:
            relay.stop()
        return False

    relay._stop.wait = record  # type: ignore[method-assign,assignment]
    relay.run()
    assert relay.counters.store_errors == 6
    # exponential with jitter: the 6th wait is well past the first (0.5 s base, 16 s nominal)
    assert waits[-1] > 4 * max(waits[0], 0.25), waits
    assert not relay.readiness()[0] and "connection refused" in relay.readiness()[1]


def test_a_store_that_refuses_us_at_start_up_stops_the_relay_with_a_config_error() -> None:
    from zeroloss.errors import ConfigError

    relay = Relay(_StoreDown(retriable=False), _NoBroker())
    with pytest.raises(ConfigError, match=r"role refused.*waiting will not fix this"):
        relay.run()


def test_a_broker_unreachable_at_start_up_counts_in_the_closing_summary(tmp_path: Path) -> None:
    """An idle relay whose broker never answered said "0 broker failures" when it stopped: only
    failed publishes were counted, not the failed connects before the first batch."""
    from zeroloss.embedded_broker import free_port

    store = SqlOutbox(f"sqlite:///{tmp_path / 'app.db'}")
    store.create_schema()
    # transactional: its prepare() connects now (to fence a predecessor), and fails
    broker = KafkaBroker(f"kafka://127.0.0.1:{free_port()}", transactional_id="zl-unreachable", timeout_s=1)
    relay = Relay(store, broker, RelaySettings(idle_wait_s=0.05))
    runner = threading.Thread(target=relay.run)
    runner.start()
    try:
        wait_until(lambda: relay.counters.broker_errors >= 1, 60, "the relay to count the failed connect")
    finally:
        relay.stop()
        runner.join(30)
        broker.close()
        store.close()
    assert not runner.is_alive()
    assert f"{relay.counters.broker_errors} broker and" in relay.summary()


@pytest.mark.postgres
def test_a_role_whose_connections_are_all_taken_is_waited_for_not_refused_as_configuration() -> None:
    """PostgreSQL's 'too many connections for role "app"' (SQLSTATE 53300: the role's CONNECTION
    LIMIT reached, for as long as other sessions hold them) names a role, as a refused login
    does; it is not one. The relay starting then retries (main's code: exit 2, 'waiting will not
    fix this', 'check the user, password and database name')."""
    import uuid

    import sqlalchemy as sa

    from tests.conftest import PG_URL, require_service
    from zeroloss.errors import StoreError, StoreSetupError
    from zeroloss.sqlurl import make_engine

    require_service("postgres")
    role = f"zl_busy_{uuid.uuid4().hex[:8]}"
    admin = make_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 0"))  # every slot taken
    outbox = SqlOutbox(str(sa.make_url(PG_URL).set(username=role)))
    try:
        with pytest.raises(StoreError) as caught:
            outbox.stats()
        assert f'too many connections for role "{role}"' in str(caught.value), caught.value
        assert not isinstance(caught.value, StoreSetupError) and caught.value.retriable, caught.value
        relay = Relay(outbox, _NoBroker())
        waits: list[float | None] = []

        def record(delay: float | None = None) -> bool:
            waits.append(delay)
            if len(waits) >= 3:
                relay.stop()
            return False

        relay._stop.wait = record  # type: ignore[method-assign,assignment]
        relay.run()  # retries the store until stopped: no ConfigError
        assert relay.counters.store_errors == 3
        assert "too many connections" in relay.readiness()[1]
    finally:
        outbox.close()
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP ROLE IF EXISTS {role}"))
        admin.dispose()


@pytest.mark.postgres
def test_a_relay_started_while_the_database_refused_it_for_a_moment_then_finding_no_table_exits_2() -> None:
    """Start-up lasts until the store first answers. A relay started while PostgreSQL turned it
    away for a moment (its role's connections all taken; the same for 'the database system is
    starting up') retries; when the database then lets it in and has no outbox table, that is the
    configuration error it is at any start (exit 2 with the init hint), not an outage retried
    forever with the hint said only at DEBUG under the first failure's ERROR line."""
    import uuid

    import sqlalchemy as sa

    from tests.conftest import PG_URL, require_service
    from zeroloss.errors import ConfigError
    from zeroloss.sqlurl import make_engine

    require_service("postgres")
    role = f"zl_busy_{uuid.uuid4().hex[:8]}"
    admin = make_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 0"))
    outbox = SqlOutbox(str(sa.make_url(PG_URL).set(username=role)), table=f"zl_never_made_{uuid.uuid4().hex[:8]}")
    relay = Relay(outbox, _NoBroker())
    waits: list[float | None] = []

    def record(delay: float | None = None) -> bool:
        waits.append(delay)
        if len(waits) == 1:  # the moment is over: the role may log in
            with admin.begin() as conn:
                conn.execute(sa.text(f"ALTER ROLE {role} CONNECTION LIMIT -1"))
        elif len(waits) >= 5:  # retrying a table that is not there: stop (the test fails below)
            relay.stop()
        return False

    relay._stop.wait = record  # type: ignore[method-assign,assignment]
    try:
        with pytest.raises(ConfigError, match=r"create it with: zeroloss init.*waiting will not fix this"):
            relay.run()
        assert len(waits) == 1, waits  # the refusal for a moment was waited out, once
    finally:
        outbox.close()
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP ROLE IF EXISTS {role}"))
        admin.dispose()


class _StoreScript:
    """An outbox that answers once (nothing to claim), then fails with each error in turn."""

    def __init__(self, errors: list[Exception]) -> None:
        self.errors = errors
        self.answered = False

    def claim(self, limit: int, lease_s: float) -> list[Message]:
        if not self.answered:
            self.answered = True
            return []
        raise self.errors.pop(0) if self.errors else AssertionError("stopped after the script")

    def recover(self, resolver: Any = None) -> Any:
        from zeroloss.outbox.base import RecoveryReport

        return RecoveryReport()

    def stats(self, *, delivered: bool = True) -> None:
        """The relay's start check (e312780): it answers; the relay ignores what it says."""

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(name)


def test_an_outage_that_turns_into_a_missing_table_is_said_at_error_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A running relay's database goes away (ERROR, then DEBUG while it lasts) and comes back
    without the outbox table (restored from the wrong backup, another volume): that is said at
    ERROR with its hint, not at DEBUG as more of the same outage."""
    from zeroloss.errors import StoreError, StoreSetupError

    store = _StoreScript(
        [
            StoreError("connection refused", retriable=True),
            StoreError("connection refused", retriable=True),
            StoreSetupError("the outbox table does not exist; create it with: zeroloss init"),
            StoreSetupError("the outbox table does not exist; create it with: zeroloss init"),
        ]
    )
    relay = Relay(store, _NoBroker(), RelaySettings(stats_every_s=None, success_retention_s=None))  # type: ignore[arg-type]
    waits: list[float | None] = []

    def record(delay: float | None = None) -> bool:
        waits.append(delay)
        if not store.errors:
            relay.stop()
        return False

    relay._stop.wait = record  # type: ignore[method-assign,assignment]
    caplog.set_level(logging.DEBUG, logger="zeroloss")
    relay.run()  # mid-run: retried, not refused
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2, errors
    assert "connection refused" in errors[0] and "create it with: zeroloss init" in errors[1], errors
    assert relay.counters.store_errors == 4


def test_a_stop_during_the_start_up_connect_is_not_counted_as_a_broker_failure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """stop() interrupts a connect still under way: the broker did not fail, so the closing
    summary and the error metric must not say it did (nor warn 'broker unavailable')."""
    from zeroloss.embedded_broker import free_port

    store = SqlOutbox(f"sqlite:///{tmp_path / 'app.db'}")
    store.create_schema()
    broker = KafkaBroker(f"kafka://127.0.0.1:{free_port()}", transactional_id="zl-stopped-early", timeout_s=60)
    relay = Relay(store, broker, RelaySettings(idle_wait_s=0.05))
    before = _relay_errors("broker")
    caplog.set_level(logging.DEBUG, logger="zeroloss")
    runner = threading.Thread(target=relay.run)
    runner.start()
    try:  # the connect (60 s) is under way or about to be: stop() interrupts it either way
        wait_until(
            lambda: any("relay started" in r.getMessage() for r in list(caplog.records)),
            30,
            "the relay to start",
        )
    finally:
        relay.stop()
        runner.join(30)
        broker.close()
        store.close()
    assert not runner.is_alive()
    assert relay.counters.broker_errors == 0
    assert _relay_errors("broker") == before
    assert not any("broker unavailable" in r.getMessage() for r in caplog.records)


def _relay_errors(kind: str) -> float:
    return metrics.REGISTRY.get_sample_value("zeroloss_relay_errors_total", {"kind": kind}) or 0.0
