"""The pipelined relay (a SQL store claims batch N+1 while batch N is on the broker): how it could
lose, duplicate, reorder or hang, one test each. Twenty messages over two keys in batches of ten:
batch N holds the first five of each key, batch N+1 the next five. The first publish is held
until the store shows both batches claimed, so N+1 is known to be claimed while N is in flight."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import pytest
import sqlalchemy as sa

from tests.broker_doubles import GatedBroker
from tests.conftest import OutboxHarness
from tests.waiting import wait_until
from zeroloss.errors import BrokerError, StoreError
from zeroloss.message import Message
from zeroloss.outbox.base import Delivered, State
from zeroloss.outbox.sql import SqlOutbox
from zeroloss.relay import Relay, RelaySettings

SETTINGS = RelaySettings(batch_size=10, backoff_base_s=0.01, max_backoff_s=0.05, idle_wait_s=0.01, max_attempts=5)
KEYS = (b"a", b"b")


@pytest.fixture
def sql(outbox: OutboxHarness) -> SqlOutbox:
    if not isinstance(outbox.store, SqlOutbox):
        pytest.skip("only a SQL store claims the next batch while one is in flight")
    return outbox.store


def add_twenty(outbox: OutboxHarness) -> list[str]:
    """Values 0..19, key a for even and b for odd: batch N is 0..9, batch N+1 is 10..19."""
    return [outbox.add(topic="t", value=b"%d" % i, key=KEYS[i % 2]) for i in range(20)]


def sending(store: SqlOutbox) -> int:
    return int(store.stats().counts[State.SENDING])


def start(relay: Relay) -> threading.Thread:
    t = threading.Thread(target=relay.run, daemon=True)
    t.start()
    return t


def delivered_in_key_order(broker: GatedBroker) -> None:
    """Each key's messages reached the broker once each, in the order they were added."""
    for key in KEYS:
        got = [int(m.value) for m in broker.delivered if m.key == key]
        assert got == sorted(set(got)), f"key {key!r}: {got}"


def test_the_next_batch_is_claimed_while_one_is_in_flight(outbox: OutboxHarness, sql: SqlOutbox) -> None:
    """The pipeline itself: N+1 (the same keys' next messages) is claimed before N is answered."""
    add_twenty(outbox)
    broker = GatedBroker([], first_only=True)
    relay = Relay(sql, broker, SETTINGS)
    t = start(relay)
    try:
        assert broker.entered.wait(10)
        wait_until(lambda: sending(sql) == 20, 10, "batch N+1 claimed while batch N is held")
        assert broker.calls == []  # nothing of N+1 published while N is not answered
        broker.release.set()
        wait_until(lambda: sql.stats().counts[State.SUCCESS] == 20, 20, "all delivered")
    finally:
        broker.release.set()
        relay.stop()
        t.join(30)
    assert [int(v) for v in broker.calls[1]] == list(range(10, 20))
    delivered_in_key_order(broker)


def test_a_retry_in_batch_n_keeps_its_keys_messages_of_batch_n1_unpublished(
    outbox: OutboxHarness, sql: SqlOutbox
) -> None:
    """Message 0 (key a) gets RETRY while 10..19 are already claimed: a's messages of N+1 must
    not go before it (they go back to pending unpublished); b's go on."""
    add_twenty(outbox)
    broker = GatedBroker([{b"0": "retry"}], first_only=True)
    relay = Relay(sql, broker, SETTINGS)
    t = start(relay)
    try:
        assert broker.entered.wait(10)
        wait_until(lambda: sending(sql) == 20, 10, "batch N+1 claimed while batch N is held")
        broker.release.set()
        wait_until(lambda: sql.stats().counts[State.SUCCESS] == 20, 20, "all delivered")
    finally:
        broker.release.set()
        relay.stop()
        t.join(30)
    assert all(int(v) % 2 == 1 for v in broker.calls[1]), f"key a's next messages were published: {broker.calls[1]}"
    delivered_in_key_order(broker)
    assert sql.get(sql.list(State.SUCCESS, 100)[0].id)[1].attempts <= 1


