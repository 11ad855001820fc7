"""``rocketmq://AK:SK@HOST:PORT`` against a RocketMQ 5.5.0 whose gRPC proxy enforces its ACL: with
the URL's credentials the publisher, the consumer and the half-message producer work; with a
wrong secret or none each is refused with an error that says so (the proxy's 40100
UNAUTHORIZED), and no error carries the secret. The remoting protocol (admin: init, doctor; the
reader: dlq, the demo's read-back) signs its requests as RocketMQ's AclClientRPCHook does. Before
the fix the consumer, the half-message producer and the remoting requests carried no credentials
at all, whatever the URL said.

A throwaway server of its own (the shared one has no ACL; this one checks gRPC at the proxy and
remoting at the broker), so this lives in ``make chaos``
(about 8 s to start on an idle machine, 45 s on a busy one)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import rocketmq_plain
from tests.conftest import only_in_the_full_crash_matrix
from tests.rocketmq_server import RocketMQServer
from zeroloss.brokers.base import Status
from zeroloss.brokers.rocketmq_fields import rocketmq_topic
from zeroloss.errors import BrokerError
from zeroloss.message import new_message

pytestmark = [
    pytest.mark.rocketmq,
    pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning"),
]
pytest.importorskip("rocketmq", reason="rocketmq-python-client (zeroloss[rocketmq]) not installed")

USER, PASSWORD = "zeroloss", "acl-Secret-1"


@pytest.fixture
def acl_server(tmp_path: Path) -> Iterator[RocketMQServer]:
    only_in_the_full_crash_matrix("a throwaway RocketMQ server with ACL (8-45 s to start)")
    yield from start_acl_server(tmp_path)


def start_acl_server(directory: Path) -> Iterator[RocketMQServer]:
    server = RocketMQServer(
        directory / "rocketmq", namesrv_port=22876, broker_port=22911, proxy_port=22081, credentials=(USER, PASSWORD)
    )
    server.start()  # its own check round trip signs with (USER, PASSWORD)
    try:
        yield server
    finally:
        server.stop(wipe=True)


def url(server: RocketMQServer, userinfo: str) -> str:
    return f"rocketmq://{userinfo}{server.endpoint}?namesrv={server.namesrv_addr}"


def test_the_urls_credentials_pass_the_proxys_acl_and_wrong_ones_are_refused(acl_server: RocketMQServer) -> None:
    check_acl(acl_server)


def check_acl(server: RocketMQServer) -> None:
    from zeroloss.brokers.rocketmq import RocketMQBroker
    from zeroloss.brokers.rocketmq_subscription import RocketMQSubscription
    from zeroloss.half_messages import HalfMessageProducer, Resolution

    topic, tx_topic = rocketmq_plain.unique("acl"), rocketmq_plain.unique("acltx")
    group = rocketmq_plain.prepare(server, topic)
    server.create_topic(tx_topic, "TRANSACTION")
    server.create_group(f"g-{tx_topic}")
    good = url(server, f"{USER}:{PASSWORD}@")

    for bad in (url(server, f"{USER}:wrong@"), url(server, "")):
        broker = RocketMQBroker(bad, timeout_s=6)
        try:
            with pytest.raises(BrokerError, match="UNAUTHORIZED") as refused:
                broker.publish([new_message(topic, b"never", key=b"k")])
        finally:
            broker.close()
        with pytest.raises(BrokerError, match="40100") as not_subscribed:
            RocketMQSubscription(bad, group, [topic], invisible_s=10, settle_s=3, timeout_s=6)
        for exc in (refused.value, not_subscribed.value):
            assert "wrong" not in str(exc), str(exc)

    broker = RocketMQBroker(good, timeout_s=10)
    try:
        sent = new_message(topic, b"signed", key=b"k")
        assert [o.status for o in broker.publish([sent])] == [Status.DELIVERED]
    finally:
        broker.close()
    with HalfMessageProducer(good, [tx_topic], lambda check: Resolution.COMMIT) as half:
        committed = half.send(tx_topic, b"half", lambda half_id: half_id)
    assert committed.settled

    check_remoting(server, good, [topic, f"{topic}.dlq"], {sent.id})

    for t, g, want in ((topic, group, sent.id), (tx_topic, f"g-{tx_topic}", committed.id)):
        sub = RocketMQSubscription(good, g, [t], invisible_s=10, settle_s=10)
        try:
            got: list[str] = []
            deadline = time.monotonic() + 30
            while not got and time.monotonic() < deadline:
                for d in sub.fetch(10, 1.0):
                    got.append(d.received.id)
                    sub.ack(d)
        finally:
            sub.close()
        assert got == [want]


def check_remoting(server: RocketMQServer, good: str, topics: list[str], stored: set[str]) -> None:
    """The remoting protocol (init, doctor, dlq, the demo's read-back) signed with the URL's
    credentials passes the broker's ACL; unsigned or wrongly signed requests are refused."""
    from zeroloss.brokers.rocketmq_admin import RocketMQAdmin
    from zeroloss.brokers.rocketmq_reader import RocketMQReader
    from zeroloss.brokers.rocketmq_url import parse_url
    from zeroloss.doctor.rocketmq import rocketmq_checks

    for bad in (url(server, f"{USER}:wrong@"), url(server, "")):
        with pytest.raises(BrokerError, match=r"(?i)signature|username|auth") as refused:
            RocketMQAdmin.for_url(parse_url(bad)).topic_config(rocketmq_topic(topics[0]))
        assert "wrong" not in str(refused.value)
    admin = RocketMQAdmin.for_url(parse_url(good))
    assert all(admin.topic_config(rocketmq_topic(t)) is not None for t in topics)
    assert {s.id for s in RocketMQReader(good).read(topics[0])} == stored
    verdicts = {c.name: c.verdict.name for c in rocketmq_checks(good, topic=topics[0])}
    # read through signed requests: the broker's configuration and the topic's (its role FAILs
    # for another reason: one master, no replica)
    assert verdicts["broker broker-a flushDiskType"] == "OK", verdicts
    assert verdicts[f"topic {rocketmq_topic(topics[0])}"] == "OK", verdicts
