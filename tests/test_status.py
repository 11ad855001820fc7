"""`zeroloss status`: the verdict rules, and the exit code as a probe (0 ok, 1 warn, 2 critical)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from zeroloss.cli import main
from zeroloss.errors import StoreSetupError
from zeroloss.outbox.base import State, Stats
from zeroloss.outbox.spool import FileSpool
from zeroloss.outbox.sql import SqlOutbox
from zeroloss.registry import open_store
from zeroloss.status import Level, Thresholds, assess


def stats(**kw: object) -> Stats:
    counts = dict.fromkeys(State, 0)
    counts.update(kw.pop("counts", {}))  # type: ignore[call-overload]
    return Stats(counts=counts, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("reading", "level", "needle"),
    [
        (stats(), Level.OK, None),
        (stats(counts={State.FAILED: 2}, parked=3), Level.CRITICAL, "2 failed"),
        (stats(counts={State.DOUBT: 1}), Level.CRITICAL, "doubt"),
        (stats(counts={State.MALFORMED: 1}), Level.CRITICAL, "malformed"),
        (stats(disk_free_bytes=5, disk_total_bytes=100), Level.CRITICAL, "95% used"),
        (stats(disk_free_bytes=15, disk_total_bytes=100), Level.WARN, "85% used"),
        (stats(disk_free_bytes=25, disk_total_bytes=100), Level.OK, None),
        (stats(oldest_pending_age_s=301.0), Level.WARN, "oldest pending"),
        (stats(oldest_pending_age_s=1201.0), Level.CRITICAL, "4 x"),
        (stats(oldest_pending_age_s=299.0), Level.OK, None),
        (stats(expired_leases=1), Level.WARN, "expired lease"),
        (stats(oldest_age_s={State.TMP: 400.0}), Level.WARN, "tmp files"),
        (stats(extra={"unknown_states": {"weird": 1}}), Level.WARN, "weird"),
    ],
)
def test_verdict_rules(reading: Stats, level: Level, needle: str | None) -> None:
    v = assess(reading)
    assert v.level is level, v.reasons
    if needle is None:
        assert v.reasons == []
    else:
        assert any(needle in r for r in v.reasons), v.reasons


def test_the_worst_reason_decides_and_every_reason_is_listed() -> None:
    v = assess(
        stats(counts={State.FAILED: 1}, expired_leases=2, oldest_pending_age_s=10.0), Thresholds(max_pending_age_s=5)
    )
    assert v.level is Level.CRITICAL
    assert [r.split(":")[0] for r in v.reasons] == ["critical", "warn", "warn"]


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_exit_code_follows_the_verdict(tmp_path: Path) -> None:
    source = f"spool://{tmp_path / 'spool'}"
    spool = FileSpool(tmp_path / "spool")
    code, out = run("status", "--source", source)
    assert code == 0, out
    assert "verdict: ok" in out
    with spool.transaction() as tx:
        tx.add(topic="t", value=b"a")
    spool.claim(1, lease_s=0)  # a lease that has already expired: a relay died holding it
    code, out = run("status", "--source", source)
    assert code == 1, out
    assert "expired lease" in out
    with spool.transaction() as tx:
        tx.add(topic="t", value=b"b")
    [m] = spool.claim(1, lease_s=30)
    spool.fail([replace(m, attempts=3, last_error="boom")])
    code, out = run("status", "--source", source, "--json")
    assert code == 2, out
    doc = json.loads(out)
    assert doc["verdict"] == "critical"
    assert doc["counts"]["failed"] == 1 and doc["counts"]["sending"] == 1
    assert set(doc["oldest_age_s"]) == {"failed", "sending"}
    assert 0 < doc["disk_used_pct"] < 100
    assert any("zeroloss failed list" in r for r in doc["reasons"])
    spool.close()


def test_an_unreadable_store_is_critical_and_says_what_to_do(tmp_path: Path) -> None:
    code, out = run("status", "--source", f"sqlite:///{tmp_path / 'nothing.db'}", "--json")
    assert code == 2
    doc = json.loads(out)
    assert doc["verdict"] == "critical" and "zeroloss init" in doc["reasons"][0]
    assert "no SQLite database at" in doc["reasons"][0] and not (tmp_path / "nothing.db").exists()


def test_the_help_explains_that_2_is_also_bad_usage() -> None:
    code, out = run("status", "--help")
    assert code == 0
    assert "0 ok, 1 warn, 2 critical" in out and "bad usage" in out


def test_watch_refreshes_until_ctrl_c_and_exits_with_the_last_verdict(tmp_path: Path) -> None:
    spool = FileSpool(tmp_path / "spool")
    with spool.transaction() as tx:
        tx.add(topic="t", value=b"x")
    [m] = spool.claim(1, lease_s=30)
    spool.fail([m])
    out_path = tmp_path / "out.jsonl"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "zeroloss",
                "status",
                "--source",
                f"spool://{tmp_path / 'spool'}",
                "--json",
                "--watch-s",
                "0.1",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while len(out_path.read_text().splitlines()) < 3:
            assert proc.poll() is None, out_path.read_text()
            assert time.monotonic() < deadline, "no refreshes"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    frames = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert all(f["verdict"] == "critical" and f["counts"]["failed"] == 1 for f in frames)
    spool.close()
    assert os.path.exists(tmp_path / "spool" / "failed")


@pytest.mark.parametrize(
    "form",
    ["sqlite:///file:{db}?uri=true", "sqlite:///file://{db}?uri=true", "sqlite:///file:{db}?uri=true&mode=rwc"],
)
def test_a_sqlite_uri_filename_that_is_not_there_is_refused_and_not_made(tmp_path: Path, form: str) -> None:
    # sqlite3 creates the file of a URI filename (?uri=true) as of a plain path: a typo there must
    # not become an empty database either
    db = tmp_path / "typo.db"
    with pytest.raises(StoreSetupError, match="no SQLite database at"):
        open_store(form.format(db=db))
    assert not db.exists()


def test_a_sqlite_uri_filename_that_is_there_or_in_memory_opens(tmp_path: Path) -> None:
    db = tmp_path / "there.db"
    SqlOutbox(f"sqlite:///{db}").create_schema()
    open_store(f"sqlite:///file:{db}?uri=true").stats()
    open_store("sqlite:///file::memory:?uri=true")
