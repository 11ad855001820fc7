"""The RocketMQ consumer beyond the shared contract: what a delivery carries, a slow handler keeping
its message (the invisible duration extended), the group's retry limit read from the proxy and
met by zeroloss's own dead letter first, clear errors for what is missing, and ``zeroloss dlq``
reading ``<topic>.dlq`` without consuming it."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from tests import rocketmq_plain
from tests.effects_db import Db, make_db
from tests.rocketmq_server import RocketMQServer, receive
from zeroloss.brokers.base import Status
from zeroloss.brokers.rocketmq_fields import rocketmq_topic
from zeroloss.brokers.rocketmq_reader import RocketMQReader
from zeroloss.brokers.rocketmq_subscription import RocketMQSubscription
from zeroloss.brokers.rocketmq_url import parse_url
from zeroloss.brokers.subscription import Subscription
from zeroloss.cli import main
from zeroloss.consumer import Consumer, Received
from zeroloss.consumer import dead_letters as dlq
from zeroloss.errors import BrokerError, ConfigError
from zeroloss.message import new_message
from zeroloss.registry import TARGET_SCHEMES, open_subscription

pytestmark = [
    pytest.mark.rocketmq,
    # rocketmq-python-client 5.1.2 calls the deprecated logger.warn in its own callback threads.
    pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning"),
]
rocketmq_client = pytest.importorskip("rocketmq", reason="rocketmq-python-client (zeroloss[rocketmq]) not installed")


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Db]:
    yield from make_db("sqlite", tmp_path)


def publish(server: RocketMQServer, msgs: list[Any], *, fifo: bool = True) -> None:
    p = rocketmq_plain.PlainProducer(server, fifo=fifo)
    try:
        assert {o.status for o in p.publish(msgs)} == {Status.DELIVERED}
    finally:
        p.close()


def fetch_all(sub: Subscription, want: int, timeout_s: float = 30.0) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        for d in sub.fetch(10, 1.0):
            got.append(d)
            sub.ack(d)
    return got


def test_names_and_urls() -> None:
    assert rocketmq_topic("orders") == "orders"
    assert rocketmq_topic("orders.dlq") == "orders_dlq"  # as the relay's publishing side names it
    assert parse_url("rocketmq://h:8081").namesrvs == (("h", 9876),)
    assert parse_url("rocketmq://h:8081?namesrv=n:19876").namesrvs == (("n", 19876),)
    for bad in ("rocketmq://h:x", "kafka://h:1", "rocketmq://h:1?namesrv=n:x"):
        with pytest.raises(ConfigError):
            parse_url(bad)
    with pytest.raises(ConfigError, match="10 s"):
        RocketMQSubscription("rocketmq://127.0.0.1:1", "g", ["t"], invisible_s=5)


def test_a_delivery_carries_id_key_value_headers_and_the_groups_limit(rocketmq: RocketMQServer) -> None:
    topic = rocketmq_plain.unique("fields")
    group = rocketmq_plain.prepare(rocketmq, topic, retry_max_times=7)
    headers = (("bin", b"\x00\xff"), ("txt", "grüße".encode()), ("sp", b" x "))
    msgs = [new_message(topic, b"\x00value", key=b"\xffkey", headers=headers), new_message(topic, b"v", key=None)]
    publish(rocketmq, msgs)
    sub = open_subscription(rocketmq_plain.url(rocketmq), group, [topic], invisible_s=10)
    try:
        assert isinstance(sub, Subscription)
        assert sub.max_deliveries == 8  # retryMaxTimes + 1, as the proxy tells the client
        by_id = {d.received.id: d for d in fetch_all(sub, len(msgs))}
    finally:
        sub.close()
    assert set(by_id) == {m.id for m in msgs}
    for m in msgs:
        d = by_id[m.id]
        assert d.poison is None and d.delivered == 1
        assert (d.received.topic, d.received.key, d.received.value) == (m.topic, m.key, m.value)
        # sorted by name: user properties are a map; RocketMQ's own (__SHARDINGKEY) are not headers
        assert list(d.received.headers) == sorted(m.headers)


def test_a_missing_group_or_an_unreachable_proxy_is_a_broker_error_that_says_so(rocketmq: RocketMQServer) -> None:
    topic = rocketmq_plain.unique("nogroup")
    rocketmq.create_topic(topic)
    group = rocketmq_plain.unique("missing")
    with pytest.raises(BrokerError, match=f"group or a topic does not exist.*--group {group}"):
        RocketMQSubscription(rocketmq_plain.url(rocketmq), group, [topic], settle_s=1)
    rocketmq.create_group(group)
    with pytest.raises(BrokerError, match="group or a topic does not exist"):
        RocketMQSubscription(rocketmq_plain.url(rocketmq), group, [rocketmq_plain.unique("notopic")], settle_s=1)
    with pytest.raises(BrokerError, match="the proxy does not answer"):
        RocketMQSubscription("rocketmq://127.0.0.1:1", "g", [topic])


def test_a_slow_handler_keeps_its_message_past_the_invisible_duration(rocketmq: RocketMQServer, db: Db) -> None:
    """The handler runs longer than the 10 s the message was received invisible for; another
    consumer of the group polls all that time and never gets it (the extension keeps it), and the
    message is processed once."""
    topic = rocketmq_plain.unique("slow")
    group = rocketmq_plain.prepare(rocketmq, topic, fifo=False)
    msg = new_message(topic, b"slow", key=b"k")
    publish(rocketmq, [msg], fifo=False)
    started, release = threading.Event(), threading.Event()
    c = Consumer(rocketmq_plain.url(rocketmq), group, [topic], db.inbox, config={"invisible_s": 10.0}, poll_s=0.5)

    @c.handler
    def handle(m: Received, tx: sa.Connection) -> None:
        started.set()
        release.wait(120)
        db.record(m, tx)

    runner = threading.Thread(target=c.run_until_idle, kwargs={"idle_s": 1.0, "timeout_s": 120})
    runner.start()
    stolen: list[Any] = []
    other = rocketmq_client.SimpleConsumer(
        rocketmq.client_config(), group, {rocketmq_topic(topic): rocketmq_client.FilterExpression()}, await_duration=1
    )
    other.startup()
    try:
        assert started.wait(60)
        since = time.monotonic()
        # past the first invisible duration, plus RocketMQ's few seconds to make an expired message visible
        while time.monotonic() - since < 10 + 4 and not stolen:
            stolen.extend(receive(other, 1, 10))
        release.set()
        runner.join(120)
    finally:
        release.set()
        other.shutdown()
        c.close()
    assert stolen == [], "another consumer of the group got the message while its handler still ran"
    assert db.counts() == Counter({msg.id: 1}) and c.counters.duplicates == 0


def test_a_refused_visibility_change_leaves_the_message_its_receipt_handle(
    rocketmq: RocketMQServer, caplog: pytest.LogCaptureFixture
) -> None:
    """rocketmq-python-client copies the answer's receipt handle into the message before it checks
    the answer: a refused extension left it empty and the ack after the commit failed (50001
    INTERNAL_SERVER_ERROR; the message came back after invisible_s, measured). The broker refuses an
    invisible time over the proxy's 12 h maximum (40011), so asking 13 h makes a real refusal."""
    topic = rocketmq_plain.unique("handle")
    group = rocketmq_plain.prepare(rocketmq, topic, fifo=False)
    publish(rocketmq, [new_message(topic, b"v", key=b"k")], fifo=False)
    sub = RocketMQSubscription(rocketmq_plain.url(rocketmq), group, [topic], invisible_s=10)
    try:
        (d,) = fetch_all_unacked(sub, 1)
        handle = d.token.receipt_handle
        sub.invisible_s = 13 * 3600  # the next extension asks for more than the proxy allows
        sub.touch(d)
        sub.invisible_s = 10
        assert "invisibleTime is too large" in caplog.text  # the broker did refuse it
        assert d.token.receipt_handle == handle
        sub.ack(d)  # before the fix: BrokerError, 50001, with the empty handle
    finally:
        sub.close()


