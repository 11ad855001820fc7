"""A PostgreSQL outbox that keeps its delivered rows for audit: once the statistics describe a table
of ``success`` rows (what ANALYZE sees after a history builds up; a burst of new messages is too
small to trigger another), the relay's statements must keep the plans they have on a fresh table.
Each test replays the relay's own statements under EXPLAIN ANALYZE, rolled back."""

from __future__ import annotations

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


def test_the_blocked_keys_are_read_from_the_wait_index(audited: SqlOutbox) -> None:
    """Every partial index looks empty to the planner here (its last VACUUM saw no backlog); the
    blocked keys were read by filtering the whole backlog in ``live`` or ``pending``."""
    assert len(audited.claim(100, lease_s=60)) == 100  # one sending message per key: all blocked
    statements = statements_of(audited, lambda: audited.claim(100, lease_s=60))
    plan = plan_of(audited, statements, "UNION")
    t = audited.table.name
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
