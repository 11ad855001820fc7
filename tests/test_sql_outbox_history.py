"""A PostgreSQL outbox that keeps its delivered rows for audit: once the statistics describe a table
of ``success`` rows (what ANALYZE sees after a history builds up; a burst of new messages is too
small to trigger another), the relay's statements must keep the plans they have on a fresh table.
Each test replays the relay's own statements under EXPLAIN ANALYZE, rolled back."""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from bench.growth import fill_history

from tests.conftest import PG_URL, require_service
from tests.waiting import wait_until
from zeroloss.outbox.base import Delivered, State
from zeroloss.outbox.sql import SqlOutbox

pytestmark = pytest.mark.postgres

HISTORY = 20_000  # enough for ANALYZE to see a table of success rows; 0.5 s to fill and analyze


@pytest.fixture
def audited() -> Iterator[SqlOutbox]:
    """A table with HISTORY delivered rows, VACUUM ANALYZEd (as autovacuum leaves it), then 600
    new messages over 100 keys that no ANALYZE has seen."""
    require_service("postgres")
    outbox = SqlOutbox(PG_URL, table=f"zl_hist_{uuid.uuid4().hex[:10]}")
    outbox.create_schema()
    try:
        fill_history(outbox, "t", HISTORY)
        with outbox.engine.begin() as conn:
            outbox.add_many(conn, [{"topic": "t", "value": b"x" * 200, "key": b"k%d" % (i % 100)} for i in range(600)])
        yield outbox
    finally:
        outbox.drop_schema()
        outbox.close()


def statements_of(outbox: SqlOutbox, call: Any) -> list[tuple[str, Any]]:
    """The statements ``call()`` sends, with their parameters."""
    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        seen.append((statement, parameters))

    sa.event.listen(outbox.engine, "before_cursor_execute", record)
    try:
        call()
    finally:
        sa.event.remove(outbox.engine, "before_cursor_execute", record)
    return seen


def plan_of(outbox: SqlOutbox, statements: list[tuple[str, Any]], wanted: str) -> str:
    """EXPLAIN ANALYZE the first statement containing ``wanted``, after running the ones before it
    in the same transaction (the claim's settings hold for its transaction only); rolled back."""
    with outbox.engine.connect() as conn, conn.begin() as tx:
        for statement, params in statements:
            if wanted in statement:
                plan = conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + statement, params).scalars()
                tx.rollback()
                return "\n".join(plan)
            if statement.lstrip().upper().startswith(("SELECT", "(SELECT")):
                conn.exec_driver_sql(statement, params)
    raise AssertionError(f"no statement with {wanted!r} in {[s for s, _ in statements]}")


def recorded(outbox: SqlOutbox, message_id: str) -> tuple[Any, ...]:
    t = outbox.table
    with outbox.engine.connect() as conn:
        return tuple(conn.execute(sa.select(t.c.state, t.c.location, t.c.done_at).where(t.c.id == message_id)).one())


def test_recording_a_batch_reads_its_ids_once(audited: SqlOutbox) -> None:
    """The statistics say every row is delivered, so a ``state <> 'success'`` filter was estimated
    at one row, and the planner joined it to the batch's unnest by re-reading the unnest for each
    row found: 500 x 500 id comparisons (1000 x 1000, 110-170 ms a batch, after 1M rows)."""
    batch = audited.claim(500, lease_s=60)
    assert len(batch) == 500
    statements = statements_of(audited, lambda: audited.succeed([Delivered(m, "t/0/1") for m in batch]))
    with audited.engine.begin() as conn:  # replayed on the batch as it was: sending
        conn.execute(
            sa.update(audited.table)
            .where(audited.table.c.id.in_([m.id for m in batch]))
            .values(state="sending", done_at=None, location=None)
        )
    plan = plan_of(audited, statements, "unnest")
    [unnest] = [line for line in plan.splitlines() if "Function Scan on v" in line]
    assert unnest.endswith("loops=1)") and "Rows Removed by Join Filter" not in plan, plan
    assert audited.stats().counts[State.SENDING] == 500