def fetch_all_unacked(sub: Subscription, want: int, timeout_s: float = 30.0) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        got.extend(sub.fetch(want - len(got), 1.0))
    return got


class Crash(BaseException):
    """Stands in for the process dying in the handler: nothing after it runs (no commit, no ack)."""


def test_a_message_that_kills_its_consumer_is_dead_lettered_before_rocketmq_gives_up(
    rocketmq: RocketMQServer, db: Db
) -> None:
    """retryMaxTimes 2: RocketMQ delivers 3 times, then moves the message to %DLQ%<group> without
    our error. zeroloss reads delivery_attempt and dead-letters it itself at the second."""
    topic = rocketmq_plain.unique("dcrash")
    group = rocketmq_plain.prepare(rocketmq, topic, fifo=False, retry_max_times=2)
    msg = new_message(topic, b"payload", key=b"k")
    publish(rocketmq, [msg], fifo=False)
    url = rocketmq_plain.url(rocketmq)
    seen: list[int] = []
    for _ in range(6):  # each a new process's life; the crash leaves the message unsettled
        if seen and any(True for _ in RocketMQReader(url).read(topic + ".dlq")):
            break
        c = Consumer(url, group, [topic], db.inbox, config={"invisible_s": 10.0}, max_attempts=1, poll_s=0.2)

        @c.handler
        def crash(m: Received, tx: sa.Connection) -> None:
            seen.append(m.attempts)
            raise Crash()

        try:
            # RocketMQ's revive takes 2-3 s: a life that ends before it just means one more life
            c.run_until_idle(idle_s=3.0, timeout_s=60)
        except Crash:
            pass
        finally:
            c.close()
    letters = list(RocketMQReader(url).read(topic + ".dlq"))
    assert [s.id for s in letters] == [msg.id], f"the handler saw attempts {seen}"
    headers = dict(letters[0].headers)
    assert headers[dlq.H_ERROR_TYPE] == b"DeliveryLimitReached", headers
    assert b"delivered 2 times" in headers[dlq.H_ERROR_MESSAGE]
    assert seen == [1]  # handled at delivery 1; the second is dead-lettered, not handled
    assert (letters[0].key, letters[0].value) == (msg.key, msg.value)


