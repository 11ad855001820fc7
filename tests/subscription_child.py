"""A consumer process for tests/crash/test_subscription_crash.py (RabbitMQ, NATS, Redis sources).

usage: python tests/subscription_child.py URL GROUP TOPIC DB_URL INBOX_TABLE EFFECTS_TABLE CONFIG_JSON

Each message inserts one row into EFFECTS_TABLE in the inbox transaction; runs until SIGTERM.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import sqlalchemy as sa

from zeroloss.consumer import Consumer, Received
from zeroloss.inbox import SqlInbox


def main(argv: list[str]) -> int:
    url, group, topic, db_url, inbox_table, effects_table, config = argv
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(process)d %(name)s %(message)s")
    logging.getLogger("zeroloss.brokers.subscription").setLevel(logging.DEBUG)
    inbox = SqlInbox(db_url, table=inbox_table)
    effects = sa.Table(effects_table, sa.MetaData(), autoload_with=inbox.engine)
    consumer = Consumer(url, group, [topic], inbox, batch_size=50, config=json.loads(config))

    @consumer.handler
    def handle(msg: Received, tx: Any) -> None:
        key = msg.key.decode() if msg.key is not None else None
        tx.execute(effects.insert(), {"msg_id": msg.id, "msg_key": key, "attempts": msg.attempts})

    logging.getLogger("zeroloss.test").info("consumer started")
    consumer.run()
    consumer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
