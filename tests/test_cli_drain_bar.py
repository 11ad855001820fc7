"""``zeroloss relay --drain`` draws a progress bar where stderr is a terminal (a pseudo-terminal
here) and never where it is not (a pipe: logs, CI), where the plain log lines stay (issue 15)."""

from __future__ import annotations

import logging
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REDIS_URL, require_service, unique_topic
from zeroloss.cli import drain_bar
from zeroloss.outbox.spool import FileSpool
from zeroloss.relay import RelayProgress

MESSAGES = 600
BAR_DONE = re.compile(rf"\r\x1b\[\?25lrelaying\s+\[#+\]\s+{MESSAGES}/{MESSAGES}\s+100%\s+\d+/s")


def _spool(tmp_path: Path) -> str:
    root = tmp_path / "spool"
    spool = FileSpool(root)
    topic = unique_topic("bar")
    for start in range(0, MESSAGES, 200):
        with spool.transaction() as tx:
            for i in range(start, start + 200):
                tx.add(topic=topic, value=b"v%d" % i)
    spool.close()
    return f"spool://{root}"


def _relay(source: str, *, tty: bool) -> tuple[int, str]:
    """The real command, its stdout and stderr on a pseudo-terminal or a pipe: (exit code, output)."""
    argv = [sys.executable, "-m", "zeroloss", "relay", "--source", source, "--target", REDIS_URL, "--drain"]
    env = {**os.environ, "TERM": "xterm"}  # the bar is not drawn on a dumb terminal
    if not tty:
        done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
        return done.returncode, done.stdout + done.stderr
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 1.0)[0]:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        return proc.wait(timeout=30), out.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def test_relay_drain_draws_a_bar_on_a_terminal_and_plain_lines_elsewhere(tmp_path: Path) -> None:
    require_service("redis")
    code, shown = _relay(_spool(tmp_path), tty=True)
    assert code == 0, shown
    assert BAR_DONE.search(shown), shown  # done/total, percent, rate: the last frame, drawn before the summary
    assert "\x1b[?25h" in shown.rsplit("relay stopped", 1)[1], shown  # the cursor click hid is shown again
    assert re.search(r"100%[^\n]*\r?\n\d{4}-\S+ [\d:,]+ INFO zeroloss.relay: relay stopped after", shown), shown
    assert "relay progress:" not in shown  # the bar instead of the line

    code, logged = _relay(_spool(tmp_path / "again"), tty=False)
    assert code == 0, logged
    assert "relaying" not in logged and "\r" not in logged and "\x1b" not in logged, logged
    assert "relay started (until drained)" in logged and "relay stopped after" in logged
    assert f"{MESSAGES} delivered" in logged


def _read_all(fd: int) -> str:
    out = b""
    while select.select([fd], [], [], 0.2)[0]:
        out += os.read(fd, 65536)
    return out.decode()


def test_a_log_line_while_the_bar_is_drawn_keeps_both_and_only_a_default_level_terminal_gets_a_bar(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In this process, on a pseudo-terminal: an outage's WARNING ends the bar's line first (the
    bar, with 'broker down', stays above it and is drawn again below; delivered and failed count
    as done); and when a bar is wanted."""
    master, slave = pty.openpty()
    terminal = os.fdopen(slave, "w")
    handler = logging.StreamHandler(terminal)
    ours = logging.getLogger("zeroloss")
    ours.addHandler(handler)
    level = ours.level
    try:
        ours.setLevel(logging.INFO)
        monkeypatch.setenv("TERM", "xterm")
        assert drain_bar.wanted(True, 10, terminal)
        assert not drain_bar.wanted(False, 10, terminal)  # a relay that runs forever has no total
        assert not drain_bar.wanted(True, 0, terminal)  # --progress-s 0: nothing
        ours.setLevel(logging.DEBUG)  # -v
        assert not drain_bar.wanted(True, 10, terminal)
        ours.setLevel(logging.INFO)
        monkeypatch.setenv("TERM", "dumb")
        assert not drain_bar.wanted(True, 10, terminal)

        with drain_bar.drain_bar(terminal) as bar:
            bar.show(RelayProgress(100, 50.0, 0, 900, 3.0, 0, None, ""))
            bar.show(RelayProgress(100, 0.0, 0, 900, 5.0, 0, 12.0, "connection refused"))
            logging.getLogger("zeroloss.relay").warning("broker unavailable (connection refused)")
            bar.show(RelayProgress(400, 60.0, 2, 600, 1.0, 2, None, ""))
        terminal.flush()
        shown = _read_all(master)
    finally:
        ours.removeHandler(handler)
        ours.setLevel(level)
        terminal.close()
        os.close(master)
    first, rest = shown.split("broker unavailable (connection refused)", 1)
    assert re.search(r"100/1000\s+10%.*broker down 12s\r?\n$", first), repr(first)  # ended, not overwritten
    assert re.search(r"^\r?\n\r\x1b\[\?25lrelaying .*402/1002\s+40%.*2 failed\s*\x1b\[\?25h\r?\n$", rest), repr(rest)
