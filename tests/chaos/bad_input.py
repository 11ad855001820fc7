"""Bad input at the public entry points: each case must end in a clear error (a zeroloss error
naming the problem; for the command, one ``error:`` line and exit 2 for bad usage or 1 for a
problem found), within a bounded time, with nothing stored half-way and nothing retried forever
— while good messages sent alongside all arrive."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tests.chaos.pipeline import PG, Ledger, Size, broker_ledger, zeroloss_cli
from zeroloss.embedded_broker import EmbeddedBroker, free_port
from zeroloss.errors import ConfigError, MessageError, StoreError, ZerolossError
from zeroloss.outbox.base import State
from zeroloss.outbox.spool import FileSpool
from zeroloss.outbox.sql import SqlOutbox

# (what, add() keyword arguments, words the error must contain)
BAD_MESSAGES: list[tuple[str, dict[str, Any], str]] = [
    ("value over max_message_bytes", {"topic": "t", "value": b"x" * 1_000_001}, "exceeds the limit"),
    ("topic with a slash", {"topic": "orders/eu", "value": b"v"}, "invalid topic name"),
    ("empty topic", {"topic": "", "value": b"v"}, "invalid topic name"),
    ("topic of 250 characters", {"topic": "t" * 250, "value": b"v"}, "invalid topic name"),
    ("topic '..'", {"topic": "..", "value": b"v"}, "invalid topic name"),
    ("topic not a str", {"topic": 7, "value": b"v"}, "topic must be a str"),
    ("value not JSON-able", {"topic": "t", "value": object()}, "cannot be sent as JSON"),
    ("NaN in a JSON value", {"topic": "t", "value": {"a": float("nan")}}, "cannot be sent as JSON"),
    ("None value", {"topic": "t", "value": None}, "value is None"),
    ("int key", {"topic": "t", "value": b"v", "key": 7}, "key must be bytes or str"),
    ("reserved header zeroloss-id", {"topic": "t", "value": b"v", "headers": {"zeroloss-id": b"x"}}, "reserved"),
    ("str header value", {"topic": "t", "value": b"v", "headers": {"h": "s"}}, "must be bytes"),
]


@dataclass
class Case:
    name: str
    ok: bool
    detail: str = ""


def _expect_error(
    name: str,
    call: Callable[[], object],
    kind: type[ZerolossError],
    words: str,
    nothing_stored: Callable[[], bool] = lambda: True,
) -> Case:
    try:
        call()
    except kind as exc:
        if words not in str(exc):
            return Case(name, False, f"{type(exc).__name__} does not say {words!r}: {exc}")
        if exc.retriable:
            return Case(name, False, f"{type(exc).__name__} claims to be retriable: {exc}")
        if not nothing_stored():
            return Case(name, False, "something was stored")
        return Case(name, True)
    except Exception as exc:
        return Case(name, False, f"{type(exc).__name__} instead of {kind.__name__}: {exc}")
    return Case(name, False, "accepted")


def _library_messages(work: Path) -> list[Case]:
    """Every bad message through the SQL outbox and the spool, inside the app's transaction."""
    cases = []
    url = f"sqlite:///{work / 'app.db'}"
    outbox = SqlOutbox(url)
    outbox.create_schema()
    orders = sa.Table("orders", sa.MetaData(), sa.Column("n", sa.Integer, primary_key=True))
    orders.create(outbox.engine)
    spool = FileSpool(work / "spool")
    app = sqlite3.connect(work / "spool-app.db", isolation_level=None)
    app.execute("create table orders (n integer primary key)")

    def sql_clean() -> bool:
        with outbox.engine.connect() as conn:
            rows = conn.execute(sa.select(sa.func.count()).select_from(orders)).scalar_one()
        return rows == 0 and not any(outbox.stats().counts.values())

    def spool_clean() -> bool:
        rows = app.execute("select count(*) from orders").fetchone()[0]
        return rows == 0 and not any(os.listdir(Path(spool.root) / s.value) for s in State)

    def via_sql(kw: dict[str, Any]) -> None:
        with outbox.engine.begin() as conn:
            conn.execute(orders.insert(), {"n": 1})
            outbox.add(conn, **kw)

    def via_spool(kw: dict[str, Any]) -> None:
        with spool.transaction() as tx:
            app.execute("begin")
            try:
                app.execute("insert into orders values (1)")
                tx.add(**kw)
            except BaseException:
                app.execute("rollback")
                raise
            app.execute("commit")

    def many_with_one_bad() -> None:
        with outbox.engine.begin() as conn:
            outbox.add_many(
                conn, [{"topic": "t", "value": b"%d" % i} for i in range(9)] + [{"topic": "t", "value": object()}]
            )

    try:
        for what, kw, words in BAD_MESSAGES:
            cases.append(_expect_error(f"SqlOutbox.add: {what}", partial(via_sql, kw), MessageError, words, sql_clean))
            cases.append(
                _expect_error(f"FileSpool add: {what}", partial(via_spool, kw), MessageError, words, spool_clean)
            )
        cases.append(
            _expect_error(
                "SqlOutbox.add_many: one bad among ten",
                many_with_one_bad,
                MessageError,
                "cannot be sent as JSON",
                sql_clean,
            )
        )
        cases.append(
            _expect_error(
                "FileSpool.transaction('a.b')", lambda: spool.transaction("a.b"), StoreError, "transaction id"
            )
        )
    finally:
        spool.close()
        app.close()
        outbox.close()
    return cases


