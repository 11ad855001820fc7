"""`zeroloss failed|doubt|malformed list|show|retry|purge` on every store."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import OutboxHarness
from zeroloss.cli import main
from zeroloss.errors import UnknownMessageError
from zeroloss.message import new_message
from zeroloss.outbox.base import State
from zeroloss.outbox.spool import FileSpool


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def source(h: OutboxHarness) -> list[str]:
    if h.kind == "spool":
        return ["--source", f"spool://{h.store.root}"]
    return ["--source", h.store.url, "--table", h.store.table.name]


def fail(h: OutboxHarness, n: int, **kw: object) -> list[str]:
    ids = [h.add(topic="orders", **{"value": b"v%d" % i, **kw}) for i in range(n)]
    claimed = h.store.claim(n, lease_s=30)
    h.store.fail([replace(m, attempts=10, last_error="MSG_SIZE_TOO_LARGE: too big") for m in claimed])
    return ids


def test_failed_list_and_show_every_field(outbox: OutboxHarness) -> None:
    [text] = fail(outbox, 1, value=b'{"order": 42}', key=b"customer-7", headers={"trace": b"abc"})
    [binary] = fail(outbox, 1, value=bytes(range(200)) * 10)
    code, out = run("failed", "list", *source(outbox))
    assert code == 0, out
    assert text in out and binary in out and "MSG_SIZE_TOO_LARGE" in out and "2 failed message(s)" in out
    code, out = run("failed", "show", text, *source(outbox))
    assert code == 0, out
    for needle in (
        "topic:",
        "orders",
        "customer-7",
        '{"order": 42}',
        "attempts:",
        "10",
        "trace",
        "abc",
        "MSG_SIZE_TOO_LARGE",
        "created_at:",
    ):
        assert needle in out
    code, out = run("failed", "show", binary, *source(outbox), "--json")
    doc = json.loads(out)
    assert doc["bytes"] == 2000 and "value_hex" in doc and "more bytes; --full shows all" in doc["value_hex"]
    code, out = run("failed", "show", binary, *source(outbox), "--json", "--full")
    assert json.loads(out)["value_hex"] == (bytes(range(200)) * 10).hex()
    code, out = run("failed", "list", *source(outbox), "--json", "--limit", "1")
    assert [r["id"] for r in json.loads(out)] == [text]


def test_retry_moves_failed_to_pending_and_an_unknown_id_changes_nothing(outbox: OutboxHarness) -> None:
    ids = fail(outbox, 3)
    pending = outbox.add(topic="orders", value=b"p")
    code, out = run("failed", "retry", ids[0], pending, "0190aaaa-0000-7000-8000-000000000000", *source(outbox))
    assert code == 2, out
    assert f"{pending} (pending)" in out and "(no such message)" in out and "nothing was changed" in out
    assert outbox.store.stats().counts[State.FAILED] == 3
    code, out = run("failed", "show", pending, *source(outbox))  # show changes nothing: no such promise
    assert code == 2, out
    assert f"not failed: {pending} (pending)" in out and "nothing was changed" not in out
    assert "`zeroloss show ID` shows a message in any state" in out
    code, out = run("failed", "retry", ids[0], *source(outbox))
    assert code == 0, out
    state, msg = outbox.store.get(ids[0])
    assert (state, msg.attempts) == (State.PENDING, 0)
    code, out = run("failed", "retry", "--all", *source(outbox))
    assert code == 0 and "2 message(s) back to pending" in out
    assert outbox.store.stats().counts[State.FAILED] == 0


def test_ids_or_all_not_both_nor_neither(outbox: OutboxHarness) -> None:
    [mid] = fail(outbox, 1)
    assert run("failed", "retry", *source(outbox))[0] == 2
    assert run("failed", "purge", mid, "--all", "--yes", *source(outbox))[0] == 2
    assert outbox.store.get(mid)[0] is State.FAILED


def test_purge_says_what_it_would_delete_and_deletes_only_with_yes(outbox: OutboxHarness) -> None:
    ids = fail(outbox, 3)
    code, out = run("failed", "purge", ids[0], ids[1], *source(outbox))
    assert code == 1
    assert "would delete 2 failed message(s)" in out and ids[0] in out and "--yes" in out
    assert outbox.store.stats().counts[State.FAILED] == 3
    pending = outbox.add(topic="orders", value=b"p")
    code, out = run("failed", "purge", ids[0], pending, "--yes", *source(outbox))
    assert code == 2 and f"{pending} (pending)" in out
    assert outbox.store.stats().counts[State.FAILED] == 3
    assert run("failed", "purge", ids[0], "--yes", *source(outbox)) == (0, "deleted 1 failed message(s)\n")
    with pytest.raises(UnknownMessageError):
        outbox.store.get(ids[0])
    code, out = run("failed", "purge", "--all", "--yes", *source(outbox))
    assert code == 0 and "deleted 2 failed message(s)" in out
    counts = outbox.store.stats().counts
    assert (counts[State.FAILED], counts[State.PENDING]) == (0, 1)


def test_bulk_retry_goes_in_chunks_with_a_progress_bar(outbox: OutboxHarness) -> None:
    fail(outbox, 230)
    code, out = run("failed", "retry", "--all", *source(outbox))
    assert code == 0, out
    assert "retrying 230" in out and "230 message(s) back to pending" in out
    assert outbox.store.stats().counts[State.PENDING] == 230


def test_sql_outboxes_say_doubt_and_malformed_do_not_occur(outbox: OutboxHarness) -> None:
    if outbox.kind == "spool":  # it has these states: an empty list, and an unknown id is refused
        for state in ("doubt", "malformed"):
            assert run(state, "list", *source(outbox)) == (0, f"0 {state} message(s)\n")
            assert run(state, "purge", "nope", "--yes", *source(outbox))[0] == 2
        return
    for state in ("doubt", "malformed"):
        code, out = run(state, "list", *source(outbox))
        assert code == 0 and f"never has {state} messages" in out
        code, out = run(state, "purge", "--all", "--yes", *source(outbox))
        assert code == 0 and f"never has {state} messages" in out
        code, out = run(state, "purge", "0190aaaa-0000-7000-8000-000000000000", "--yes", *source(outbox))
        assert code == 2 and f"never has {state} messages" in out
    code, out = run("doubt", "retry", "0190aaaa-0000-7000-8000-000000000000", *source(outbox))
    assert code == 2 and "never has doubt messages" in out


# ---- spool only --------------------------------------------------------------------------------


def crashed_transaction(spool: FileSpool, txid: str, n: int) -> list[str]:
    """tmp files of a transaction whose process died before the spool learnt its outcome."""
    tx = spool.transaction(txid).__enter__()
    ids = [tx.add(topic="orders", value=b"d%d" % i) for i in range(n)]
    for name in os.listdir(os.path.join(spool.root, "tmp")):
        past = time.time() - 3600
        os.utime(os.path.join(spool.root, "tmp", name), (past, past))
    assert spool.recover().doubt == n
    return ids


def test_doubt_list_show_retry_purge(tmp_path: Path) -> None:
    spool = FileSpool(tmp_path / "spool")
    src = ["--source", f"spool://{spool.root}"]
    ids = crashed_transaction(spool, "order-tx-17", 2)
    code, out = run("doubt", "list", *src)
    assert code == 0 and "tx=order-tx-17" in out and "2 doubt message(s)" in out
    code, out = run("doubt", "show", ids[0], *src, "--json")
    doc = json.loads(out)
    assert (doc["state"], doc["transaction"], doc["value_text"]) == ("doubt", "order-tx-17", "d0")
    assert run("doubt", "retry", ids[0], *src)[0] == 0
    assert spool.get(ids[0])[0] is State.PENDING
    assert run("failed", "retry", ids[1], *src)[0] == 2  # it is doubt, not failed
    assert run("doubt", "purge", ids[1], *src)[0] == 1
    assert run("doubt", "purge", ids[1], "--yes", *src)[0] == 0
    assert spool.stats().counts[State.DOUBT] == 0
    spool.close()


def test_malformed_list_show_purge_by_file_name(tmp_path: Path) -> None:
    spool = FileSpool(tmp_path / "spool")
    src = ["--source", f"spool://{spool.root}"]
    bad = new_message("orders", b"x" * 50)
    (Path(spool.root) / "pending" / f"{bad.id}.zlm").write_bytes(b"ZLM\x01\xff\xfegarbage")
    (Path(spool.root) / "pending" / "notes.txt").write_text("hello")
    assert spool.recover().malformed == 2
    code, out = run("malformed", "list", *src)
    assert code == 0 and f"{bad.id}.zlm" in out and "notes.txt" in out and "2 malformed message(s)" in out
    code, out = run("malformed", "show", f"{bad.id}.zlm", *src, "--json")
    doc = json.loads(out)
    assert doc["bytes"] == 13 and "truncated" in doc["why"] and "content_hex" in doc
    code, out = run("malformed", "show", "notes.txt", *src)
    assert code == 0 and "hello" in out
    code, out = run("malformed", "retry", "notes.txt", *src)  # it cannot be sent: the refusal says why
    assert code == 2 and "cannot be retried" in out and "malformed purge NAME --yes" in out, out
    assert "No such command" not in out
    assert "notes.txt" in [os.path.basename(p) for p in spool.malformed_paths()]
    code, out = run("malformed", "purge", "nope.zlm", "--yes", *src)
    assert code == 2 and "no such file in malformed/" in out
    assert run("malformed", "purge", "notes.txt", "--yes", *src)[0] == 0
    assert [os.path.basename(p) for p in spool.malformed_paths()] == [f"{bad.id}.zlm"]
    assert run("malformed", "purge", "--all", "--yes", *src)[0] == 0
    assert spool.malformed_paths() == []
    spool.close()