@pytest.mark.parametrize("one_statement", [True, False], ids=["one-statement", "older-statements"])
def test_the_blocked_keys_are_read_from_the_wait_index(audited: SqlOutbox, one_statement: bool) -> None:
    """Every partial index looks empty to the planner here (its last VACUUM saw no backlog); the
    blocked keys were read by filtering the whole backlog in ``live`` or ``pending``. In the
    one-statement claim they are the candidate scan's hashed subplan, and the candidates still
    come from ``pending`` in id order (no Sort)."""
    audited._claim_in_one_statement = one_statement
    assert len(audited.claim(100, lease_s=60)) == 100  # one sending message per key: all blocked
    statements = statements_of(audited, lambda: audited.claim(100, lease_s=60))
    plan = plan_of(audited, statements, "UNION")
    t = audited.table.name
    if one_statement:
        whole, lines = plan, plan.splitlines()
        start = next(i for i, line in enumerate(lines) if line.strip() == "SubPlan 1")
        end = next(i for i, line in enumerate(lines) if i > start and line.startswith("  CTE "))
        plan = "\n".join(lines[start:end])
        scan = next(line for line in whole[whole.index("LockRows") :].splitlines() if "Scan" in line)
        assert "hashed SubPlan 1" in whole, whole
        assert f"Index Scan using ix_{t}_pending" in scan and "Sort" not in whole, whole
        # Each part by index: joined to the chosen rows, the UPDATE read the whole table.
        assert "Seq Scan" not in whole, whole
    assert f"ix_{t}_wait" in plan and f"ix_{t}_live" not in plan and f"ix_{t}_pending" not in plan, plan
    assert "Rows Removed by Filter" not in plan, plan


def test_a_batch_recorded_twice_keeps_its_first_location(audited: SqlOutbox) -> None:
    """A relay whose lease expired records its batch after another relay sent and recorded it
    again: the row keeps the first record's location and time."""
    other = SqlOutbox(PG_URL, table=audited.table.name)
    try:
        slow = audited.claim(1, lease_s=0.05)
        wait_until(lambda: other.recover().lease_expired == 1, what="the lease to expire")
        again = other.claim(1, lease_s=60)
        assert [m.id for m in again] == [m.id for m in slow]
        other.succeed([Delivered(again[0], "t/1/7")])
        first = recorded(audited, slow[0].id)
        audited.succeed([Delivered(slow[0], "t/2/9")])
        assert recorded(audited, slow[0].id) == first and first[:2] == ("success", "t/1/7")
    finally:
        other.close()


# Review (rev-history): the recorded batch and the blocked keys, state by state, against what the
# statements with the state check in their WHERE gave. These pass on the code before the change
# too: they guard the CASEs and the wait-index query, not a plan.


def set_states(outbox: SqlOutbox, ids: list[str], states: list[dict[str, Any]]) -> None:
    t = outbox.table
    with outbox.engine.begin() as conn:
        for mid, values in zip(ids, states, strict=True):
            if values:
                conn.execute(sa.update(t).where(t.c.id == mid).values(**values))


def test_recording_a_batch_moves_every_undelivered_state_and_keeps_a_delivered_row() -> None:
    """A batch whose rows are in every state: pending (recovered), sending (this relay's, or
    another relay's after the lease expired), failed, success; each undelivered one becomes
    ``success`` at this record's location and time, the delivered one keeps its own."""
    require_service("postgres")
    outbox = SqlOutbox(PG_URL, table=f"zl_hist_{uuid.uuid4().hex[:10]}")
    outbox.create_schema()
    try:
        with outbox.engine.begin() as conn:
            ids = sorted(outbox.add_many(conn, [{"topic": "t", "value": b"v", "key": b"k"} for _ in range(5)]))
        now = outbox.now()
        set_states(
            outbox,
            ids,
            [
                {},
                {"state": "sending", "lease_until": now + 60, "claimed_by": outbox._token},
                {"state": "sending", "lease_until": now - 1, "claimed_by": "another relay"},
                {"state": "failed", "attempts": 3, "last_error": "boom"},
                {"state": "success", "location": "t/0/1", "done_at": now - 100},
            ],
        )
        outbox.succeed([Delivered(outbox.get(mid)[1], f"t/9/{i}") for i, mid in enumerate(ids)])
        rows = [recorded(outbox, mid) for mid in ids]
        assert [r[:2] for r in rows] == [("success", f"t/9/{i}") for i in range(4)] + [("success", "t/0/1")]
        assert rows[4][2] == now - 100 and all(r[2] >= now for r in rows[:4]), rows
    finally:
        outbox.drop_schema()
        outbox.close()


