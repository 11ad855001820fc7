"""``zeroloss relay --drain`` draws a progress bar where stderr is a terminal (a pseudo-terminal
here) and never where it is not (a pipe: logs, CI), where the plain log lines stay (issue 15)."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REDIS_URL, require_service, unique_topic
from zeroloss.outbox.spool import FileSpool

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
