"""RocketMQ transactional (half) messages (zeroloss.half_messages) on the real RocketMQ 5 server and
real databases: the check-back table's fence, the commit and rollback paths, a check-back during a
long local transaction, and producer processes SIGKILLed between the local and the broker commit."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import MARIADB_URL, PG_URL, only_in_the_full_crash_matrix, require_service
from tests.rocketmq_server import RocketMQServer, receive
from zeroloss.brokers.rocketmq_remoting import RequestCode
from zeroloss.errors import BrokerError, ConfigError, MessageError, StoreError, TransactionLostError
from zeroloss.half_messages import CheckBack, HalfMessageProducer, HalfMessageTable, Resolution
from zeroloss.message import ID_HEADER, uuid7

REPO = Path(__file__).resolve().parent.parent
CHILD = REPO / "tests" / "half_message_child.py"
# Check-backs as tests/rocketmq_server.py configures them; an older running server gets them at
# runtime (UPDATE_BROKER_CONFIG; the broker's check thread takes the new interval after its
# current wait, so the first check-back may still take up to the old 30 s).
FAST_CHECKS = {"transactionCheckInterval": 2000, "transactionTimeOut": 3000}
WAIT = 90.0  # seconds: the bound on every wait for a check-back or a delivery (conditions, not sleeps)

DBS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
    pytest.param("mariadb", id="mariadb", marks=pytest.mark.mariadb),
]
rocketmq_marks = [
    pytest.mark.rocketmq,
    pytest.mark.postgres,
    # rocketmq-python-client 5.1.2 calls the deprecated logger.warn in its own callback threads.
    pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning"),
]


def _name(prefix: str) -> str:
    return f"zl_{prefix}_{uuid.uuid4().hex[:10]}"


_made: list[tuple[sa.Table, sa.Engine]] = []


def _effects(engine: sa.Engine) -> sa.Table:
    """A business table for the local transactions to write to; dropped after the test."""
    table = sa.Table(
        _name("effects"),
        sa.MetaData(),
        sa.Column("n", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("note", sa.String(64), nullable=False),
    )
    table.create(engine)
    _made.append((table, engine))
    return table


@pytest.fixture(autouse=True)
def _drop_effects() -> Iterator[None]:
    yield
    while _made:
        table, engine = _made.pop()
        table.drop(engine, checkfirst=True)
        engine.dispose()  # the table's fixture may have disposed of it already, before this drop


@pytest.fixture(params=DBS)
def half_table(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HalfMessageTable]:
    kind = request.param
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'half.db'}"
    else:
        require_service("postgres" if kind == "postgresql" else "mariadb")
        url = PG_URL if kind == "postgresql" else MARIADB_URL
    table = HalfMessageTable(url, table=_name("half"), lock_timeout_s=1.0)
    table.create_schema()
    table.create_schema()  # idempotent
    try:
        yield table
    finally:
        table.drop_schema()
        table.close()


# -- the table and its fence, without a broker ----------------------------------------------------


def test_the_fence_answers_commit_for_a_committed_row_and_fences_the_rest(half_table: HalfMessageTable) -> None:
    effects = _effects(half_table.engine)
    committed = uuid7()
    assert half_table.run(committed, "t", "m1", lambda conn: conn.execute(effects.insert().values(note="a")) and 1) == 1
    assert half_table.resolve(committed) is Resolution.COMMIT
    assert half_table.outcome(committed) == "committed"

    never = uuid7()  # a transaction that never wrote its row (rolled back, or the process died first)
    assert half_table.resolve(never, "t") is Resolution.ROLLBACK
    assert half_table.outcome(never) == "rolled_back"
    assert half_table.resolve(never) is Resolution.ROLLBACK  # asked again: the same answer
    # ... and that transaction can no longer commit: its row is taken by the fence.
    with pytest.raises(StoreError, match="already decided rollback"):
        half_table.run(never, "t", "m2", lambda conn: conn.execute(effects.insert().values(note="late")))
    with half_table.engine.connect() as conn:
        assert [r.note for r in conn.execute(sa.select(effects))] == ["a"]


def test_a_failing_local_transaction_leaves_no_row_and_raises_its_own_error(half_table: HalfMessageTable) -> None:
    effects = _effects(half_table.engine)
    half_id = uuid7()

    def fail(conn: sa.Connection) -> None:
        conn.execute(effects.insert().values(note="x"))
        raise ValueError("business rule")

    with pytest.raises(ValueError, match="business rule"):
        half_table.run(half_id, "t", "m", fail)
    assert half_table.outcome(half_id) is None
    with half_table.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(effects)).scalar() == 0


def test_a_transaction_ended_under_the_callable_is_lost_not_committed(half_table: HalfMessageTable) -> None:
    """The callable rolls the transaction back and carries on (as after a deadlock it caught):
    what it wrote next would commit without the half-message row. Refused."""
    effects = _effects(half_table.engine)
    half_id = uuid7()

    def rolls_back(conn: sa.Connection) -> None:
        conn.rollback()
        conn.execute(effects.insert().values(note="outside"))

    with pytest.raises(TransactionLostError, match="ended under the callable"):
        half_table.run(half_id, "t", "m", rolls_back)
    assert half_table.outcome(half_id) is None
    with half_table.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(effects)).scalar() == 0


def test_an_error_the_callable_caught_is_a_lost_transaction(half_table: HalfMessageTable) -> None:
    """PostgreSQL aborts a transaction at its first error, and COMMIT then rolls it back without
    raising: a callable that caught the error must not get a committed half message."""
    if half_table.dialect != "postgresql":
        pytest.skip("only PostgreSQL aborts the whole transaction at an error")
    half_id = uuid7()

    def swallows(conn: sa.Connection) -> None:
        with suppress(sa.exc.DBAPIError):
            conn.exec_driver_sql("SELECT 1 / 0")

    with pytest.raises(TransactionLostError, match="PostgreSQL aborted it"):
        half_table.run(half_id, "t", "m", swallows)
    assert half_table.outcome(half_id) is None


def test_a_check_back_during_the_local_transaction_is_unknown_not_rollback(half_table: HalfMessageTable) -> None:
    """The row is written first, so the fence waits on its lock; past lock_timeout_s: UNKNOWN,
    and the transaction still commits."""
    half_id = uuid7()
    inside, release = threading.Event(), threading.Event()
    outcome: list[Any] = []

    def slow(conn: sa.Connection) -> str:
        inside.set()
        assert release.wait(60)
        return "done"

    worker = threading.Thread(target=lambda: outcome.append(half_table.run(half_id, "t", "m", slow)))
    worker.start()
    try:
        assert inside.wait(30)
        assert half_table.resolve(half_id) is Resolution.UNKNOWN
    finally:
        release.set()
        worker.join(60)
    assert outcome == ["done"]
    assert half_table.resolve(half_id) is Resolution.COMMIT


def test_a_fence_leaves_the_connection_s_lock_wait_as_it_was(half_table: HalfMessageTable) -> None:
    if half_table.dialect == "postgresql":
        pytest.skip("PostgreSQL sets it per transaction (SET LOCAL)")
    query = "PRAGMA busy_timeout" if half_table.dialect == "sqlite" else "SELECT @@SESSION.innodb_lock_wait_timeout"
    with half_table.engine.connect() as conn:
        before = conn.exec_driver_sql(query).scalar()
    half_table.resolve(uuid7())
    with half_table.engine.connect() as conn:  # the pool's one idle connection: the fence's
        assert conn.exec_driver_sql(query).scalar() == before


def test_past_the_retention_horizon_no_row_is_unknown_and_purge_keeps_the_young(half_table: HalfMessageTable) -> None:
    old, young = uuid7(), None
    half_table.run(old, "t", "m", lambda conn: None)
    later = HalfMessageTable(
        half_table.engine,
        table=half_table.table.name,
        retention=timedelta(days=1),
        clock=lambda: time.time() + 2 * 86400,
    )
    missing = uuid7()  # its row would have been purged by now, as far as `later` knows
    assert later.resolve(missing) is Resolution.UNKNOWN
    assert later.outcome(missing) is None  # not fenced
    assert later.resolve(old) is Resolution.COMMIT  # a row still there answers
    young = uuid7()
    half_table.run(young, "t", "m", lambda conn: None)
    assert half_table.purge() == 0  # retention 7 days: both are young
    assert later.purge() == 2  # two days later, with one day's retention
    assert half_table.outcome(old) is None and half_table.outcome(young) is None


def test_bad_settings_are_config_errors(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    with pytest.raises(ConfigError, match="too short"):
        HalfMessageTable(url, retention=timedelta(minutes=5))
    with pytest.raises(ConfigError, match="invalid half-message table name"):
        HalfMessageTable(url, table="no such")
    table = HalfMessageTable(url)
    with pytest.raises(ConfigError, match=r"not a RocketMQ URL.*write rocketmq://"):
        HalfMessageProducer("amqp://127.0.0.1:5672", ["t"], table)
    with pytest.raises(ConfigError, match="name the topics"):
        HalfMessageProducer("rocketmq://127.0.0.1:1", [], table)
    with pytest.raises(ConfigError, match="not started"):
        HalfMessageProducer("rocketmq://127.0.0.1:1", ["t"], table).send("t", b"x", lambda conn: None)
    assert HalfMessageTable(url).resolve("not-a-zeroloss-id") is Resolution.UNKNOWN


def test_a_check_back_that_cannot_be_answered_is_unknown(tmp_path: Path) -> None:
    """No zeroloss id, a check that raises or answers something else: UNKNOWN (asked again),
    never ROLLBACK."""
    from rocketmq import Message

    def message(**props: str) -> Any:
        m = Message()
        m.topic, m.body = "t", b"x"
        for k, v in props.items():
            m.add_property(k, v)
        return m

    def raises(back: CheckBack) -> Resolution:
        raise ConnectionError("database down")

    url = "rocketmq://127.0.0.1:1"
    table = HalfMessageTable(f"sqlite:///{tmp_path / 'x.db'}")
    assert HalfMessageProducer(url, ["t"], table).resolve(message()) is Resolution.UNKNOWN
    assert HalfMessageProducer(url, ["t"], raises).resolve(message(**{ID_HEADER: uuid7()})) is Resolution.UNKNOWN
    wrong = HalfMessageProducer(url, ["t"], lambda back: "rollback")  # type: ignore[arg-type,return-value]
    assert wrong.resolve(message(**{ID_HEADER: uuid7()})) is Resolution.UNKNOWN
    seen: list[CheckBack] = []
    asks = HalfMessageProducer(url, ["t"], lambda back: seen.append(back) or Resolution.COMMIT)  # type: ignore[func-returns-value]
    half_id = uuid7()
    assert (
        asks.resolve(message(**{ID_HEADER: half_id, "kind": "order", "TRANSACTION_CHECK_TIMES": "3"}))
        is Resolution.COMMIT
    )
    assert seen == [
        CheckBack(
            id=half_id,
            topic="t",
            key=None,
            value=b"x",
            headers={"kind": "order"},
            message_id=None,  # type: ignore[arg-type]
            check_times=3,
        )
    ]
    table.close()


# -- on the RocketMQ server ----------------------------------------------------------------------------


@pytest.fixture
def server(rocketmq: RocketMQServer) -> RocketMQServer:
    config = rocketmq.broker_config()
    stale = {k: v for k, v in FAST_CHECKS.items() if int(config[k]) > v}
    if stale:
        body = "".join(f"{k}={v}\n" for k, v in stale.items()).encode()
        header, _ = rocketmq.remoting(rocketmq.broker_port, RequestCode.UPDATE_BROKER_CONFIG, body=body)
        assert header.get("code") == 0, header
    return rocketmq


@pytest.fixture
def pg_table() -> Iterator[HalfMessageTable]:
    require_service("postgres")
    table = HalfMessageTable(PG_URL, table=_name("half"))
    table.create_schema()
    try:
        yield table
    finally:
        table.drop_schema()
        table.close()


@contextmanager
def _consumer(server: RocketMQServer, topic: str) -> Iterator[Any]:
    from rocketmq import FilterExpression, SimpleConsumer

    group = _name("g").replace("_", "-")
    server.create_group(group)
    c = SimpleConsumer(server.client_config(), group, {topic: FilterExpression()}, await_duration=1)
    c.startup()
    try:
        yield c
    finally:
        c.shutdown()


def _transaction_topic(server: RocketMQServer) -> str:
    # One queue: messages come out in the order the broker put them, so "the later message came
    # and nothing before it" means the earlier one was never put.
    topic = _name("half").replace("_", "-")
    server.create_topic(topic, "TRANSACTION", queues=1)
    return topic


def _receive_until(consumer: Any, done: Callable[[list[Any]], bool], timeout: float = WAIT) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while not done(got) and time.monotonic() < deadline:
        for m in receive(consumer, 32, 15):
            got.append(m)
            consumer.ack(m)
    return got


def _ids(messages: list[Any]) -> list[str]:
    return [m.properties.get(ID_HEADER) for m in messages]


def _wait_for(what: str, check: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.rocketmq
@pytest.mark.postgres
@pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning")
class TestOnTheBroker:
    def test_commit_path_delivers_after_the_local_commit(
        self, server: RocketMQServer, pg_table: HalfMessageTable
    ) -> None:
        topic = _transaction_topic(server)
        effects = _effects(pg_table.engine)
        with HalfMessageProducer(server.url, [topic], pg_table) as producer, _consumer(server, topic) as consumer:
            sent = producer.send(
                topic,
                b"order-1",
                lambda conn: conn.execute(effects.insert().values(note="o1")) and 1,
                key="order-1",
                headers={"kind": "order"},
            )
            assert sent.settled and sent.result == 1
            got = _receive_until(consumer, lambda got: bool(got))
        assert _ids(got) == [sent.id]
        assert got[0].body == b"order-1" and got[0].keys == {"order-1"} and got[0].properties["kind"] == "order"
        assert got[0].message_id == sent.message_id
        assert pg_table.outcome(sent.id) == "committed"

    def test_a_rolled_back_local_transaction_never_reaches_a_consumer(
        self, server: RocketMQServer, pg_table: HalfMessageTable
    ) -> None:
        topic = _transaction_topic(server)
        effects = _effects(pg_table.engine)

        def fails(conn: sa.Connection) -> None:
            conn.execute(effects.insert().values(note="doomed"))
            raise ValueError("out of stock")

        # A deferred constraint fails at COMMIT itself: zeroloss cannot tell from the error whether
        # the commit happened, asks the fence (ROLLBACK: it did not), and rolls the message back.
        deferred = _name("deferred")
        with pg_table.engine.begin() as conn:
            conn.exec_driver_sql(
                f"CREATE TABLE {deferred} (n int, CONSTRAINT {deferred}_u UNIQUE (n) DEFERRABLE INITIALLY DEFERRED)"
            )
        _made.append((sa.Table(deferred, sa.MetaData()), pg_table.engine))

        def fails_at_commit(conn: sa.Connection) -> None:
            conn.exec_driver_sql(f"INSERT INTO {deferred} VALUES (1), (1)")

        with HalfMessageProducer(server.url, [topic], pg_table) as producer, _consumer(server, topic) as consumer:
            with pytest.raises(ValueError, match="out of stock"):
                producer.send(topic, b"doomed", fails)
            with pytest.raises(StoreError, match="did not commit"):
                producer.send(topic, b"doomed at commit", fails_at_commit)
            later = producer.send(topic, b"later", lambda conn: None)
            got = _receive_until(consumer, lambda got: later.id in _ids(got))
            got += _receive_until(consumer, lambda _: False, timeout=1)  # a copy behind it
        assert _ids(got) == [later.id]
        with pg_table.engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(effects)).scalar() == 0

    def test_a_check_back_during_a_long_local_transaction_does_not_roll_it_back(
        self, server: RocketMQServer, pg_table: HalfMessageTable
    ) -> None:
        """The local transaction outlives transactionTimeOut: the broker asks while it runs, the
        fence waits on the row's lock and answers UNKNOWN; the transaction commits, and so does
        the message. (In make chaos only, to keep make test's budget: the same fence runs in make
        test on all three databases, test_a_check_back_during_the_local_transaction_...)"""
        only_in_the_full_crash_matrix("a check-back during a long local transaction, on the broker")
        topic = _transaction_topic(server)
        answers: list[Resolution] = []
        resolve = pg_table.resolve

        def recorded(half_id: str, topic: str = "") -> Resolution:
            answer = resolve(half_id, topic)
            answers.append(answer)
            return answer

        pg_table.resolve = recorded  # type: ignore[method-assign]
        pg_table.lock_timeout_s = 1.0
        with HalfMessageProducer(server.url, [topic], pg_table) as producer, _consumer(server, topic) as consumer:

            def waits_for_a_check_back(conn: sa.Connection) -> None:
                _wait_for("a check-back while the local transaction runs", lambda: bool(answers))

            sent = producer.send(topic, b"slow", waits_for_a_check_back)
            got = _receive_until(consumer, lambda got: bool(got))
        assert answers[0] is Resolution.UNKNOWN
        assert Resolution.ROLLBACK not in answers
        assert sent.settled and _ids(got) == [sent.id]

    def test_callback_mode_commits_rolls_back_and_waits_out_unknown(self, server: RocketMQServer) -> None:
        """With the caller's own check: a raising local transaction is rolled back only when the
        check says ROLLBACK; UNKNOWN leaves the half message to the check-back, which the broker
        repeats until the check knows."""
        topic = _transaction_topic(server)
        committed: set[str] = set()
        doomed: set[str] = set()
        asked: list[CheckBack] = []

        def check(back: CheckBack) -> Resolution:
            asked.append(back)
            if back.id in committed:
                return Resolution.COMMIT
            return Resolution.ROLLBACK if back.id in doomed else Resolution.UNKNOWN

        def commits(half_id: str) -> str:
            committed.add(half_id)
            return half_id

        def rolled_back(half_id: str) -> None:
            doomed.add(half_id)
            raise ValueError("rolled back")

        def unclear(half_id: str) -> None:
            raise TimeoutError("the answer to COMMIT was lost")

        with HalfMessageProducer(server.url, [topic], check) as producer, _consumer(server, topic) as consumer:
            first = producer.send(topic, b"first", commits, key="k")
            assert first.result == first.id and first.settled
            with pytest.raises(ValueError):  # the check says ROLLBACK: rolled back at once
                producer.send(topic, b"never", rolled_back)
            with pytest.raises(TimeoutError):  # the check says UNKNOWN: left to the broker's check-back
                producer.send(topic, b"late", unclear)
            late_id = asked[-1].id
            _wait_for("the broker's check-back of the unknown one", lambda: sum(b.id == late_id for b in asked) >= 2)
            back = [b for b in asked if b.id == late_id][-1]
            assert back.value == b"late" and back.topic == topic and back.check_times >= 1
            committed.add(late_id)  # the check learns that it committed after all: the next check-back commits
            got = _receive_until(consumer, lambda got: late_id in _ids(got))
            got += _receive_until(consumer, lambda _: False, timeout=1)
        # At least once: a copy is allowed (a commit that reaches a loaded broker after its
        # check-back timeout is put twice, once by the check-back's COMMIT; a lost ack redelivers);
        # the consumer's inbox absorbs it by the zeroloss-id. Lost or reordered is not.
        assert list(dict.fromkeys(_ids(got))) == [first.id, late_id]
        assert got[0].keys == {"k"}

    def test_sending_to_a_topic_that_is_not_transactional_is_a_config_error(
        self, server: RocketMQServer, pg_table: HalfMessageTable
    ) -> None:
        topic = _name("normal").replace("_", "-")
        server.create_topic(topic, "NORMAL")
        ran: list[bool] = []
        with HalfMessageProducer(server.url, [topic], pg_table) as producer:
            with pytest.raises(ConfigError, match="not a TRANSACTION topic"):
                producer.send(topic, b"x", lambda conn: ran.append(True))
            with pytest.raises(MessageError, match="reserved"):
                producer.send(topic, b"x", lambda conn: ran.append(True), headers={ID_HEADER: "mine"})
        assert ran == []

    def test_an_unreachable_broker_is_a_broker_error_before_anything_runs(self, pg_table: HalfMessageTable) -> None:
        ran: list[bool] = []
        # The client's startup does not fail without a broker (it logs and retries routes); the send does.
        with (
            HalfMessageProducer("rocketmq://127.0.0.1:1", ["t"], pg_table, request_timeout=2) as producer,
            pytest.raises(BrokerError, match="not sent"),
        ):
            producer.send("t", b"x", lambda conn: ran.append(True))
        with (
            HalfMessageProducer("rocketmq://127.0.0.1:1", ["t"], pg_table) as producer,
            pytest.raises(MessageError, match="non-empty"),
        ):
            producer.send("t", b"", lambda conn: ran.append(True))
        assert ran == []


# -- producer processes SIGKILLed between the two commits -------------------------------------------


def _child(
    mode: str,
    server: RocketMQServer,
    topic: str,
    table: HalfMessageTable,
    effects: sa.Table,
    stderr: Any = subprocess.PIPE,
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(CHILD), mode, server.url, topic, PG_URL, table.table.name, effects.name],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        cwd=REPO,
    )


def _crash(mode: str, server: RocketMQServer, topic: str, table: HalfMessageTable, effects: sa.Table) -> str:
    proc = _child(mode, server, topic, table, effects)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -9, f"exit {proc.returncode}\n{out}\n{err[-3000:]}"
    return out.split()[1]  # "id <zeroloss id>"


@contextmanager
def _checker(server: RocketMQServer, topic: str, table: HalfMessageTable, effects: sa.Table) -> Iterator[None]:
    """A new producer process for the topic, answering check-backs from the table."""
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a chatty child never blocks on it
        proc = _child("checker", server, topic, table, effects, stderr=log)
        try:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                log.seek(0)
                raise AssertionError(f"the checker did not start:\n{log.read()[-3000:]}")
            yield
        finally:
            proc.terminate()
            proc.communicate(timeout=60)


@pytest.mark.rocketmq
@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning")
class TestCrash:
    def test_killed_after_the_local_commit_the_check_back_delivers_it(
        self, server: RocketMQServer, pg_table: HalfMessageTable
    ) -> None:
        topic = _transaction_topic(server)
        effects = _effects(pg_table.engine)
        half_id = _crash("after-local-commit", server, topic, pg_table, effects)
        assert pg_table.outcome(half_id) == "committed"
        with _consumer(server, topic) as consumer:
            assert receive(consumer, 32, 15) == []  # a half message: invisible until the check-back
            with _checker(server, topic, pg_table, effects):
                got = _receive_until(consumer, lambda got: bool(got))
                got += _receive_until(consumer, lambda _: False, timeout=1)
        assert _ids(got) == [half_id] and got[0].body == b"crash"
        with pg_table.engine.connect() as conn:
            assert [r.note for r in conn.execute(sa.select(effects))] == ["after-local-commit"]

    def test_killed_before_the_local_commit_the_check_back_drops_it(
        self, server: RocketMQServer, pg_table: HalfMessageTable
    ) -> None:
        topic = _transaction_topic(server)
        effects = _effects(pg_table.engine)
        half_id = _crash("before-local-commit", server, topic, pg_table, effects)
        with _checker(server, topic, pg_table, effects):
            _wait_for("the check-back's fence", lambda: pg_table.outcome(half_id) == "rolled_back")
        with HalfMessageProducer(server.url, [topic], pg_table) as producer, _consumer(server, topic) as consumer:
            later = producer.send(topic, b"later", lambda conn: None)
            got = _receive_until(consumer, lambda got: later.id in _ids(got))
            got += _receive_until(consumer, lambda _: False, timeout=1)
        assert _ids(got) == [later.id]
        with pg_table.engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(effects)).scalar() == 0