def test_max_attempts_must_leave_rocketmq_a_delivery_to_spare(rocketmq: RocketMQServer, db: Db) -> None:
    topic = rocketmq_plain.unique("dcfg")
    group = rocketmq_plain.prepare(rocketmq, topic, fifo=False, retry_max_times=3)  # 4 deliveries
    c = Consumer(rocketmq_plain.url(rocketmq), group, [topic], db.inbox, config={"invisible_s": 10.0}, max_attempts=3)
    c.handler(db.record)
    with pytest.raises(ConfigError, match="max_attempts=3"):
        c.run_for(10.0)
    c.close()


def test_dlq_list_show_and_replay(rocketmq: RocketMQServer, db: Db) -> None:
    """Dead letters made by a consumer are listed and shown by ``zeroloss dlq`` and stay where they
    are (read twice, the same); replayed with their id, the inbox runs each once."""
    topic = rocketmq_plain.unique("dlqcli")
    group = rocketmq_plain.prepare(rocketmq, topic, fifo=False)
    bad = [new_message(topic, b"bad %d" % i, key=b"k", headers=(("trace", b"t%d" % i),)) for i in range(2)]
    publish(rocketmq, bad, fifo=False)
    url = rocketmq_plain.url(rocketmq)
    c = Consumer(url, group, [topic], db.inbox, config={"invisible_s": 10.0}, max_attempts=1)

    @c.handler
    def refuse(m: Received, tx: sa.Connection) -> None:
        raise ValueError(f"bad total in {m.id}")

    try:
        c.run_until_idle(idle_s=1.0, timeout_s=60)
    finally:
        c.close()
    assert c.counters.dead_lettered == 2
    run = CliRunner().invoke
    for _ in range(2):
        listed = run(main, ["dlq", "list", "--target", url, "--topic", topic, "--json"])
        assert listed.exit_code == 0, listed.output
        rows = json.loads(listed.output)
        assert sorted(r["id"] for r in rows) == sorted(m.id for m in bad)
        assert {r["error_type"] for r in rows} == {"ValueError"} and {r["original_topic"] for r in rows} == {topic}
        # the message's own headers only: none of RocketMQ's stored properties (BORN_TIMESTAMP, ...),
        # which the proxy would refuse in a replay
        assert sorted(r["headers"] for r in rows) == [[["trace", "t0"]], [["trace", "t1"]]]
    shown = run(main, ["dlq", "show", "--target", url, "--topic", f"{topic}.dlq", bad[1].id])
    assert shown.exit_code == 0 and f"bad total in {bad[1].id}" in shown.output and "bad 1" in shown.output
    typo = run(main, ["dlq", "list", "--target", url, "--topic", rocketmq_plain.unique("typo")])
    assert typo.exit_code == 2 and "check the name" in typo.output
    if "rocketmq" not in TARGET_SCHEMES:
        pytest.skip("replay publishes through the relay's RocketMQ adapter (rocketmq://), on the rmq-pub branch")
    replayed = run(main, ["dlq", "replay", "--target", url, "--topic", topic, "--all"])
    assert replayed.exit_code == 0 and "replayed 2" in replayed.output, replayed.output
    again = Consumer(url, group, [topic], db.inbox, config={"invisible_s": 10.0})
    again.handler(db.record)
    try:
        again.run_until_idle(idle_s=2.0, timeout_s=60)
    finally:
        again.close()
    assert db.counts() == Counter({m.id: 1 for m in bad})


