"""A ``zeroloss relay`` as a child process, for the tests that SIGKILL it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import OutboxHarness


def source_url(h: OutboxHarness) -> str:
    if h.kind == "spool":
        return f"spool://{h.store.root}"
    url: str = h.store.engine.url.render_as_string(hide_password=False)
    return url


def start_relay(source: str, target: str, log: Path, table: str | None) -> subprocess.Popen[bytes]:
    env = {**os.environ}
    if table:
        env["ZEROLOSS_TABLE"] = table
    cmd = [
        sys.executable,
        "-m",
        "zeroloss",
        "-v",
        "relay",
        "--source",
        source,
        "--target",
        target,
        "--batch-size",
        "100",
        "--lease-s",
        "3",
        "--timeout-s",
        "2.5",
        "--relay-id",
        "crash",
    ]
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
