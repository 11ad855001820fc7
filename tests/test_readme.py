"""The README's five-minute tour, run as a reader would paste it (issue 15): every block whose info
string is ``python run`` or ``sh run``, in order, in an empty directory, against the embedded
broker. The blocks are read from README.md itself, so an edit that breaks the tour fails here.

What differs from a reader's run, and why: the broker is the test session's (its port replaces
127.0.0.1:9092), the topic and group get a unique suffix (other tests share that broker), and
``zeroloss broker &`` is not run (the fixture is that broker). Python blocks share one namespace,
as in one interpreter session; ``sh`` lines (``zeroloss`` commands only) run one by one, in this
process to save the interpreter's start-up, and must exit 0."""

from __future__ import annotations

import logging
import re
import shlex
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from zeroloss import logs
from zeroloss.cli import main
from zeroloss.embedded_broker import EmbeddedBroker

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"^```(python|sh) run\n(.*?)^```$", re.MULTILINE | re.DOTALL)

pytestmark = pytest.mark.kafka


def runnable_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of each block marked ``run``, in the README's order."""
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(text)]


def test_the_readme_marks_the_tour_runnable() -> None:
    blocks = runnable_blocks(README.read_text())
    assert [lang for lang, _ in blocks] == ["python", "python", "sh", "sh", "python"]
    assert "zeroloss relay" in blocks[2][1] and "Consumer(" in blocks[4][1]


def test_the_five_minute_tour_runs_as_pasted(
    kafka: EmbeddedBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    suffix = uuid.uuid4().hex[:8]
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "__readme__"}
    try:
        for lang, code in runnable_blocks(README.read_text()):
            code = code.replace("127.0.0.1:9092", kafka.bootstrap)
            if lang == "sh":
                for line in code.splitlines():
                    command = line.split("#", 1)[0].strip()
                    if not command or command.endswith("&"):
                        continue
                    argv = shlex.split(command)
                    assert argv[0] == "zeroloss", f"the tour runs only zeroloss commands: {command}"
                    done = CliRunner().invoke(main, argv[1:], catch_exceptions=False)  # in-process: no start-up
                    assert done.exit_code == 0, f"{command}\nexit {done.exit_code}\n{done.output}"
            else:
                code = code.replace('"orders"', f'"orders-{suffix}"').replace('"billing"', f'"billing-{suffix}"')
                exec(compile(code, f"README.md ({lang} block)", "exec", dont_inherit=True), namespace)
        with sqlite3.connect(tmp_path / "billing.db") as db:
            assert db.execute("SELECT order_id, customer, total FROM invoices ORDER BY order_id").fetchall() == [
                (1, "customer-7", 99.5),
                (2, "customer-8", 12),
            ]
        assert namespace["consumer"].counters.processed == 2
        said = capsys.readouterr().err  # what the reader sees: the consumer's lines, with time and level
        assert re.search(r"^\S+ \S+ INFO zeroloss.consumer.runtime: consumer started: kafka://", said, re.M), said
        assert re.search(r"INFO zeroloss.consumer.runtime: consumer billing-\w+ stopped after \S+: 2 processed", said)
    finally:
        undo_logging_setup()  # the consumer block's logging_setup(): the next tests in this worker have their own
        for value in namespace.values():  # what a script's exit would have closed
            if isinstance(value, sa.Engine):
                value.dispose()
            elif hasattr(value, "close") and type(value).__module__.startswith("zeroloss"):
                value.close()


def undo_logging_setup() -> None:
    """What ``zeroloss.logging_setup()`` left on the ``zeroloss`` logger: its handler and level."""
    ours = logging.getLogger("zeroloss")
    for h in [h for h in ours.handlers if getattr(h, logs._MARK, False)]:
        ours.removeHandler(h)
    ours.setLevel(logging.NOTSET)
