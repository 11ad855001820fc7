"""What the relay and the consumer say: a start line (passwords masked), progress lines, one
outage line and a "back" line, a summary at stop, no WARNING on a normal shutdown; log lines with
time and level; SQL errors as their first line, not SQLAlchemy's ``[SQL: …]`` block."""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from tests.conftest import REDIS_URL, require_service, unique_topic
from zeroloss import Consumer, Received, SqlInbox, SqlOutbox
from zeroloss.cli import main
from zeroloss.embedded_broker import free_port, port_open
from zeroloss.logs import brief

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) zeroloss[.\w]*: ")


def wait_until(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _outbox(tmp_path: Path, topic: str, n: int) -> str:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    outbox = SqlOutbox(url)
    outbox.create_schema()
    with outbox.engine.begin() as conn:
        for i in range(n):
            outbox.add(conn, topic=topic, key=b"k%d" % (i % 3), value=b"v%d" % i)
    outbox.close()
    return url


def test_the_relay_says_where_it_sends_how_it_goes_outages_and_a_summary(tmp_path: Path) -> None:
    """Default verbosity: the start line names source and target (password masked) and settings;
    progress lines count what was delivered; a broker that goes away is one WARNING and its
    return one INFO line; SIGTERM ends with a summary and no WARNING."""
    require_service("redis")
    topic = unique_topic("says")
    source = _outbox(tmp_path, topic, 50)
    port = free_port()
    log = tmp_path / "relay.log"
    redis: subprocess.Popen[bytes] | None = None
    with open(log, "ab") as out:
        relay = subprocess.Popen(
            [sys.executable, "-m", "zeroloss", "relay", "--source", source,
             "--target", f"redis://:s3cret@127.0.0.1:{port}/0", "--progress-s", "0.3", "--timeout-s", "1",
             "--lease-s", "5", "--max-backoff-s", "0.5"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(lambda: "broker unavailable" in log.read_text(), 60, "the outage line")
        redis = subprocess.Popen(
            ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--requirepass", "s3cret"],
            stdout=subprocess.DEVNULL,
        )
        wait_until(lambda: port_open(port), 30, "redis-server")
        wait_until(lambda: "broker is back after" in log.read_text(), 60, "the recovery line")
        wait_until(lambda: "relay progress: 50 delivered" in log.read_text(), 60, "a progress line with all 50")
        before_stop = len(log.read_text().splitlines())
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(30) == 0
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait()
        if redis is not None:
            redis.terminate()
            redis.wait(30)
    lines = log.read_text().splitlines()
    assert all(LINE.match(line) for line in lines), lines  # time, level and logger on every line
    assert not [line for line in lines if " DEBUG " in line], lines  # -v shows those
    start = next(line for line in lines if "relay started:" in line)
    assert "INFO" in start and source in start and f"redis://:***@127.0.0.1:{port}/0" in start, start
    assert "s3cret" not in log.read_text()
    assert "batch 500" in start and "max attempts 10" in start and "progress every 0.3s" in start
    outage = [line for line in lines if "broker unavailable" in line]
    assert len(outage) == 1 and " WARNING " in outage[0], outage  # the tries after the first are DEBUG
    assert any(" INFO " in line and "broker is back after" in line for line in lines)
    assert any("relay progress:" in line and "backlog" in line and "oldest pending" in line for line in lines)
    shutdown = lines[before_stop:]
    assert not [line for line in shutdown if " WARNING " in line or " ERROR " in line], shutdown
    summary = [line for line in shutdown if "relay stopped after" in line]
    assert len(summary) == 1 and " INFO " in summary[0] and "50 delivered, 0 failed" in summary[0], shutdown


@pytest.fixture
def _log_levels_restored() -> Iterator[None]:
    """The command sets the levels of the ``zeroloss`` and root loggers, which outlive an
    in-process CliRunner call: put them back for the tests after this one."""
    ours, root = logging.getLogger("zeroloss"), logging.getLogger()
    levels, handlers = (ours.level, root.level), list(root.handlers)
    yield
    ours.setLevel(levels[0])
    root.setLevel(levels[1])
    for h in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(h)


@pytest.mark.usefixtures("_log_levels_restored")
def test_quiet_and_verbose_set_what_the_relay_says(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """-q leaves warnings and errors only; -v adds zeroloss's DEBUG lines (the default, INFO, is
    the test above). In process, the command leaves the logging the test runner set up alone and
    sets only the ``zeroloss`` logger's level, so its records reach ``caplog``."""
    require_service("redis")
    topic = unique_topic("quiet")
    source = _outbox(tmp_path, topic, 3)
    said = {}
    for flag in ("-v", "-q"):  # -v first: it has the messages to send
        caplog.clear()
        out = CliRunner().invoke(main, [flag, "relay", "--source", source, "--target", REDIS_URL, "--drain"])
        assert out.exit_code == 0, out.output
        said[flag] = [(r.levelno, r.getMessage()) for r in caplog.records if r.name.startswith("zeroloss")]
    assert any(level == logging.DEBUG and text.startswith("published a batch of 3") for level, text in said["-v"])
    assert any(level == logging.INFO and text.startswith("relay started") for level, text in said["-v"])
    assert said["-q"] == [], said["-q"]


def test_the_consumer_says_what_it_does_and_logs_a_sql_error_as_its_first_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler whose statement the database refuses for this message (a NOT NULL column left
    empty): the retry and dead-letter lines carry the driver's one line, not the statement; start,
    progress and summary lines at INFO. (A missing table is an outage, not the message's fault:
    test_consumer's test_a_missing_table_in_the_handler_holds_the_messages_until_it_exists.)"""
    require_service("redis")
    topic = unique_topic("consumer-says")
    source = _outbox(tmp_path, topic, 4)
    from zeroloss.registry import open_broker, open_store

    store, broker = open_store(source), open_broker(REDIS_URL)
    from zeroloss.relay import Relay

    Relay(store, broker).drain(60)
    store.close()
    broker.close()
    inbox = SqlInbox(f"sqlite:///{tmp_path / 'inbox.db'}")
    inbox.create_schema()
    with inbox.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE bills (id TEXT PRIMARY KEY, total INTEGER NOT NULL)"))
    consumer = Consumer(
        REDIS_URL,
        group=unique_topic("g"),
        topics=[topic],
        inbox=inbox,
        max_attempts=2,
        backoff_base_s=0.01,
        max_backoff_s=0.02,
        progress_every_s=0.05,
        parked_dir=tmp_path / "parked",
    )

    @consumer.handler
    def handle(msg: Received, tx: Any) -> None:
        if msg.value == b"v0":
            tx.execute(sa.text("INSERT INTO bills (id, total) VALUES (:id, NULL)"), {"id": msg.id})

    with caplog.at_level(logging.INFO, logger="zeroloss"):
        consumer.run_until_idle(idle_s=0.5, timeout_s=60)
    consumer.close()
    text = caplog.text
    assert "[SQL:" not in text and "INSERT INTO bills" not in text, text
    failed = [r.getMessage() for r in caplog.records if "failed (attempt 1 of 2)" in r.getMessage()]
    assert failed and "IntegrityError: NOT NULL constraint failed: bills.total" in failed[0], failed
    assert any("dead-lettered" in r.getMessage() and "NOT NULL constraint" in r.getMessage() for r in caplog.records)
    started = [r for r in caplog.records if r.getMessage().startswith("consumer started:")]
    assert started and started[0].levelno == logging.INFO and topic in started[0].getMessage()
    assert any(" progress: " in r.getMessage() and "3 processed" in r.getMessage() for r in caplog.records), text
    stopped = [r.getMessage() for r in caplog.records if " stopped after " in r.getMessage()]
    assert stopped and "3 processed" in stopped[-1] and "1 dead-lettered" in stopped[-1], stopped


def test_logging_setup_gives_a_script_time_and_level_and_leaves_the_root_logger_alone() -> None:
    """A library must not configure the root logger: importing zeroloss and making its parts adds
    no handler; ``zeroloss.logging_setup()`` shows zeroloss's lines with time and level."""
    code = (
        "import logging, zeroloss\n"
        "from zeroloss.relay import Relay\n"
        "assert logging.getLogger().handlers == [], logging.getLogger().handlers\n"
        "logging.getLogger('zeroloss.relay').info('before setup: not shown')\n"
        "zeroloss.logging_setup()\n"
        "zeroloss.logging_setup()  # a second call replaces the first: one line each, not two\n"
        "assert logging.getLogger().handlers == []\n"
        "logging.getLogger('zeroloss.relay').info('relay started: shown')\n"
        "logging.getLogger('zeroloss.relay').debug('debug: not shown')\n"
        "logging.getLogger('other').warning('other library: its own business')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert len([line for line in lines if "relay started: shown" in line]) == 1, lines
    assert LINE.match(next(line for line in lines if "relay started" in line)), lines
    assert "not shown" not in out.stderr


def test_brief_keeps_the_reason_of_a_database_error_and_drops_the_statement(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(sa.exc.DBAPIError) as caught, engine.connect() as conn:
        conn.execute(sa.text("SELECT * FROM missing_table WHERE id = :id"), {"id": 7})
    assert "[SQL:" in str(caught.value)  # what SQLAlchemy would have logged
    assert brief(caught.value) == "OperationalError: no such table: missing_table"
    assert brief(ValueError("two\nlines")) == "ValueError: two | lines"
    engine.dispose()


def test_an_inbox_outage_is_one_error_line_and_its_end_one_info_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The inbox's database goes away under the consumer (its connections cut, new ones refused)
    and comes back: one ERROR, DEBUG while it lasts, one INFO when it is back; nothing lost."""
    require_service("redis")
    require_service("postgres")
    import threading

    from tests.conftest import PG_URL
    from tests.delay_proxy import delay_proxy
    from zeroloss.registry import open_broker, open_store
    from zeroloss.relay import Relay

    topic = unique_topic("inbox-outage")
    store, broker = open_store(_outbox(tmp_path, topic, 3)), open_broker(REDIS_URL)
    Relay(store, broker).drain(60)
    store.close()
    broker.close()
    pg_port = int(PG_URL.rsplit(":", 1)[1].split("/")[0])
    with delay_proxy(pg_port, 0.0) as proxy:
        table = unique_topic("inbox").replace("-", "_")
        inbox = SqlInbox(PG_URL.replace(f":{pg_port}/", f":{proxy.port}/"), table=table)
        inbox.create_schema()
        consumer = Consumer(
            REDIS_URL,
            group=unique_topic("g"),
            topics=[topic],
            inbox=inbox,
            backoff_base_s=0.05,
            max_backoff_s=0.2,
            parked_dir=tmp_path / "parked",
        )
        seen: list[str] = []

        @consumer.handler
        def handle(msg: Received, tx: Any) -> None:
            seen.append(msg.id)

        proxy.upstream = ("127.0.0.1", free_port())  # nothing listens there: the database is "down"
        proxy.cut()
        try:
            with caplog.at_level(logging.DEBUG, logger="zeroloss"):
                runner = threading.Thread(target=consumer.run_until_idle, kwargs={"idle_s": 0.5, "timeout_s": 120})
                runner.start()
                wait_until(lambda: "still fails" in caplog.text, 60, "a second failed try")
                proxy.upstream = ("127.0.0.1", pg_port)
                runner.join(120)
                assert not runner.is_alive()
        finally:
            consumer.stop()
            consumer.close()
            inbox.drop_schema()
            inbox.close()
    assert len(set(seen)) == 3
    # zeroloss's lines only: the test's delay proxy may log asyncio's own ERROR when cut() cancels its pumps
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("zeroloss")]
    assert len(errors) == 1 and "the inbox's store failed" in errors[0].getMessage(), [r.getMessage() for r in errors]
    back = [r for r in caplog.records if "the inbox is back after" in r.getMessage()]
    assert len(back) == 1 and back[0].levelno == logging.INFO


def _one_message_through(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, tries: list[Callable[[Any], None]]
) -> tuple[Consumer, list[logging.LogRecord]]:
    """One message relayed to Redis and consumed with a SQLite inbox; the handler's n-th try runs
    ``tries[n]`` on the inbox transaction. Returns the consumer and zeroloss's log records."""
    require_service("redis")
    from zeroloss.registry import open_broker, open_store
    from zeroloss.relay import Relay

    topic = unique_topic("corner")
    store, broker = open_store(_outbox(tmp_path, topic, 1)), open_broker(REDIS_URL)
    Relay(store, broker).drain(60)
    store.close()
    broker.close()
    inbox = SqlInbox(f"sqlite:///{tmp_path / 'inbox.db'}")
    inbox.create_schema()
    consumer = Consumer(
        REDIS_URL,
        group=unique_topic("g"),
        topics=[topic],
        inbox=inbox,
        max_attempts=3,
        backoff_base_s=0.01,
        max_backoff_s=0.02,
        transaction_batch=1,  # each try its own: a shared transaction's failure is a WARNING of its own
        parked_dir=tmp_path / "parked",
    )
    calls: list[int] = []

    @consumer.handler
    def handle(msg: Received, tx: Any) -> None:
        calls.append(1)
        tries[min(len(calls), len(tries)) - 1](tx)

    try:
        with caplog.at_level(logging.DEBUG, logger="zeroloss"):
            consumer.run_until_idle(idle_s=0.5, timeout_s=60)
    finally:
        consumer.close()
        inbox.close()
    assert len(calls) == len(tries), calls
    return consumer, [r for r in caplog.records if r.name.startswith("zeroloss")]


def _missing_table(tx: Any) -> None:
    tx.execute(sa.text("INSERT INTO bills (id) VALUES (1)"))  # no such table: the handler's database not set up


def test_an_outage_that_changes_kind_is_said_again_and_its_end_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The handler's table is missing (ERROR), then the connection under its transaction is lost
    (an outage of another kind: a second ERROR, not a DEBUG), then it works: one INFO line for
    the end, and no attempt was spent on the message."""

    def connection_lost(tx: Any) -> None:
        tx.connection.dbapi_connection.close()  # SQLite's "closed database": SQLAlchemy invalidates the connection
        tx.execute(sa.text("SELECT 1"))

    consumer, records = _one_message_through(tmp_path, caplog, [_missing_table, connection_lost, lambda tx: None])
    errors = [r.getMessage() for r in records if r.levelno >= logging.ERROR]
    assert len(errors) == 2, errors
    assert "not set up for it, no such table (OperationalError: no such table: bills)" in errors[0], errors
    assert "the inbox's store failed" in errors[1] and "closed database" in errors[1], errors
    back = [r for r in records if " after " in r.getMessage() and "back" in r.getMessage()]
    assert [r.levelno for r in back] == [logging.INFO], [r.getMessage() for r in back]
    assert "the inbox is back after" in back[0].getMessage()
    assert consumer.counters.processed == 1 and consumer.counters.retries == 0 and consumer.counters.store_errors == 2


def test_an_outage_ends_with_its_line_when_the_next_try_fails_by_the_handlers_own_fault(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A missing table (ERROR, no attempt spent), then the handler raises on its own: the database
    answered, so the outage's end is said (INFO) before the message's failed attempt (WARNING)."""

    def refuses(tx: Any) -> None:
        raise ValueError("order 1 has no customer")

    consumer, records = _one_message_through(tmp_path, caplog, [_missing_table, refuses, lambda tx: None])
    said = [(r.levelno, r.getMessage()) for r in records if r.levelno >= logging.INFO]
    errors = [text for level, text in said if level >= logging.ERROR]
    assert len(errors) == 1 and "not set up for it" in errors[0], errors
    back = next(i for i, (_, text) in enumerate(said) if "the handler's database is set up after" in text)
    failed = next(i for i, (_, text) in enumerate(said) if "failed (attempt 1 of 3)" in text)
    assert said[back][0] == logging.INFO and said[failed][0] == logging.WARNING and back < failed, said
    assert "ValueError: order 1 has no customer" in said[failed][1]
    assert consumer.counters.processed == 1 and consumer.counters.retries == 1