def test_a_broker_outage_in_batch_n_puts_batch_n1_back_unspent_and_in_order(
    outbox: OutboxHarness, sql: SqlOutbox
) -> None:
    """The whole of N fails (BrokerError) with N+1 claimed: N+1 goes back to pending unpublished
    and unspent, and nothing of it passes N's messages."""
    add_twenty(outbox)
    broker = GatedBroker([BrokerError("down")], first_only=True)
    relay = Relay(sql, broker, SETTINGS)
    t = start(relay)
    try:
        assert broker.entered.wait(10)
        wait_until(lambda: sending(sql) == 20, 10, "batch N+1 claimed while batch N is held")
        broker.release.set()
        wait_until(lambda: sql.stats().counts[State.SUCCESS] == 20, 20, "all delivered")
    finally:
        broker.release.set()
        relay.stop()
        t.join(30)
    assert [int(v) for v in broker.calls[1]] == list(range(10)), "batch N+1 went before batch N was sent again"
    delivered_in_key_order(broker)
    assert all(m.attempts == 0 for m in sql.list(State.SUCCESS, 100)), "an outage spent attempts"


def test_stop_with_the_next_batch_claimed_puts_it_back_to_pending(outbox: OutboxHarness, sql: SqlOutbox) -> None:
    """SIGTERM while N is in flight and N+1 claimed: N finishes, N+1 goes back, nothing stays
    ``sending`` (it would wait out its lease, holding its keys back, after the relay stopped)."""
    add_twenty(outbox)
    broker = GatedBroker([], first_only=True)
    relay = Relay(sql, broker, SETTINGS)
    t = start(relay)
    assert broker.entered.wait(10)
    wait_until(lambda: sending(sql) == 20, 10, "batch N+1 claimed while batch N is held")
    relay.stop()
    broker.release.set()
    t.join(30)
    assert not t.is_alive()
    counts = sql.stats().counts
    assert (counts[State.SUCCESS], counts[State.SENDING], counts[State.PENDING]) == (10, 0, 10)
    assert len(broker.calls) == 1


def test_the_next_batch_keeps_its_lease_while_the_batch_before_it_is_slow(
    outbox: OutboxHarness, sql: SqlOutbox, caplog: pytest.LogCaptureFixture
) -> None:
    """N+1 waits for N's publish under a lease of its own: the renewer extends it too, or a slow
    broker would let it expire, another relay take it, and both send it."""
    add_twenty(outbox)
    broker = GatedBroker([], first_only=True, hold_s=60)
    relay = Relay(sql, broker, RelaySettings(batch_size=10, idle_wait_s=0.01, lease_s=1.0))
    t = start(relay)
    try:
        assert broker.entered.wait(10)
        wait_until(lambda: sending(sql) == 20, 10, "batch N+1 claimed while batch N is held")
        first = lease_of(sql, b"19")
        wait_until(lambda: lease_of(sql, b"19") > first, 10, "the next batch's lease renewed")
        assert sql.recover().lease_expired == 0
        broker.release.set()
        wait_until(lambda: sql.stats().counts[State.SUCCESS] == 20, 20, "all delivered")
    finally:
        broker.release.set()
        relay.stop()
        t.join(30)
    assert not [r for r in caplog.records if "lost their lease" in r.getMessage()]
    delivered_in_key_order(broker)


def lease_of(store: SqlOutbox, value: bytes) -> float:
    t = store.table
    with store.engine.connect() as conn:
        return float(conn.execute(sa.select(t.c.lease_until).where(t.c.value == value)).scalar_one())


