"""zeroloss dlq list|show|replay against a real broker."""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner

from tests.conftest import unique_topic
from zeroloss.cli import main
from zeroloss.dlq import DeadLetterPublisher, dead_letter
from zeroloss.embedded_broker import EmbeddedBroker
from zeroloss.message import uuid7
from zeroloss.readback import read_topic

pytestmark = pytest.mark.kafka


def test_list_show_replay_and_bad_input(kafka: EmbeddedBroker) -> None:
    topic = unique_topic("orders")
    ids = [uuid7(), uuid7()]
    pub = DeadLetterPublisher(kafka.url)
    for n, mid in enumerate(ids):
        pub.publish(dead_letter(message_id=mid, topic=topic, partition=0, offset=n, key=b"k", value=b"v%d" % n,
                                headers=(("trace", b"t"),), error=ValueError("bad total"), attempts=5,
                                first_failure=time.time()))
    pub.close()
    run = CliRunner().invoke

    listed = run(main, ["dlq", "list", "--target", kafka.url, topic, "--json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.output)
    assert [r["id"] for r in rows] == ids
    assert rows[0]["error_type"] == "ValueError" and rows[0]["attempts"] == 5

    shown = run(main, ["dlq", "show", "--target", kafka.url, f"{topic}.dlq", ids[1]])
    assert shown.exit_code == 0 and "bad total" in shown.output and "v1" in shown.output

    unknown = run(main, ["dlq", "show", "--target", kafka.url, topic, uuid7()])
    assert unknown.exit_code == 2 and "no dead letter" in unknown.output

    neither = run(main, ["dlq", "replay", "--target", kafka.url, topic])
    assert neither.exit_code == 2 and "--all" in neither.output

    replayed = run(main, ["dlq", "replay", "--target", kafka.url, topic, "--all"])
    assert replayed.exit_code == 0 and "replayed 2" in replayed.output, replayed.output
    back = read_topic(kafka.url, topic, expect=ids)
    assert set(back.ids) == set(ids)  # with their original ids: the inbox runs each at most once
