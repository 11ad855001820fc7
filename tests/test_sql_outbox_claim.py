"""PostgreSQL's claim in one statement (``_claim_pg``) against the statements before it: a key
behind a row in a backoff, failed, sending or held locked by another relay's claim is never
overtaken, nor fills a claim with its backlog while it waits out a backoff; relays of both
shapes, recover() and requeue racing on three keys keep per-key order; a table without the
partial indexes still claims through the older statements."""

from __future__ import annotations

import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import pytest
import sqlalchemy as sa

from tests.conftest import PG_URL, require_service
from tests.test_sql_outbox_history import plan_of, statements_of
from zeroloss.errors import UnknownMessageError
from zeroloss.outbox.base import Delivered, State
from zeroloss.outbox.sql import SqlOutbox

pytestmark = pytest.mark.postgres
SHAPES = [pytest.param(True, id="one-statement"), pytest.param(False, id="older-statements")]


@pytest.fixture
def table() -> Iterator[str]:
    require_service("postgres")
    name = f"zl_claim_{uuid.uuid4().hex[:10]}"
    outbox = SqlOutbox(PG_URL, table=name)
    outbox.create_schema()
    try:
        yield name
    finally:
        outbox.drop_schema()
        outbox.close()


@dataclass
class _Race:
    """What six relay threads (two on each of three outboxes) and an operator thread share: the
    operator runs recover() all along and requeues what the relays failed, until every message is
    done, a problem is seen, or 120 s pass. Every outbox is closed at the end."""

    lock: threading.Lock
    stop: threading.Event
    done: set[str]
    failed: set[str]
    problems: list[str]

    def run(
        self,
        relay_thread: Callable[[SqlOutbox, int], None],
        outboxes: list[SqlOutbox],
        admin: SqlOutbox,
        total: int,
        *,
        operator_pause_s: float,
    ) -> None:
        threads = [threading.Thread(target=relay_thread, args=(outboxes[i % 3], i)) for i in range(6)]
        operator = threading.Thread(target=self._operate, args=(admin, operator_pause_s))
        for th in [*threads, operator]:
            th.start()
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not self.problems:
                with self.lock:
                    if len(self.done) == total:
                        break
                time.sleep(0.05)
        finally:
            self.stop.set()
            for th in [*threads, operator]:
                th.join()
            for o in [*outboxes, admin]:
                o.close()

    def _operate(self, admin: SqlOutbox, pause_s: float) -> None:
        while not self.stop.is_set():
            admin.recover()
            with self.lock:
                todo = sorted(self.failed)
            for i in todo:
                try:
                    admin.requeue([i])
                except UnknownMessageError:
                    continue  # not failed yet: its relay's fail() has not committed
                with self.lock:
                    self.failed.discard(i)
            time.sleep(pause_s)


def relay(table: str, one_statement: bool = True) -> SqlOutbox:
    outbox = SqlOutbox(PG_URL, table=table)
    outbox._claim_in_one_statement = one_statement
    return outbox


def add(outbox: SqlOutbox, keys: list[bytes | None]) -> list[str]:
    with outbox.engine.begin() as conn:
        return outbox.add_many(conn, [{"topic": "t", "value": b"v", "key": k} for k in keys])


@pytest.mark.parametrize("one_statement", SHAPES)
@pytest.mark.parametrize("first", ["backoff", "failed", "sending", "locked"])
def test_a_key_whose_first_message_must_go_first_is_not_overtaken(table: str, one_statement: bool, first: str) -> None:
    """Key b's first message is in a backoff, failed, sent by another relay, or held locked by
    another relay's claim that has not committed (only the re-check sees that one: it is still
    ``pending`` and due). Its later messages wait; keys a and the unkeyed ones are claimed."""
    outbox, other = relay(table, one_statement), relay(table)
    try:
        ids = add(outbox, [b"a", b"b", b"a", b"b", None, b"b"])
        a1, b1, a2, b2, free, b3 = ids
        t = outbox.table
        if first == "backoff":
            with outbox.engine.begin() as conn:
                conn.execute(sa.update(t).where(t.c.id == b1).values(not_before=outbox.now() + 600))
        elif first == "failed":
            with outbox.engine.begin() as conn:
                conn.execute(sa.update(t).where(t.c.id == b1).values(state=State.FAILED.value))
        elif first == "sending":  # by another relay, its lease running
            with outbox.engine.begin() as conn:
                until = outbox.now() + 600
                conn.execute(
                    sa.update(t)
                    .where(t.c.id == b1)
                    .values(state=State.SENDING.value, lease_until=until, claimed_by="x")
                )
        holder = other.engine.connect()
        try:
            if first == "locked":  # another relay's claim between its scan and its commit
                holder.execute(sa.select(t.c.id).where(t.c.id == b1).with_for_update())
            got = [m.id for m in outbox.claim(10, lease_s=60)]
        finally:
            holder.rollback()
            holder.close()
        assert got == [a1, a2, free]
        assert {outbox.get(i)[0] for i in (b2, b3)} == {State.PENDING}
    finally:
        outbox.close()
        other.close()


