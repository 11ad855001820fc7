"""Where a new RocketMQ consumer group starts: the gRPC proxy's receive (a pop) starts a group with
no offset at each queue's LAST message unless the first is still in the broker's memory, so a
backlog published before the group's first receive would be skipped (issue 13 review). ``zeroloss
init --group`` and the consumer set the group's missing offsets to each queue's first message.

The offsets are read here with raw remoting requests, not zeroloss's own admin code, so that these
tests fail on the code before the fix. The end-to-end proof needs a broker that starts new groups
at the end (``initPopOffsetByCheckMsgInMem=false``, standing for a backlog no longer in memory): a
throwaway server of its own, too slow for ``make test-rocketmq``; it runs in ``make chaos``."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests import rocketmq_plain
from tests.conftest import only_in_the_full_crash_matrix
from tests.rocketmq_server import RocketMQServer
from zeroloss.brokers.rocketmq_subscription import RocketMQSubscription
from zeroloss.cli import main
from zeroloss.message import new_message

pytestmark = [
    pytest.mark.rocketmq,
    pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning"),
]
pytest.importorskip("rocketmq", reason="rocketmq-python-client (zeroloss[rocketmq]) not installed")

QUERY_CONSUMER_OFFSET, UPDATE_CONSUMER_OFFSET, GET_MIN_OFFSET, QUERY_NOT_FOUND = 14, 15, 31, 22
QUEUES = 4  # what zeroloss init makes by default


def committed(server: RocketMQServer, group: str, topic: str) -> dict[int, int | None]:
    """Queue → the group's committed offset (None: it has none), asked as mqadmin would."""
    out: dict[int, int | None] = {}
    for q in range(QUEUES):
        header, _ = server.remoting(
            server.broker_port,
            QUERY_CONSUMER_OFFSET,
            {"consumerGroup": group, "topic": topic, "queueId": str(q), "setZeroIfNotFound": "false"},
        )
        assert header["code"] in (0, QUERY_NOT_FOUND), header
        out[q] = int(header["extFields"]["offset"]) if header["code"] == 0 else None
    return out


def firsts(server: RocketMQServer, topic: str) -> dict[int, int]:
    out = {}
    for q in range(QUEUES):
        header, _ = server.remoting(server.broker_port, GET_MIN_OFFSET, {"topic": topic, "queueId": str(q)})
        out[q] = int(header["extFields"]["offset"])
    return out


def backlog(server: RocketMQServer, topic: str, n: int = 8) -> None:
    rocketmq_plain.PlainProducer(server).publish(
        [new_message(topic, f"v{i}".encode(), key=f"k{i}".encode()) for i in range(n)]
    )


def init(url: str, *args: str) -> str:
    result = CliRunner().invoke(main, ["init", "--target", url, *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_init_sets_a_new_groups_offsets_to_each_queues_first_message_and_leaves_set_ones(
    rocketmq: RocketMQServer,
) -> None:
    url, topic = rocketmq_plain.url(rocketmq), rocketmq_plain.unique("newgrp")
    group = f"g-{topic}"
    init(url, "--topic", topic)
    backlog(rocketmq, topic)
    out = init(url, "--topic", topic, "--group", group)
    assert committed(rocketmq, group, topic) == firsts(rocketmq, topic)
    assert f"set to read {QUEUES} queue(s) from their first message" in out
    # A group that has consumed keeps its place: init run again moves nothing back.
    header, _ = rocketmq.remoting(
        rocketmq.broker_port,
        UPDATE_CONSUMER_OFFSET,
        {"consumerGroup": group, "topic": topic, "queueId": "0", "commitOffset": "5"},
    )
    assert header["code"] == 0, header
    out = init(url, "--topic", topic, "--group", group)
    assert committed(rocketmq, group, topic)[0] == 5 and "set to read" not in out


def test_a_consumer_sets_the_offsets_of_a_group_made_without_init_and_reads_the_backlog(
    rocketmq: RocketMQServer,
) -> None:
    topic = rocketmq_plain.unique("newgrp")
    group = rocketmq_plain.prepare(rocketmq, topic)  # mqadmin updateSubGroup's way: no offsets
    backlog(rocketmq, topic)
    assert set(committed(rocketmq, group, topic).values()) == {None}
    sub = RocketMQSubscription(rocketmq_plain.url(rocketmq), group, [topic], settle_s=30)
    try:
        assert committed(rocketmq, group, topic) == firsts(rocketmq, topic)
        got: set[bytes | None] = set()
        deadline = time.monotonic() + 30
        while len(got) < 8 and time.monotonic() < deadline:
            for d in sub.fetch(10, 1.0):
                got.add(d.received.value)
                sub.ack(d)
        assert got == {f"v{i}".encode() for i in range(8)}
    finally:
        sub.close()


def test_without_the_name_server_a_consumer_warns_that_a_new_group_may_skip_and_runs(
    rocketmq: RocketMQServer, caplog: pytest.LogCaptureFixture
) -> None:
    topic = rocketmq_plain.unique("newgrp")
    group = rocketmq_plain.prepare(rocketmq, topic)
    caplog.set_level(logging.WARNING, "zeroloss.brokers.rocketmq_subscription")
    sub = RocketMQSubscription(f"{rocketmq.url}?namesrv=127.0.0.1:19998", group, [topic], settle_s=30, timeout_s=2)
    try:
        assert sub.fetch(10, 1.0) == []
    finally:
        sub.close()
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "127.0.0.1:19998" in warned and "skips the backlog" in warned and f"init --group {group}" in warned


def test_on_a_broker_that_starts_new_groups_at_the_end_nothing_published_before_is_skipped(tmp_path: Path) -> None:
    only_in_the_full_crash_matrix("a throwaway RocketMQ server (about 35 s to start)")
    skipped_backlog_is_read(tmp_path)


def skipped_backlog_is_read(directory: Path) -> None:
    """``zeroloss init`` makes topic and group, 40 messages are published, then the consumer's first
    receive: before the fix it got 4 (each queue's last message), measured on 5.5.0."""
    from zeroloss.brokers.base import Status

    server = RocketMQServer(
        directory / "rocketmq",
        namesrv_port=24876,
        broker_port=24911,
        proxy_port=24081,
        broker_props={"initPopOffsetByCheckMsgInMem": "false"},
    )
    server.start()
    try:
        url = rocketmq_plain.url(server)
        topic = rocketmq_plain.unique("atend")
        group = f"g-{topic}"
        init(url, "--topic", topic, "--group", group)
        producer = rocketmq_plain.PlainProducer(server)
        msgs = [new_message(topic, f"v{i}".encode(), key=f"k{i % 8}".encode()) for i in range(40)]
        assert {o.status for o in producer.publish(msgs)} == {Status.DELIVERED}
        producer.close()
        got: list[Any] = []
        sub = RocketMQSubscription(url, group, [topic], settle_s=30)
        try:
            empty = 0
            while empty < 3:  # three empty receives in a row: nothing more is coming
                ds = sub.fetch(32, 2.0)
                empty = 0 if ds else empty + 1
                for d in ds:
                    got.append(d.received.value)
                    sub.ack(d)
        finally:
            sub.close()
        assert sorted(got) == sorted(m.value for m in msgs)
    finally:
        server.stop(wipe=True)
