"""``zeroloss show ID``: one message in any state, from every kind of outbox, and whether a
consumer group handled it; an unknown id is exit 2 with the reason."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from tests.conftest import REDIS_URL, OutboxHarness, require_service
from zeroloss.cli import main
from zeroloss.inbox import RedisInbox, SqlInbox
from zeroloss.message import new_message, uuid7
from zeroloss.outbox.base import Delivered, State
from zeroloss.outbox.spool import FileSpool


def show(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["show", *args])
    return result.exit_code, result.output


def show_json(*args: str) -> dict[str, Any]:
    code, out = show(*args, "--json")
    assert code == 0, out
    doc: dict[str, Any] = json.loads(out)
    return doc


def source(h: OutboxHarness) -> list[str]:
    if h.kind == "spool":
        return ["--source", f"spool://{h.store.root}"]
    return ["--source", h.store.url, "--table", h.store.table.name]


def test_show_answers_for_pending_sending_success_failed_and_an_unknown_id(outbox: OutboxHarness) -> None:
    src = source(outbox)
    sent, claimed, failed, backing_off, waiting = (
        outbox.add(topic="orders", key=b"k%d" % i, value=b'{"order": %d}' % i) for i in range(5))  # fmt: skip
    batch = {m.id: m for m in outbox.store.claim(4, 30)}
    outbox.store.succeed([Delivered(batch[sent], "orders/2/1543")])
    outbox.store.fail([replace(batch[failed], attempts=10, last_error="MSG_SIZE_TOO_LARGE: too big\nline 2")])
    outbox.store.retry(
        [replace(batch[backing_off], attempts=1, not_before=outbox.store.now() + 3600, last_error="broker unavailable")]
    )

    doc = show_json(sent, *src)
    assert (doc["state"], doc["location"], doc["topic"], doc["key_text"]) == (
        "success",
        "orders/2/1543",
        "orders",
        "k0",
    )
    assert doc["value_text"] == '{"order": 0}' and doc["next"].startswith("delivered")
    doc = show_json(claimed, *src)
    assert doc["state"] == "sending" and "claimed by a relay" in doc["next"]
    doc = show_json(failed, *src)
    assert doc["state"] == "failed" and doc["attempts"] == 10 and doc["last_error"].startswith("MSG_SIZE_TOO_LARGE")
    assert "zeroloss failed retry" in doc["next"]
    doc = show_json(backing_off, *src)
    assert doc["state"] == "pending" and "retry backoff until" in doc["next"] and doc["attempts"] == 1
    assert doc["last_error"] == "broker unavailable"
    doc = show_json(waiting, *src)
    assert doc["state"] == "pending" and doc["next"] == "waiting for the relay"

    code, out = show(sent, *src)  # the text form: one field a line
    assert code == 0 and "location:       orders/2/1543" in out and "state:          success" in out, out

    code, out = show(uuid7(), *src)
    assert code == 2 and "in any state" in out and "check the id and --source" in out, out


def test_show_of_a_message_parked_behind_a_failed_one_of_its_key_says_so(outbox: OutboxHarness) -> None:
    """`status` counts it parked; `show` said "waiting for the relay", which the relay never does
    until a person retries or purges the failed one. Another key's pending message is not parked."""
    src = source(outbox)
    first = outbox.add(topic="orders", key=b"k", value=b"1")
    behind = outbox.add(topic="orders", key=b"k", value=b"2")
    other = outbox.add(topic="orders", key=b"j", value=b"3")
    batch = {m.id: m for m in outbox.store.claim(1, 30)}
    outbox.store.fail([replace(batch[first], attempts=10, last_error="rejected")])

    doc = show_json(behind, *src)
    assert doc["state"] == "pending" and doc["next"].startswith(f"parked: failed message {first} of its key"), doc
    assert f"zeroloss failed retry {first}" in doc["next"]
    assert show_json(other, *src)["next"] == "waiting for the relay"


def crashed_transaction(spool: FileSpool, txid: str) -> str:
    tx = spool.transaction(txid).__enter__()
    mid = tx.add(topic="orders", value=b"d0")
    for name in os.listdir(os.path.join(spool.root, "tmp")):
        past = time.time() - 3600
        os.utime(os.path.join(spool.root, "tmp", name), (past, past))
    return mid