def test_a_failed_receive_or_ack_is_a_broker_error_and_a_consumer_waits_out_a_dead_proxy(
    rocketmq: RocketMQServer, db: Db
) -> None:
    """A receive or ack the client cannot do is a BrokerError (the loop backs off and subscribes
    again); a consumer that cannot subscribe keeps trying without raising. (A real proxy outage is
    not staged here: the shared server must not be killed, and a TCP proxy in between only sees the
    route query — the route hands the client the proxy's own address.)"""
    topic = rocketmq_plain.unique("gone")
    group = rocketmq_plain.prepare(rocketmq, topic, fifo=False)
    publish(rocketmq, [new_message(topic, b"x", key=b"k")], fifo=False)
    sub = RocketMQSubscription(rocketmq_plain.url(rocketmq), group, [topic], invisible_s=10)
    try:
        got: list[Any] = []
        while not got:
            got = sub.fetch(10, 1.0)
        sub._consumer.shutdown()  # the client gone under the subscription
        with pytest.raises(BrokerError, match="ack of"):
            sub.ack(got[0])
        with pytest.raises(BrokerError, match="receive failed"):
            sub.fetch(10, 0.2)
    finally:
        sub.close()
    c = Consumer("rocketmq://127.0.0.1:1", group, [topic], db.inbox, backoff_base_s=0.05, max_backoff_s=0.2)
    c.handler(db.record)
    c.run_for(1.0)  # keeps trying to subscribe, never raises, stops on time
    assert not c.assigned and db.counts() == Counter()