def _library_urls(broker: EmbeddedBroker) -> list[Case]:
    from zeroloss.consumer import Consumer
    from zeroloss.registry import open_broker, open_store

    return [
        _expect_error(
            "open_store('mongodb://…')",
            lambda: open_store("mongodb://h/db"),
            ConfigError,
            "unknown source scheme 'mongodb'",
        ),
        _expect_error(
            "open_broker('mqtt://…')", lambda: open_broker("mqtt://h:1883"), ConfigError, "unknown target scheme 'mqtt'"
        ),
        _expect_error(
            "Consumer('ftp://…')", lambda: Consumer("ftp://h/x", "g", ["t"], None), ConfigError, "cannot consume from"
        ),
        _expect_error(
            "Consumer(topics=[])", lambda: Consumer(broker.url, "g", [], None), ConfigError, "at least one topic"
        ),
        _expect_error("Consumer(group='')", lambda: Consumer(broker.url, "", ["t"], None), ConfigError, "group name"),
        _expect_error(
            "SqlOutbox in a missing directory",
            lambda: SqlOutbox("sqlite:////nonexistent/x.db").create_schema(),
            StoreError,
            "check that its directory exists",
        ),
    ]


def _cli_case(name: str, args: list[str], code: int, words: str, max_s: float = 45) -> Case:
    start = time.monotonic()
    try:
        got, out, err = zeroloss_cli(*args, timeout_s=max_s)
    except subprocess.TimeoutExpired:
        return Case(name, False, f"still running after {max_s:.0f}s")
    took = time.monotonic() - start
    text = out + err
    if got != code or words not in text or "Traceback" in text:
        return Case(name, False, f"exit {got} (wanted {code}) in {took:.0f}s: {text.strip()[-300:]}")
    return Case(name, True, f"{took:.1f}s")


def _cli_urls(work: Path, broker: EmbeddedBroker) -> list[Case]:
    """Bad URLs and unreachable hosts on the command line, run side by side (each waits out its
    own timeout)."""
    src = f"sqlite:///{work / 'cli.db'}"
    assert zeroloss_cli("init", "--source", src)[0] == 0
    nobody = f"kafka://127.0.0.1:{free_port()}"
    pg_down = PG.replace("127.0.0.1:5432", "127.0.0.1:1")
    runs = [
        ("status: unknown scheme ftp://", ["status", "--source", "ftp://h/x"], 2, "unknown source scheme 'ftp'"),
        (
            "relay: unknown target scheme",
            ["relay", "--source", src, "--target", "amqp2://h"],
            2,
            "unknown target scheme 'amqp2'",
        ),
        ("relay: source is not a URL", ["relay", "--source", "outbox.db", "--target", broker.url], 2, "is not a URL"),
        (
            "relay: kafka URL without a port",
            ["relay", "--source", src, "--target", "kafka://nohostport"],
            2,
            "is not HOST:PORT",
        ),
        (
            "audit: target not kafka",
            ["audit", "--source", src, "--target", "mqtt://h:1883"],
            2,
            "Kafka and RocketMQ only",
        ),
        ("doctor: unknown target scheme", ["doctor", "--target", "mqtt://h:1883"], 2, "not 'mqtt'"),
        ("status: database unreachable", ["status", "--source", pg_down], 2, "cannot read the outbox"),
        (
            "audit: broker unreachable",
            ["audit", "--source", src, "--target", nobody, "--timeout-s", "2"],
            1,
            "cannot read the broker's metadata",
        ),
        (
            "doctor: broker host does not resolve",
            ["doctor", "--target", "kafka://no-such-host.invalid:9092", "--timeout-s", "2"],
            1,
            "fail  broker reachable",
        ),
        (
            "dlq list: broker unreachable",
            ["dlq", "list", "--target", nobody, "--topic", "orders"],
            1,
            "cannot read the broker's metadata",
        ),
    ]
    with ThreadPoolExecutor(len(runs)) as pool:
        return list(pool.map(lambda r: _cli_case(*r), runs))