def test_a_failed_claim_of_the_next_batch_loses_no_delivery(
    outbox: OutboxHarness, caplog: pytest.LogCaptureFixture
) -> None:
    """The store fails the claim that records N-1 while N is in flight: N-1's deliveries are
    recorded later (not lost, not sent again), N+1 is claimed again."""
    if not isinstance(outbox.store, SqlOutbox):
        pytest.skip("only a SQL store claims the next batch while one is in flight")
    failed = threading.Event()

    class FailsOnce(SqlOutbox):
        def succeed_and_claim(self, delivered: Sequence[Delivered], limit: int, lease_s: float, *,
                              in_flight: Sequence[Message] = ()) -> list[Message]:
            if delivered and in_flight and not failed.is_set():
                failed.set()
                raise StoreError("the database went away", retriable=True)
            return super().succeed_and_claim(delivered, limit, lease_s, in_flight=in_flight)

    for i in range(30):
        outbox.add(topic="t", value=b"%d" % i, key=KEYS[i % 2])
    store = FailsOnce(outbox.store.engine, table=outbox.store.table.name)
    broker = GatedBroker([], hold_s=0)
    relay = Relay(store, broker, SETTINGS)
    caplog.set_level(logging.INFO, "zeroloss.relay")
    t = start(relay)
    try:
        wait_until(lambda: store.stats().counts[State.SUCCESS] == 30, 30, "all delivered and recorded")
    finally:
        relay.stop()
        t.join(30)
        store.close()  # its LISTEN connection, if it idled
    assert failed.is_set()
    assert relay.counters.delivered == 30 and relay.counters.store_errors == 1
    assert sorted(int(m.value) for m in broker.delivered) == list(range(30)), "a message sent twice or never"
    delivered_in_key_order(broker)


def test_a_relay_killed_with_the_next_batch_claimed_leaves_both_to_recover_in_order(
    outbox: OutboxHarness, sql: SqlOutbox
) -> None:
    """The state a SIGKILL between "claim N+1" and "N acknowledged" leaves: N and N+1 both
    ``sending`` under this relay's leases, nothing recorded. Once the leases expire another relay
    recovers and sends them all, each key in order (N's messages of a key before N+1's)."""
    add_twenty(outbox)
    dead = SqlOutbox(sql.engine, table=sql.table.name)
    n = dead.claim(10, lease_s=0.2)
    n1 = dead.succeed_and_claim([], 10, lease_s=0.2, in_flight=n)
    assert [int(m.value) for m in n1] == list(range(10, 20))
    dead.close()
    wait_until(lambda: sql.recover().lease_expired == 20 or sending(sql) == 0, 10, "both leases expired")
    broker = GatedBroker([], hold_s=0)
    Relay(sql, broker, SETTINGS).drain(timeout_s=30)
    assert sql.stats().counts[State.SUCCESS] == 20
    delivered_in_key_order(broker)
    assert [int(m.value) for m in broker.delivered][:10] == list(range(10))


def test_in_flight_rows_do_not_hide_an_earlier_message_another_relay_holds(
    outbox: OutboxHarness, sql: SqlOutbox
) -> None:
    """The claim's per-key re-check reads each key's first rows in id order: this relay's own
    in-flight rows come first there, and must not push the row another relay holds locked (its
    claim still open, so SKIP LOCKED passed over it) out of what the re-check reads; the later
    message of that key would then go before it."""
    if outbox.kind == "sqlite":
        pytest.skip("SQLite has no row locks: one writer at a time")
    ids = [outbox.add(topic="t", value=b"%d" % i, key=b"a") for i in range(7)]
    in_flight = sql.claim(5, lease_s=60)
    assert [m.id for m in in_flight] == ids[:5]
    other = sql.engine.connect()
    try:
        with other.begin():  # another relay's claim, between its SELECT and its commit
            t = sql.table
            other.execute(sa.select(t.c.id).where(t.c.id == ids[5]).with_for_update())
            got = sql.succeed_and_claim([], 10, lease_s=60, in_flight=in_flight)
            assert got == [], f"{[m.value for m in got]} claimed while message 5 of its key is held"
    finally:
        other.close()
    assert [m.id for m in sql.succeed_and_claim([], 10, lease_s=60, in_flight=in_flight)] == ids[5:]
