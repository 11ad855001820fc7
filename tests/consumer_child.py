"""A consumer process for tests/test_consumer_crash.py, killed and restarted by the test.

usage: python tests/consumer_child.py KAFKA_URL GROUP TOPIC DB_URL INBOX_TABLE EFFECTS_TABLE run|idle [retry]

Each message inserts one row into EFFECTS_TABLE in the inbox transaction. ``run`` consumes until
SIGTERM; ``idle`` until nothing arrived for 3 s. Logs (with assignments) go to stderr. With
``retry``, retries go through two retry topics and every message whose value is a multiple of 7
fails its first run.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import sqlalchemy as sa

from zeroloss.consumer import Consumer, Received
from zeroloss.inbox import SqlInbox


def main(argv: list[str]) -> int:
    url, group, topic, db_url, inbox_table, effects_table, mode, *retry = argv
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(process)d %(name)s %(message)s")
    logging.getLogger("zeroloss.consumer").setLevel(logging.DEBUG)  # the test counts "duplicate" lines
    inbox = SqlInbox(db_url, table=inbox_table)
    effects = sa.Table(effects_table, sa.MetaData(), autoload_with=inbox.engine)
    # Ten inbox transactions per consume() batch: a kill between one's commit and the batch's
    # offset commit leaves work done but not committed to Kafka, the window the tests must hit.
    consumer = Consumer(url, group, [topic], inbox, batch_size=100, transaction_batch=10,
                        config={"session.timeout.ms": 2000, "heartbeat.interval.ms": 500},
                        retry_delays_s=(0.2, 0.5) if retry else ())

    @consumer.handler
    def handle(msg: Received, tx: Any) -> None:
        if retry and int(msg.value or b"0") % 7 == 0 and msg.attempts == 1:
            raise RuntimeError("first run of a multiple of 7 fails")
        key = msg.key.decode() if msg.key is not None else None
        tx.execute(effects.insert(), {"msg_id": msg.id, "msg_key": key, "attempts": msg.attempts})

    if mode == "run":
        consumer.run()
    else:
        consumer.run_until_idle(idle_s=3.0, timeout_s=120)
    consumer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