def test_two_relays_recording_one_batch_at_once_keep_the_first_record() -> None:
    """The second UPDATE waits on the first's row locks and is then re-evaluated on the row the
    first committed (READ COMMITTED): the CASEs must see ``success`` there, as the old WHERE did."""
    require_service("postgres")
    outbox = SqlOutbox(PG_URL, table=f"zl_hist_{uuid.uuid4().hex[:10]}")
    outbox.create_schema()
    stale = SqlOutbox(PG_URL, table=outbox.table.name)

    def waiting_on_a_lock() -> int:
        # a new transaction each time: pg_stat_activity is read once per transaction
        with outbox.engine.connect() as probe:
            return int(
                probe.exec_driver_sql(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %(q)s",
                    {"q": f"UPDATE {outbox.table.name} %"},
                ).scalar_one()
            )

    try:
        with outbox.engine.begin() as conn:
            outbox.add_many(conn, [{"topic": "t", "value": b"v", "key": b"k%d" % i} for i in range(20)])
        batch = outbox.claim(20, lease_s=60)
        ids = sorted(m.id for m in batch)
        with outbox.engine.connect() as first:
            tx = first.begin()
            try:
                first.execute(outbox._succeed_pg, {"ids": ids, "locs": ["t/1/1"] * 20, "now": outbox.now()})
                waiting = threading.Thread(target=stale.succeed, args=([Delivered(m, "t/2/2") for m in batch],))
                waiting.start()
                wait_until(waiting_on_a_lock, what="the second record to wait on the first's row locks")
                tx.commit()
            finally:
                if tx.is_active:
                    tx.rollback()
        waiting.join(10)
        assert not waiting.is_alive()
        assert {recorded(outbox, mid)[:2] for mid in ids} == {("success", "t/1/1")}
    finally:
        stale.close()
        outbox.drop_schema()
        outbox.close()


def older_table(outbox: SqlOutbox) -> None:
    """The table as an earlier zeroloss made it on PostgreSQL: full claim/key/done/wait indexes."""
    name = outbox.table.name
    with outbox.engine.begin() as conn:
        conn.execute(sa.schema.CreateTable(outbox.table))
        for suffix, columns in (
            ("claim", "state, id, not_before"),
            ("key", "key_hash, id"),
            ("done", "state, done_at"),
            ("wait", "state, not_before"),
        ):
            conn.exec_driver_sql(f"CREATE INDEX ix_{name}_{suffix} ON {name} ({columns})")


@pytest.mark.parametrize("layout", ["partial", "older", "older-upgraded", "partial-without-wait"])
def test_the_blocked_keys_are_the_same_set_either_way(layout: str) -> None:
    """Keys in every state mix (sending with a live or expired lease, failed, pending due or in a
    backoff, success with a future not_before, no key): the wait-index query returns exactly the
    set the generic one does, on a table with the partial indexes, one an earlier version made
    (before and after ``create_schema`` adds them) and one whose wait index is missing."""
    require_service("postgres")
    outbox = SqlOutbox(PG_URL, table=f"zl_hist_{uuid.uuid4().hex[:10]}")
    try:
        if layout.startswith("older"):
            older_table(outbox)
        if layout != "older":
            outbox.create_schema()
        if layout == "partial-without-wait":
            with outbox.engine.begin() as conn:
                conn.exec_driver_sql(f"DROP INDEX ix_{outbox.table.name}_wait")
        rng = random.Random(14)
        with outbox.engine.begin() as conn:
            keys = [b"k%d" % rng.randrange(120) if rng.random() < 0.9 else None for _ in range(400)]
            ids = sorted(outbox.add_many(conn, [{"topic": "t", "value": b"v", "key": k} for k in keys]))
        now = outbox.now()
        mix: list[dict[str, Any]] = [
            {},
            {"not_before": now + 600},
            {"not_before": now - 1},
            {"state": "sending", "lease_until": now + 60},
            {"state": "sending", "lease_until": now - 1},
            {"state": "failed"},
            {"state": "success", "done_at": now, "not_before": now + 600},
        ]
        set_states(outbox, ids, [rng.choice(mix) for _ in ids])
        with outbox.engine.connect() as conn, conn.begin():
            generic = outbox._blocked_keys(conn, now)
            assert outbox._has_partial_indexes(conn) == (layout != "older")
            conn.execute(outbox._claim_plan_pg)
            wait_index = outbox._blocked_keys(conn, now, True)
        assert 0 < len(generic) < 120 and wait_index == generic
    finally:
        outbox.drop_schema()
        outbox.close()