def test_relay_show_and_consumer_lines_on_rocketmq(
    rocketmq: RocketMQServer, db: Db, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 15 on RocketMQ: the relay's start line and summary name it, ``zeroloss show ID`` gives
    a delivered message's location (topic/message-id/queue-offset), and the consumer says its
    start, progress and summary lines like on the other brokers."""
    import logging

    from zeroloss import SqlOutbox
    from zeroloss.registry import open_broker, open_store
    from zeroloss.relay import Relay

    topic = rocketmq_plain.unique("says")
    group = rocketmq_plain.prepare(rocketmq, topic)
    url = rocketmq_plain.url(rocketmq)
    source = f"sqlite:///{tmp_path / 'app.db'}"
    outbox = SqlOutbox(source)
    outbox.create_schema()
    with outbox.engine.begin() as conn:
        ids = [outbox.add(conn, topic=topic, key=b"k%d" % (i % 2), value=b"v%d" % i) for i in range(3)]
    outbox.close()
    caplog.set_level(logging.INFO, logger="zeroloss")
    store, broker = open_store(source), open_broker(url)
    try:
        Relay(store, broker).drain(60)
    finally:
        store.close()
        broker.close()
    said = [r.getMessage() for r in caplog.records if r.name == "zeroloss.relay"]
    assert any(m.startswith("relay started (until drained): ") and url in m for m in said), said
    assert any(m.startswith("relay stopped after ") and "3 delivered" in m for m in said), said

    shown = CliRunner().invoke(main, ["show", ids[0], "--source", source, "--json"])
    assert shown.exit_code == 0, shown.output
    doc = json.loads(shown.output)
    name, _mid, offset = doc["location"].split("/")
    assert doc["state"] == "success" and name == rocketmq_topic(topic) and offset.isdigit(), doc

    c = Consumer(url, group, [topic], db.inbox, config={"invisible_s": 10.0}, progress_every_s=0.05)
    c.handler(db.record)
    try:
        c.run_until_idle(idle_s=1.0, timeout_s=60)
    finally:
        c.close()
    assert db.counts() == Counter({i: 1 for i in ids})
    said = [r.getMessage() for r in caplog.records if r.name.startswith("zeroloss.consumer")]
    assert any(m.startswith("consumer started: ") and url in m and group in m for m in said), said
    assert any(f"consumer {group} progress: " in m for m in said), said
    assert any(m.startswith(f"consumer {group} stopped after ") and "3 processed" in m for m in said), said


def test_a_client_starts_on_a_thread_that_an_asyncio_run_left_without_an_event_loop(rocketmq: RocketMQServer) -> None:
    """The client's start-up opens gRPC calls on the calling thread, which needs an event loop there;
    asyncio.run() leaves none (the failure seen: 'There is no current event loop', no receive)."""
    import asyncio
    import threading

    from rocketmq.v5.client.connection.rpc_client import RpcClient

    from zeroloss.brokers import rocketmq_client

    topic = rocketmq_plain.unique("loop")
    rocketmq_plain.prepare(rocketmq, topic, fifo=False)
    publish(rocketmq, [new_message(topic, b"x")], fifo=False)  # the client's I/O loop now exists
    seen: list[object] = []

    class Probe:
        def startup(self) -> None:
            seen.append(asyncio.get_event_loop())

    def thread() -> None:
        asyncio.run(asyncio.sleep(0))
        rocketmq_client.start(Probe())

    t = threading.Thread(target=thread)
    t.start()
    t.join(30)
    assert seen == [RpcClient.get_channel_io_loop()]


def test_errors_never_print_the_urls_secret_key() -> None:
    """A bad URL and an unreachable proxy are reported with the URL's secret key masked."""
    from zeroloss.brokers.rocketmq_subscription import RocketMQSubscription
    from zeroloss.brokers.rocketmq_url import parse_url

    with pytest.raises(ConfigError) as bad:
        parse_url("rocketmq://ak:SECRET@127.0.0.1:1?namesrv=nowhere:x")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(BrokerError) as down:
        RocketMQSubscription(
            f"rocketmq://ak:SECRET@127.0.0.1:{port}?namesrv=127.0.0.1:{port}", "g", ["t"], timeout_s=2.0
        )
    for exc in (bad.value, down.value):
        assert "SECRET" not in str(exc) and "ak:***@" in str(exc), str(exc)