def _relay_cases(
    work: Path, broker: EmbeddedBroker, good: int
) -> tuple[list[Case], list[tuple[str, bytes | None]], str]:
    """A message too large for the broker among good ones; first a relay whose broker or database
    cannot be reached (it keeps trying without spending attempts, and stops on SIGTERM), then
    one that can: the big one fails after one attempt, the good ones arrive."""
    topic = f"chaos-input-{uuid.uuid4().hex[:10]}"
    src = f"sqlite:///{work / 'relay.db'}"
    outbox = SqlOutbox(src, max_message_bytes=4_000_000)  # over the Kafka client's 1 MB: only the broker refuses
    outbox.create_schema()
    with outbox.engine.begin() as conn:
        big = outbox.add(conn, topic=topic, value=b"x" * 2_000_000, key=b"big")
        ids = outbox.add_many(
            conn, [{"topic": topic, "value": b"%d" % i, "key": b"k%d" % (i % 17)} for i in range(good)]
        )
    committed: list[tuple[str, bytes | None]] = [(mid, b"k%d" % (i % 17)) for i, mid in enumerate(ids)]
    cases: list[Case] = []

    def relay_for(name: str, source: str, target: str, words: str) -> Case:
        log = work / f"relay-{len(cases)}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "zeroloss",
                    "relay",
                    "--source",
                    source,
                    "--target",
                    target,
                    "--timeout-s",
                    "2",
                    "--max-backoff-s",
                    "2",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        time.sleep(6)  # the fault's length: let it try a few times
        alive = proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return Case(name, False, "did not stop within 20s of SIGTERM")
        text = log.read_text(errors="replace")
        counts = outbox.stats().counts
        spent = sum(m.attempts for m in outbox.list(State.PENDING, limit=good + 1))
        if not alive or code != 0 or words not in text or "Traceback" in text:
            return Case(name, False, f"alive {alive}, exit {code}: {text.strip()[-300:]}")
        if counts[State.PENDING] != good + 1 or spent:
            return Case(name, False, f"outbox {counts}, {spent} attempts spent")
        return Case(name, True)

    try:
        cases.append(
            relay_for("relay: broker unreachable", src, f"kafka://127.0.0.1:{free_port()}", "broker unavailable")
        )
        cases.append(
            relay_for(
                "relay: database unreachable",
                PG.replace("127.0.0.1:5432", "127.0.0.1:1"),
                broker.url,
                "outbox store failed",
            )
        )
        code, _, _ = zeroloss_cli(
            "relay", "--source", src, "--target", broker.url, "--timeout-s", "5", "--drain", timeout_s=120
        )
        state, msg = outbox.get(big)
        counts = outbox.stats().counts
        ok = (
            code == 0
            and state is State.FAILED
            and msg.attempts == 1
            and "MSG_SIZE_TOO_LARGE" in (msg.last_error or "")
            and counts[State.SUCCESS] == good
        )
        cases.append(
            Case(
                "relay: 2 MB message over the broker's limit",
                ok,
                f"exit {code}, {state.value} after {msg.attempts} attempt(s): {msg.last_error}; {counts}",
            )
        )
        status, out, _ = zeroloss_cli("status", "--source", src)
        cases.append(
            Case(
                "status after it: critical, names the failed one", status == 2 and "1 failed" in out, out.strip()[-300:]
            )
        )
    finally:
        outbox.close()
    return cases, committed, topic


def bad_input(broker: EmbeddedBroker, work: Path, size: Size) -> Ledger:
    t = time.monotonic()
    good = min(size.messages, 2000)
    with ThreadPoolExecutor(1) as pool:  # the command-line cases mostly wait: run them meanwhile
        cli = pool.submit(_cli_urls, work, broker)
        cases = _library_messages(work) + _library_urls(broker)
        relay_cases, committed, topic = _relay_cases(work, broker, good)
        cases += relay_cases + cli.result()
    took = time.monotonic() - t
    bad = [c for c in cases if not c.ok]
    lib = sum(1 for c in cases if c.name.startswith(("SqlOutbox", "FileSpool")))
    notes = (
        f"{len(cases) - len(bad)} of {len(cases)} cases behaved: {lib} bad messages refused by the outbox "
        f"and the spool (MessageError naming the problem, the app's transaction rolled back, nothing stored); "
        f"bad URLs and unreachable hosts on the command line and in the library: one clear error, exit 2 "
        f"(usage) or 1 (problem), within seconds; relay with its broker or database unreachable: keeps "
        f"trying without spending attempts, stops on SIGTERM; a 2 MB message over the broker's limit: "
        f"failed after 1 attempt, status critical, the {good} others delivered; all cases took {took:.0f}s"
    )
    problems = [f"{c.name}: {c.detail}" for c in bad]
    return broker_ledger(
        "bad input at public entry points", broker.url, topic, committed, len(cases), None, notes, problems
    )