def test_show_answers_for_a_spool_s_tmp_doubt_and_malformed_messages(tmp_path: Path) -> None:
    spool = FileSpool(tmp_path / "spool")
    src = ["--source", f"spool://{spool.root}"]
    mid = crashed_transaction(spool, "order-tx-9")
    doc = show_json(mid, *src)
    assert (doc["state"], doc["transaction"]) == ("tmp", "order-tx-9") and "not committed yet" in doc["next"]
    assert spool.recover().doubt == 1
    doc = show_json(mid, *src)
    assert (doc["state"], doc["transaction"], doc["value_text"]) == ("doubt", "order-tx-9", "d0")
    assert "zeroloss doubt retry" in doc["next"]

    bad = new_message("orders", b"x")
    (Path(spool.root) / "pending" / f"{bad.id}.zlm").write_bytes(b"ZLM\x01\xff\xfegarbage")
    (Path(spool.root) / "pending" / "notes.txt").write_text("hello")
    assert spool.recover().malformed == 2
    doc = show_json(bad.id, *src)  # by the id it claimed
    assert doc["state"] == "malformed" and "truncated" in doc["why"] and doc["bytes"] == 13
    assert "malformed purge" in doc["next"]
    doc = show_json("notes.txt", *src)  # by its file name
    assert doc["state"] == "malformed" and doc["content_text"] == "hello"
    spool.close()


def test_show_says_whether_a_consumer_group_handled_it(tmp_path: Path) -> None:
    spool = FileSpool(tmp_path / "spool")
    with spool.transaction() as tx:
        done, not_done = tx.add(topic="orders", value=b"a"), tx.add(topic="orders", value=b"b")
    src = ["--source", f"spool://{spool.root}"]
    inbox_url = f"sqlite:///{tmp_path / 'inbox.db'}"
    inbox = SqlInbox(inbox_url, table="billing_inbox")
    inbox.create_schema()
    with inbox.transaction() as conn:
        assert inbox.claim(conn, "billing", done)
    inbox.close()
    args = ["--inbox", inbox_url, "--inbox-table", "billing_inbox"]

    code, out = show(done, *src, *args, "--group", "billing")
    assert code == 0 and "handled:        yes" in out and "(group billing)" in out, out
    code, out = show(not_done, *src, *args, "--group", "billing")
    assert code == 0 and "handled:        no" in out, out
    assert show_json(done, *src, *args, "--group", "shipping")["handled_by_group"] == {
        "group": "shipping",
        "handled": False,
    }
    code, out = show(done, *src, "--inbox", inbox_url, "--group", "billing")  # the default table is not there
    assert code == 1 and "cannot read the inbox table 'zeroloss_inbox'" in out and "[SQL:" not in out, out
    code, out = show(done, *src, "--inbox", inbox_url)
    assert code == 2 and "--inbox URL and --group G go together" in out
    spool.close()


def test_show_reads_a_redis_inbox(tmp_path: Path) -> None:
    require_service("redis")
    spool = FileSpool(tmp_path / "spool")
    with spool.transaction() as tx:
        mid = tx.add(topic="orders", value=b"a")
    group = f"g-{uuid7()}"
    inbox = RedisInbox(REDIS_URL)
    try:
        with inbox.transaction() as pipe:
            assert inbox.claim(pipe, group, mid)
        doc = show_json(mid, "--source", f"spool://{spool.root}", "--inbox", REDIS_URL, "--group", group)
        assert doc["handled_by_group"] == {"group": group, "handled": True} and doc["state"] == "pending"
    finally:
        inbox.client.delete(inbox.key(group, mid))
        inbox.close()
    spool.close()


def test_show_with_an_inbox_url_that_has_no_inbox_says_what_to_check(tmp_path: Path) -> None:
    """--inbox pointing at a database without the inbox table (the app's instead of the consumer's,
    or a consumer that never ran): the error names what to check and who makes the table."""
    from zeroloss import SqlOutbox

    url = f"sqlite:///{tmp_path / 'app.db'}"
    outbox = SqlOutbox(url)
    outbox.create_schema()
    with outbox.engine.begin() as conn:
        outbox.add(conn, topic="orders", value=b"x")
    mid = outbox.list(State.PENDING)[0].id
    outbox.close()
    result = CliRunner().invoke(
        main, ["show", mid, "--source", url, "--inbox", f"sqlite:///{tmp_path / 'other.db'}", "--group", "billing"]
    )
    assert result.exit_code == 1, result.output
    assert "no such table: zeroloss_inbox" in result.output and "consumer.inbox.create_schema()" in result.output