@pytest.mark.parametrize("one_statement", SHAPES)
def test_a_key_in_a_backoff_does_not_fill_the_claim_with_its_backlog(table: str, one_statement: bool) -> None:
    """Key b's first message waits out a backoff, its 50 later ones are due, and 10 of other keys
    come after them. A claim of 20 must return the 10: the backoff blocks b before the LIMIT. With
    only the re-check (which drops b's rows after the LIMIT) the claim took 20 of b's backlog,
    dropped them all and returned nothing while the others waited."""
    outbox = relay(table, one_statement)
    try:
        keys: list[bytes | None] = [b"b" if i < 51 else b"k%d" % i for i in range(61)]
        ids = add(outbox, keys)
        t = outbox.table
        with outbox.engine.begin() as conn:
            conn.execute(sa.update(t).where(t.c.id == ids[0]).values(not_before=outbox.now() + 600))
        got = [m.id for m in outbox.claim(20, lease_s=60)]
        assert got == ids[51:]
        assert {outbox.get(i)[0] for i in ids[:51]} == {State.PENDING}
    finally:
        outbox.close()


@pytest.mark.parametrize("one_statement", SHAPES)
def test_a_gap_between_a_keys_candidates_cuts_the_key_there(table: str, one_statement: bool) -> None:
    """k1 k2 k3 k4: another relay's claim holds k3 locked. k1 and k2 go, k4 waits (the re-check
    walks past the candidates to the first row that is not one)."""
    outbox, other = relay(table, one_statement), relay(table)
    try:
        k1, k2, k3, k4 = add(outbox, [b"k"] * 4)
        t = outbox.table
        with other.engine.connect() as holder:
            holder.execute(sa.select(t.c.id).where(t.c.id == k3).with_for_update())
            got = [m.id for m in outbox.claim(10, lease_s=60)]
            holder.rollback()
        assert got == [k1, k2]
        assert outbox.get(k4)[0] is State.PENDING
        assert outbox.claim(10, lease_s=60) == []  # k3 free now, but k1 and k2 are sending
    finally:
        outbox.close()
        other.close()


