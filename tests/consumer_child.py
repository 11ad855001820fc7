"""A consumer process for tests/crash/test_consumer_crash.py and the chaos suite, killed and restarted
by the test.

usage: python tests/consumer_child.py KAFKA_URL GROUP TOPIC DB_URL INBOX_TABLE EFFECTS_TABLE run|idle [OPTION...]

Each message inserts one row into EFFECTS_TABLE in the inbox transaction. ``run`` consumes until
SIGTERM; ``idle`` until nothing arrived for 3 s. Logs (with assignments) go to stderr. Options:

* ``retry``: retries go through two retry topics and every message whose value is a multiple of 7
  fails its first run.
* ``transient=N``: every message whose value is ``1 (mod N)`` fails its first two runs and
  succeeds on the third (retried in place, short backoff).
* ``poison=N``: every message whose value is ``2 (mod N)`` raises PoisonMessage: dead-lettered at
  once, never an effect. Checked before ``transient``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import sqlalchemy as sa

from zeroloss.consumer import Consumer, PoisonMessage, Received
from zeroloss.inbox import SqlInbox


def is_transient(value: int, modulus: int) -> bool:
    return modulus > 0 and value % modulus == 1


def is_poison(value: int, modulus: int) -> bool:
    return modulus > 0 and value % modulus == 2


def main(argv: list[str]) -> int:
    url, group, topic, db_url, inbox_table, effects_table, mode, *options = argv
    retry = "retry" in options
    moduli = {k: int(v) for k, _, v in (o.partition("=") for o in options if "=" in o)}
    transient, poison = moduli.get("transient", 0), moduli.get("poison", 0)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(process)d %(name)s %(message)s")
    logging.getLogger("zeroloss.consumer").setLevel(logging.DEBUG)  # the test counts "duplicate" lines
    inbox = SqlInbox(db_url, table=inbox_table)
    effects = sa.Table(effects_table, sa.MetaData(), autoload_with=inbox.engine)
    # Ten inbox transactions per consume() batch: a kill between one's commit and the batch's
    # offset commit leaves work done but not committed to Kafka, the window the tests must hit.
    consumer = Consumer(
        url,
        group,
        [topic],
        inbox,
        batch_size=100,
        transaction_batch=10,
        config={"session.timeout.ms": 2000, "heartbeat.interval.ms": 500},
        retry_delays_s=(0.2, 0.5) if retry else (),
        backoff_base_s=0.05 if transient else 0.2,
    )

    @consumer.handler
    def handle(msg: Received, tx: Any) -> None:
        value = int(msg.value) if msg.value is not None and msg.value.isdigit() else None  # b"warm-up": never fails
        if retry and value is not None and value % 7 == 0 and msg.attempts == 1:
            raise RuntimeError("first run of a multiple of 7 fails")
        if value is not None and is_poison(value, poison):
            raise PoisonMessage(f"value {value} is poison (2 mod {poison})")
        if value is not None and is_transient(value, transient) and msg.attempts <= 2:
            raise RuntimeError(f"value {value}: transient failure {msg.attempts} of 2")
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
