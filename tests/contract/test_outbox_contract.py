"""One contract for every OutboxStore: the spool and the SQL table on SQLite, PostgreSQL, MariaDB."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest

from tests.conftest import OutboxHarness
from tests.waiting import wait_until
from zeroloss.errors import ConfigError, UnknownMessageError
from zeroloss.outbox.base import Delivered, OutboxAdmin, OutboxStore, State


def test_is_an_outbox_store_and_admin(outbox: OutboxHarness) -> None:
    assert isinstance(outbox.store, OutboxStore)
    assert isinstance(outbox.store, OutboxAdmin)


def test_add_claim_succeed_round_trip_keeps_bytes_exactly(outbox: OutboxHarness) -> None:
    value = bytes(range(256)) * 3
    mid = outbox.add(topic="orders", value=value, key=b"\x00k\xff", headers={"trace": b"\x01\x02"})
    assert outbox.store.get(mid)[0] is State.PENDING
    [msg] = outbox.store.claim(10, lease_s=30)
    assert (msg.id, msg.topic, msg.value, msg.key) == (mid, "orders", value, b"\x00k\xff")
    assert msg.headers == (("trace", b"\x01\x02"),)
    assert msg.attempts == 0
    assert outbox.store.get(mid)[0] is State.SENDING
    outbox.store.succeed([Delivered(msg, "orders/0/7")])
    assert outbox.store.get(mid)[0] is State.SUCCESS
    stats = outbox.store.stats()
    assert stats.counts[State.SUCCESS] == 1
    assert stats.counts[State.PENDING] == 0
    assert stats.counts[State.SENDING] == 0


def test_claims_oldest_first_and_never_twice_under_a_live_lease(outbox: OutboxHarness) -> None:
    ids = [outbox.add(topic="t", value=b"%d" % i) for i in range(12)]
    first = outbox.store.claim(5, lease_s=60)
    second = outbox.store.claim(100, lease_s=60)
    assert [m.id for m in first] == ids[:5]
    assert [m.id for m in second] == ids[5:]
    assert outbox.store.claim(100, lease_s=60) == []


def test_expired_lease_returns_message_to_pending(outbox: OutboxHarness) -> None:
    mid = outbox.add(topic="t", value=b"x")
    [msg] = outbox.store.claim(1, lease_s=0.2)
    assert outbox.store.claim(1, lease_s=0.2) == []
    wait_until(lambda: outbox.store.recover().lease_expired == 1, what="lease expiry")
    assert outbox.store.get(mid)[0] is State.PENDING
    [again] = outbox.store.claim(1, lease_s=30)
    assert again.id == msg.id


def test_retry_waits_for_not_before(outbox: OutboxHarness) -> None:
    mid = outbox.add(topic="t", value=b"x")
    [msg] = outbox.store.claim(1, lease_s=30)
    outbox.store.retry([replace(msg, attempts=1, not_before=time.time() + 3600, last_error="boom")])
    assert outbox.store.get(mid)[0] is State.PENDING
    assert outbox.store.claim(10, lease_s=30) == []
    [waiting] = outbox.store.list(State.PENDING)
    assert (waiting.id, waiting.attempts, waiting.last_error) == (mid, 1, "boom")
    assert outbox.store.stats().oldest_pending_error == "boom"  # status says what holds it back


def test_stats_name_no_error_for_a_fresh_backlog(outbox: OutboxHarness) -> None:
    assert outbox.store.stats().oldest_pending_error is None
    outbox.add(topic="t", value=b"x")
    assert outbox.store.stats().oldest_pending_error is None


def test_a_due_retry_is_claimed_with_its_attempts_and_error(outbox: OutboxHarness) -> None:
    mid = outbox.add(topic="t", value=b"x")
    [msg] = outbox.store.claim(1, lease_s=30)
    outbox.store.retry([replace(msg, attempts=2, not_before=time.time() - 1, last_error="boom")])
    [again] = outbox.store.claim(10, lease_s=30)
    assert (again.id, again.attempts, again.last_error) == (mid, 2, "boom")


def test_fail_parks_the_key_and_requeue_releases_it(outbox: OutboxHarness) -> None:
    a1 = outbox.add(topic="t", value=b"a1", key=b"A")
    a2 = outbox.add(topic="t", value=b"a2", key=b"A")
    b1 = outbox.add(topic="t", value=b"b1", key=b"B")
    batch = outbox.store.claim(1, lease_s=30)
    assert [m.id for m in batch] == [a1]
    outbox.store.fail([replace(batch[0], attempts=5, last_error="poison")])
    assert outbox.store.get(a1)[0] is State.FAILED
    # a2 waits behind the failed a1; b1 flows.
    assert [m.id for m in outbox.store.claim(10, lease_s=30)] == [b1]
    stats = outbox.store.stats()
    assert stats.counts[State.FAILED] == 1
    assert stats.parked == 1
    [failed] = outbox.store.list(State.FAILED)
    assert (failed.id, failed.last_error) == (a1, "poison")
    assert outbox.store.requeue([a1]) == 1
    got = outbox.store.claim(10, lease_s=30)
    assert [m.id for m in got] == [a1, a2]
    assert got[0].attempts == 0


def test_a_retry_waiting_out_backoff_holds_back_its_key_only(outbox: OutboxHarness) -> None:
    a1 = outbox.add(topic="t", value=b"a1", key=b"A")
    [m] = outbox.store.claim(1, lease_s=30)
    a2 = outbox.add(topic="t", value=b"a2", key=b"A")
    n1 = outbox.add(topic="t", value=b"n1")
    outbox.store.retry([replace(m, attempts=1, not_before=time.time() + 3600, last_error="e")])
    assert [x.id for x in outbox.store.claim(10, lease_s=30)] == [n1]
    assert outbox.store.get(a2)[0] is State.PENDING
    assert outbox.store.get(a1)[0] is State.PENDING


def test_a_key_in_sending_holds_back_its_later_messages(outbox: OutboxHarness) -> None:
    outbox.add(topic="t", value=b"a1", key=b"A")
    [m1] = outbox.store.claim(1, lease_s=30)
    a2 = outbox.add(topic="t", value=b"a2", key=b"A")
    assert outbox.store.claim(10, lease_s=30) == []
    outbox.store.succeed([Delivered(m1, "t/0/0")])
    assert [m.id for m in outbox.store.claim(10, lease_s=30)] == [a2]


def test_same_key_messages_can_share_one_claim_in_order(outbox: OutboxHarness) -> None:
    ids = [outbox.add(topic="t", value=b"%d" % i, key=b"K") for i in range(5)]
    assert [m.id for m in outbox.store.claim(10, lease_s=30)] == ids


def test_concurrent_claims_are_disjoint_and_complete(outbox: OutboxHarness) -> None:
    ids = {outbox.add(topic="t", value=b"%d" % i) for i in range(200)}
    seen: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            while True:
                got = outbox.store.claim(7, lease_s=60)
                if not got:
                    return
                with lock:
                    seen.extend(m.id for m in got)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(seen) == len(set(seen)), "a message was claimed twice"
    assert set(seen) == ids


def test_unknown_ids_are_refused_clearly(outbox: OutboxHarness) -> None:
    with pytest.raises(UnknownMessageError, match="0190"):
        outbox.store.get("0190aaaa-0000-7000-8000-000000000000")
    mid = outbox.add(topic="t", value=b"x")
    with pytest.raises(UnknownMessageError):
        outbox.store.requeue([mid])  # pending, not failed
    assert outbox.store.get(mid)[0] is State.PENDING


def test_purge_success_keeps_recent_records(outbox: OutboxHarness) -> None:
    outbox.add(topic="t", value=b"x")
    [m] = outbox.store.claim(1, lease_s=30)
    outbox.store.succeed([Delivered(m, "t/0/0")])
    assert outbox.store.purge_success(older_than_s=3600) == 0
    assert outbox.store.purge_success(older_than_s=0) == 1
    assert outbox.store.stats().counts[State.SUCCESS] == 0


def test_a_parked_key_with_a_long_backlog_never_starves_other_keys(outbox: OutboxHarness) -> None:
    first = outbox.add(topic="t", value=b"poison", key=b"A")
    [m] = outbox.store.claim(1, lease_s=30)
    outbox.store.fail([replace(m, attempts=1, last_error="poison")])
    for i in range(30):  # more than one claim's worth of messages stuck behind the failed one
        outbox.add(topic="t", value=b"a%d" % i, key=b"A")
    b = outbox.add(topic="t", value=b"b", key=b"B")
    assert [x.id for x in outbox.store.claim(10, lease_s=30)] == [b]
    assert outbox.store.get(first)[0] is State.FAILED


def test_a_key_in_backoff_with_a_long_backlog_never_starves_other_keys(outbox: OutboxHarness) -> None:
    outbox.add(topic="t", value=b"slow", key=b"A")
    [m] = outbox.store.claim(1, lease_s=30)
    outbox.store.retry([replace(m, attempts=1, not_before=time.time() + 3600, last_error="e")])
    for i in range(30):
        outbox.add(topic="t", value=b"a%d" % i, key=b"A")
    b = outbox.add(topic="t", value=b"b", key=b"B")
    assert [x.id for x in outbox.store.claim(10, lease_s=30)] == [b]


# ---- operator methods: purge, list_success, resend, oldest ages -----------------------------


def _fail_one(outbox: OutboxHarness, value: bytes, key: bytes | None = None) -> str:
    mid = outbox.add(topic="t", value=value, key=key)
    [m] = outbox.store.claim(1, lease_s=30)
    assert m.id == mid
    outbox.store.fail([replace(m, attempts=3, last_error="poison")])
    return mid


def _deliver_all(outbox: OutboxHarness) -> list[str]:
    batch = outbox.store.claim(1000, lease_s=30)
    outbox.store.succeed([Delivered(m, f"{m.topic}/0/{i}") for i, m in enumerate(batch)])
    return [m.id for m in batch]


def test_purge_deletes_failed_by_id_or_all_and_an_unknown_id_changes_nothing(outbox: OutboxHarness) -> None:
    ids = [_fail_one(outbox, b"f%d" % i) for i in range(3)]
    pending = outbox.add(topic="t", value=b"p")
    with pytest.raises(UnknownMessageError, match=pending):
        outbox.store.purge(State.FAILED, [ids[0], pending])
    assert outbox.store.stats().counts[State.FAILED] == 3
    assert outbox.store.purge(State.FAILED, [ids[0]]) == 1
    with pytest.raises(UnknownMessageError):
        outbox.store.get(ids[0])
    assert outbox.store.purge(State.FAILED) == 2
    counts = outbox.store.stats().counts
    assert (counts[State.FAILED], counts[State.PENDING]) == (0, 1)
    assert outbox.store.get(pending)[0] is State.PENDING


def test_purging_a_failed_message_unparks_its_key(outbox: OutboxHarness) -> None:
    failed = _fail_one(outbox, b"a1", key=b"A")
    a2 = outbox.add(topic="t", value=b"a2", key=b"A")
    assert outbox.store.claim(10, lease_s=30) == []
    assert outbox.store.stats().parked == 1
    outbox.store.purge(State.FAILED, [failed])
    assert [m.id for m in outbox.store.claim(10, lease_s=30)] == [a2]


def test_purge_refuses_states_that_are_not_for_people_to_delete(outbox: OutboxHarness) -> None:
    outbox.add(topic="t", value=b"x")
    for state in (State.PENDING, State.SENDING, State.SUCCESS, State.TMP):
        with pytest.raises(ConfigError, match="cannot purge"):
            outbox.store.purge(state)
    assert outbox.store.stats().counts[State.PENDING] == 1


def test_doubt_and_malformed_exist_only_where_the_store_says_so(outbox: OutboxHarness) -> None:
    assert {State.PENDING, State.SENDING, State.SUCCESS, State.FAILED} <= outbox.store.states
    spool_only = {State.DOUBT, State.MALFORMED}
    assert spool_only <= outbox.store.states if outbox.kind == "spool" else not spool_only & outbox.store.states
    for state in spool_only:
        assert outbox.store.purge(state) == 0
        with pytest.raises(UnknownMessageError):
            outbox.store.purge(state, ["0190aaaa-0000-7000-8000-000000000000"])


def test_list_success_pages_in_id_order_with_locations(outbox: OutboxHarness) -> None:
    ids = [outbox.add(topic="orders", value=b"%d" % i) for i in range(7)]
    outbox.add(topic="orders", value=b"still pending")
    batch = outbox.store.claim(7, lease_s=30)
    outbox.store.succeed([Delivered(m, f"orders/{i % 2}/{100 + i}") for i, m in enumerate(batch)])
    first = outbox.store.list_success(limit=4)
    rest = outbox.store.list_success(after_id=first[-1].message.id, limit=100)
    got = first + rest
    assert [d.message.id for d in got] == ids
    assert [d.location for d in got] == [f"orders/{i % 2}/{100 + i}" for i in range(7)]
    assert got[3].message.value == b"3"
    assert outbox.store.list_success(since_s=3600) == got
    assert outbox.store.list_success(since_s=-3600) == []  # created in the future: none


def test_resend_puts_success_back_to_pending_under_the_same_id(outbox: OutboxHarness) -> None:
    a, b = outbox.add(topic="t", value=b"a"), outbox.add(topic="t", value=b"b")
    _deliver_all(outbox)
    pending = outbox.add(topic="t", value=b"p")
    with pytest.raises(UnknownMessageError, match=pending):
        outbox.store.resend([a, pending])
    assert outbox.store.get(a)[0] is State.SUCCESS
    assert outbox.store.resend([a]) == 1
    state, msg = outbox.store.get(a)
    assert (state, msg.attempts, msg.value) == (State.PENDING, 0, b"a")
    assert [d.message.id for d in outbox.store.list_success()] == [b]
    assert [m.id for m in outbox.store.claim(10, lease_s=30)] == [a, pending]


def test_stats_show_the_oldest_age_of_every_non_empty_state(outbox: OutboxHarness) -> None:
    assert outbox.store.stats().oldest_age_s == {}
    _fail_one(outbox, b"f")
    outbox.add(topic="t", value=b"p")
    stats = outbox.store.stats()
    assert set(stats.oldest_age_s) == {State.FAILED, State.PENDING}
    assert 0 <= stats.oldest_age_s[State.PENDING] <= stats.oldest_age_s[State.FAILED] < 60
    assert stats.oldest_pending_age_s == stats.oldest_age_s[State.PENDING]


def test_stats_of_the_backlog_only_match_the_full_stats_but_the_delivered(outbox: OutboxHarness) -> None:
    """``stats(delivered=False)`` (the relay's drain check and progress line) leaves out the
    delivered history and nothing else: every undelivered count, parked and ages as in full."""
    delivered = outbox.add(topic="t", value=b"d")
    [msg] = outbox.store.claim(1, lease_s=30)
    outbox.store.succeed([Delivered(msg, "t/0/0")])
    assert msg.id == delivered
    _fail_one(outbox, b"f", key=b"K")
    outbox.add(topic="t", value=b"parked", key=b"K")
    outbox.add(topic="t", value=b"p1")
    outbox.add(topic="t", value=b"p2")
    outbox.store.claim(1, lease_s=30)  # one in sending
    full, backlog = outbox.store.stats(), outbox.store.stats(delivered=False)
    assert full.counts[State.SUCCESS] == 1 and backlog.counts[State.SUCCESS] == 0
    assert State.SUCCESS in full.oldest_age_s and State.SUCCESS not in backlog.oldest_age_s
    undelivered = (State.PENDING, State.SENDING, State.FAILED)
    assert [backlog.counts[s] for s in undelivered] == [full.counts[s] for s in undelivered] == [2, 1, 1]
    assert (backlog.parked, backlog.expired_leases, backlog.oldest_pending_error) == (
        full.parked,
        full.expired_leases,
        full.oldest_pending_error,
    )
    assert backlog.parked == 1
