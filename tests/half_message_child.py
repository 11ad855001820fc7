"""A producer process for tests/test_half_messages.py's crash tests.

usage: python tests/half_message_child.py MODE ROCKETMQ_URL TOPIC DB_URL TABLE EFFECTS_TABLE

MODE ``after-local-commit``: send one half message, commit the local transaction (an effects row
and the half-message row), then SIGKILL this process where zeroloss would commit the half message.
MODE ``before-local-commit``: the same, killed at the local COMMIT (before it reaches the database).
MODE ``checker``: only answer check-backs for TOPIC from TABLE, until SIGTERM.

The first line printed is ``id <zeroloss id>`` (sending modes) or ``ready`` (checker).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from zeroloss.half_messages import HalfMessageProducer, HalfMessageTable
from zeroloss.half_messages import producer as half_messages  # where send() takes uuid7 from


def _kill_me(*_: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str]) -> int:
    mode, url, topic, db_url, table_name, effects_name = argv
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(process)d %(name)s %(message)s")
    table = HalfMessageTable(db_url, table=table_name)
    effects = sa.Table(effects_name, sa.MetaData(), autoload_with=table.engine)
    if mode == "checker":
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with HalfMessageProducer(url, [topic], table):
            print("ready", flush=True)
            stop.wait()
        return 0
    make_id = half_messages.uuid7  # type: ignore[attr-defined]

    def announced_id() -> str:  # the id, printed before anything is sent, so the test knows it
        value = make_id()
        print(f"id {value}", flush=True)
        return value

    half_messages.uuid7 = announced_id  # type: ignore[attr-defined]
    if mode == "after-local-commit":
        from rocketmq.v5.producer.producer import Transaction

        Transaction.commit = _kill_me
    elif mode == "before-local-commit":
        event.listen(table.engine, "commit", _kill_me)  # runs before SQLAlchemy sends COMMIT
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    with HalfMessageProducer(url, [topic], table) as producer:
        producer.send(topic, b"crash", lambda conn: conn.execute(effects.insert().values(note=mode)))
    raise SystemExit("not killed")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