def test_a_table_without_the_partial_indexes_claims_through_the_older_statements(table: str) -> None:
    """An earlier version's table (no partial indexes): the one-statement claim is not used, and
    the claim still keeps key order."""
    outbox = relay(table)
    try:
        with outbox.engine.begin() as conn:
            for suffix in ("pending", "live", "wait", "done"):
                conn.exec_driver_sql(f"DROP INDEX ix_{table}_{suffix}")
        a1, b1, a2 = add(outbox, [b"a", b"b", b"a"])
        seen: list[str] = []
        sa.event.listen(outbox.engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
        assert [m.id for m in outbox.claim(1, lease_s=60)] == [a1]
        assert [m.id for m in outbox.claim(10, lease_s=60)] == [b1]  # a2 waits behind a1
        assert outbox.get(a2)[0] is State.PENDING
        assert outbox._partial_indexes is False and not any("WITH cand" in s for s in seen)
    finally:
        outbox.close()


def test_a_small_claim_after_a_backlog_reads_no_table_whole(table: str) -> None:
    """The 1,000 msg/s case after a backlog drained: the statistics still see 10k pending rows,
    the claim finds 20. The UPDATE joined to the chosen rows was estimated at hundreds of rows and
    planned as a scan of the whole table (7 ms a claim at 22k rows, growing with the table)."""
    outbox = relay(table)
    try:
        add(outbox, [b"k%d" % (i % 100) for i in range(10_000)])
        with outbox.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(f"VACUUM ANALYZE {table}")
        while batch := outbox.claim(2000, lease_s=60):
            outbox.succeed([Delivered(m, "t/0/0") for m in batch])
        add(outbox, [b"k%d" % i for i in range(20)])
        statements = statements_of(outbox, lambda: outbox.claim(2000, lease_s=60))
        add(outbox, [b"k%d" % i for i in range(20, 40)])  # the claim's statements, on 20 new ones
        plan = plan_of(outbox, statements, "WITH cand")
        assert "Seq Scan" not in plan and "rows=20 loops=1" in plan, plan
    finally:
        outbox.close()


def test_relays_of_both_shapes_recover_and_requeue_racing_on_three_keys_keep_key_order(table: str) -> None:
    """Two relays of the one-statement claim and one of the older statements, two threads each,
    900 messages over three keys (+ unkeyed), some failed and requeued by an operator thread,
    recover() running all along. A claim that hands out a message while an earlier one of its key
    is not delivered (or in the same batch before it) is out of order."""
    outboxes = [relay(table), relay(table), relay(table, one_statement=False)]
    admin = relay(table)
    keys = [None if i % 10 == 0 else b"k%d" % (i % 3) for i in range(900)]
    ids = add(admin, keys)
    key_of = dict(zip(ids, keys, strict=True))
    lock = threading.Lock()
    done: set[str] = set()
    failed: set[str] = set()
    problems: list[str] = []
    stop = threading.Event()

    def run(outbox: SqlOutbox, seed: int) -> None:
        rnd = random.Random(seed)
        unrecorded: list[Delivered] = []
        deadline = time.monotonic() + 120
        try:
            while time.monotonic() < deadline and not stop.is_set():
                batch = outbox.succeed_and_claim(unrecorded, rnd.randint(1, 30), lease_s=600)
                unrecorded = []
                if not batch:
                    time.sleep(0.002)
                    continue
                batch_ids = {m.id for m in batch}
                with lock:
                    for m in batch:
                        k = key_of[m.id]
                        if m.id in done:
                            problems.append(f"{m.id} handed out again after it was delivered")
                        early = [i for i in ids if i < m.id and key_of[i] == k and i not in done] if k else []
                        if [i for i in early if i not in batch_ids]:
                            problems.append(f"{m.id} handed out before {early[0]} of its key")
                    bad = [m for m in batch if not m.attempts and rnd.random() < 0.03]
                    # A failed message holds back the rest of its key, in this batch too: those go back.
                    cut = {key_of[b.id]: b.id for b in reversed(bad) if key_of[b.id]}
                    later = [m for m in batch if m not in bad and key_of[m.id] in cut and m.id > cut[key_of[m.id]]]
                    ok = [m for m in batch if m not in bad and m not in later]
                    done.update(m.id for m in ok)
                    failed.update(m.id for m in bad)
                outbox.retry(later)
                outbox.fail([replace(m, attempts=1, last_error="x") for m in bad])
                unrecorded = [Delivered(m, "t/0/0") for m in ok]
            outbox.succeed(unrecorded)
        except BaseException as exc:
            problems.append(f"relay crashed: {exc!r}")

    race = _Race(lock, stop, done, failed, problems)
    race.run(run, outboxes, admin, len(ids), operator_pause_s=0.01)
    assert problems == []
    assert done == set(ids)


def test_a_claim_through_a_psycopg2_engine_hands_out_bytes(table: str) -> None:
    """A user's own engine on psycopg2 returns bytea as memoryview: the claim's Messages still
    carry ``bytes`` (as the older statements' rows did), not a view that has no ``decode``."""
    pytest.importorskip("psycopg2")
    engine = sa.create_engine(sa.make_url(PG_URL).set(drivername="postgresql+psycopg2"))
    outbox = SqlOutbox(engine, table=table)
    try:
        with engine.begin() as conn:
            outbox.add_many(conn, [{"topic": "t", "value": b"v", "key": b"k"}, {"topic": "t", "value": b"w"}])
        got = outbox.claim(10, lease_s=60)
        assert [(type(m.value), type(m.key)) for m in got] == [(bytes, bytes), (bytes, type(None))]
        assert [(m.value, m.key) for m in got] == [(b"v", b"k"), (b"w", None)]
    finally:
        outbox.close()
        engine.dispose()


def test_a_large_claim_on_few_keys_does_not_compare_each_walked_row_with_every_candidate(table: str) -> None:
    """2,000 candidates over two keys: the re-check walks each key's rows and finds the first that
    is not a candidate. Asked as ``NOT EXISTS (… FROM cand)``, that was planned as a nested-loop
    anti join over the CTE whenever the statistics see few pending rows (a new table, a backlog
    not analyzed yet, a history): every walked row against every candidate, 2 million comparisons
    here (50 million and 3 s for a claim of 10,000 on three keys; the older statements: 0.2 s)."""
    outbox = relay(table)
    try:
        add(outbox, [b"a", b"b"] * 1000)
        statements = statements_of(outbox, lambda: outbox.claim(2000, lease_s=60))
        add(outbox, [b"c", b"d"] * 1000)  # the claim's statements, on 2,000 new ones
        plan = plan_of(outbox, statements, "WITH cand")
        assert "rows=2000 loops=1" in plan, plan  # it did claim them all
        removed = sum(int(n) for n in re.findall(r"Rows Removed by Join Filter: (\d+)", plan))
        assert removed <= 4 * 2000, plan
    finally:
        outbox.close()


def candidate_filter(plan: str) -> str:
    """The Filter line of the candidate scan (the index scan of ``ix_<table>_pending``)."""
    lines = plan.splitlines()
    for i, line in enumerate(lines):
        if "_pending on" in line:
            return next(x for x in lines[i + 1 :] if "Filter:" in x)
    raise AssertionError(plan)


def test_the_blocked_keys_are_looked_up_in_a_hash_not_compared_one_by_one(table: str) -> None:
    """Other relays hold 3,000 keys (``sending``) and 1,000 pending rows locked. As an InitPlan
    array (``key_hash <> ALL(ARRAY(…))``: not a constant, so never hashed) every row the candidate
    scan passed, the locked ones included, was compared with each blocked key: 5,000 x 3,000 for a
    claim of 1,000, 1.0-1.9 s a claim with 3 relays beside it; 4 relays on one outbox ran at 0.55x
    one relay (main's array parameter is a constant to the planner, which hashes it)."""
    outbox, other = relay(table), relay(table)
    try:
        busy = add(outbox, [b"busy%d" % i for i in range(3000)])
        t = outbox.table
        with outbox.engine.begin() as conn:
            conn.execute(
                sa.update(t)
                .where(t.c.id.in_(busy))
                .values(state=State.SENDING.value, lease_until=outbox.now() + 600, claimed_by="x")
            )
        held = add(outbox, [b"held%d" % i for i in range(1000)])
        later: list[bytes | None] = [b"busy%d" % i for i in range(500)]
        free = add(outbox, later + [b"free%d" % i for i in range(1000)])
        with other.engine.connect() as holder, holder.begin():
            holder.execute(sa.select(t.c.id).where(t.c.id.in_(held)).with_for_update())  # another claim, open
            statements = statements_of(outbox, lambda: outbox.claim(1000, lease_s=60))
            plan = plan_of(outbox, statements, "WITH cand")
        scan = candidate_filter(plan)
        assert "hashed SubPlan" in scan and "ALL" not in scan, plan
        assert "rows=1000 loops=1" in plan, plan
        with outbox.engine.connect() as conn:
            mine = set(conn.scalars(sa.select(t.c.id).where(t.c.claimed_by == outbox._token)))
        assert mine == set(free[500:]), "the claim took exactly the free keys' rows"
    finally:
        outbox.close()
        other.close()


def test_the_blocked_keys_stay_hashed_when_the_statistics_count_many_failed_rows(table: str) -> None:
    """The planner hashes a subplan only if its estimated size fits in hash_mem (8 MB by default:
    ~130k keys here). Statistics that count 150,000 failed rows of distinct keys made the blocked
    keys a plain subplan, read again for every row the candidate scan passed; the claim's
    transaction raises hash_mem_multiplier so the estimate cannot decide that."""
    outbox = relay(table)
    try:
        with outbox.engine.begin() as conn:
            conn.exec_driver_sql(
                f"INSERT INTO {table} (id, topic, key_hash, value, state, attempts, not_before, created_at) "
                "SELECT lpad(i::text, 36, '0'), 't', md5(i::text), '\\x76', 'failed', 1, 0, 0 "
                "FROM generate_series(1, 150000) AS i"
            )
        with outbox.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(f"ANALYZE {table}")
        fresh = add(outbox, [b"k%d" % i for i in range(20)])
        statements = statements_of(outbox, lambda: outbox.claim(100, lease_s=60))
        add(outbox, [b"n%d" % i for i in range(20)])  # the claim's statements, on 20 new ones
        plan = plan_of(outbox, statements, "WITH cand")
        assert "hashed SubPlan" in candidate_filter(plan), plan
        assert "rows=20 loops=1" in plan, plan
        assert fresh
    finally:
        outbox.close()


def test_before_postgresql_13_the_claim_runs_the_older_statements(table: str) -> None:
    """hash_mem_multiplier, which keeps the blocked keys hashed, came with PostgreSQL 13: on an
    older server the one-statement claim is not sent (nor the setting, an error there)."""
    outbox = relay(table)
    try:
        _a1, b1, a2 = add(outbox, [b"a", b"b", b"a"])
        outbox.claim(1, lease_s=60)  # connects: the server's version is read
        outbox.engine.dialect.server_version_info = (12, 22)
        seen = [s for s, _ in statements_of(outbox, lambda: outbox.claim(10, lease_s=60))]
        assert not any("WITH cand" in s or "hash_mem_multiplier" in s for s in seen), seen
        assert outbox.get(b1)[0] is State.SENDING and outbox.get(a2)[0] is State.PENDING  # a2 behind a1
    finally:
        outbox.close()


def test_relays_of_both_shapes_with_backoffs_and_expiring_leases_keep_key_order(table: str) -> None:
    """As above, with what that test leaves out: retries into a backoff (``not_before`` ahead, the
    key blocked only through it), leases of 0.5 s that expire under a relay that stalls or
    abandons its batch (a crash: recover() hands the rows back, another relay claims them
    again), four keys. A claim must never hand out a message while an earlier one of its key is
    neither delivered nor in the same batch before it (a re-delivery after an expired lease is
    allowed: at-least-once)."""
    outboxes = [relay(table), relay(table), relay(table, one_statement=False)]
    admin = relay(table)
    keys = [None if i % 10 == 0 else b"k%d" % (i % 4) for i in range(1200)]
    ids = add(admin, keys)
    key_of = dict(zip(ids, keys, strict=True))
    by_key: dict[bytes, list[str]] = {}
    for i in ids:
        k = key_of[i]
        if k is not None:
            by_key.setdefault(k, []).append(i)
    lock = threading.Lock()
    done: set[str] = set()
    failed: set[str] = set()
    problems: list[str] = []
    seen = {"backoff": 0, "abandoned": 0}
    stop = threading.Event()

    def run(outbox: SqlOutbox, seed: int) -> None:
        rnd = random.Random(seed)
        unrecorded: list[Delivered] = []
        try:
            while not stop.is_set():
                batch = outbox.succeed_and_claim(unrecorded, rnd.randint(1, 40), lease_s=0.5)
                unrecorded = []
                if not batch:
                    time.sleep(0.002)
                    continue
                batch_ids = {m.id for m in batch}
                with lock:
                    for m in batch:
                        k = key_of[m.id]
                        early = [i for i in by_key[k] if i < m.id and i not in done and i not in batch_ids] if k else []
                        if early:
                            problems.append(f"{m.id} handed out before {early[0]} of its key")
                    if rnd.random() < 0.03:  # crash: the batch is dropped, its lease runs out
                        seen["abandoned"] += 1
                        continue
                    bad = [m for m in batch if rnd.random() < 0.02]
                    back = [m for m in batch if m not in bad and rnd.random() < 0.03]
                    cut: dict[bytes, str] = {}
                    for m in batch:
                        k = key_of[m.id]
                        if (m in bad or m in back) and k is not None and k not in cut:
                            cut[k] = m.id
                    later = [
                        m for m in batch if m not in bad and m not in back and m.id > cut.get(key_of[m.id] or b"", "~")
                    ]
                    ok = [m for m in batch if m not in bad and m not in back and m not in later]
                    done.update(m.id for m in ok)
                    failed.update(m.id for m in bad)
                    seen["backoff"] += len(back)
                now = outbox.now()
                backoff = [replace(m, attempts=m.attempts + 1, not_before=now + rnd.uniform(0.01, 0.3)) for m in back]
                outbox.retry(later + backoff)
                outbox.fail([replace(m, attempts=m.attempts + 1, last_error="x") for m in bad])
                unrecorded = [Delivered(m, "t/0/0") for m in ok]
                if rnd.random() < 0.05:  # a stalled relay: its lease may expire under it
                    time.sleep(rnd.uniform(0.3, 0.7))
        except BaseException as exc:
            problems.append(f"relay crashed: {exc!r}")

    race = _Race(lock, stop, done, failed, problems)
    race.run(run, outboxes, admin, len(ids), operator_pause_s=0.02)
    assert problems == []
    assert done == set(ids)
    assert seen["backoff"] > 0 and seen["abandoned"] > 0  # the paths this test is for were taken
