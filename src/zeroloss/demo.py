"""``zeroloss demo``: the whole producer path on embedded defaults, with a crash in the middle.

A shop writes orders to SQLite, each with its outbox message in the same transaction; a relay
subprocess publishes them to an embedded broker, is SIGKILLed once part-way, and is restarted;
then a zeroloss Consumer bills every order through a SqlInbox (the relay's duplicates are
skipped), the topic is read back, and a ledger printed. Exit 1 on any loss or double effect.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Integer, MetaData, String, Table, func, select

from zeroloss.consumer import Consumer, Received
from zeroloss.embedded_broker import EmbeddedBroker
from zeroloss.inbox import SqlInbox
from zeroloss.outbox.base import State
from zeroloss.outbox.sql import SqlOutbox
from zeroloss.readback import read_topic

TOPIC = "orders"


def _relay(source: str, target: str, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "zeroloss", "-v", "relay", "--source", source, "--target", target,
           "--batch-size", "200", "--relay-id", "demo", "--lease-s", "4", "--timeout-s", "3"]
    # A short lease so the restarted relay takes over the killed one's claims within seconds.
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


def _wait(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"demo: timed out waiting for {what}")
        time.sleep(0.05)


def run_demo(orders: int = 3000, echo: Callable[[str], None] = print) -> int:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="zeroloss-demo-") as tmp, EmbeddedBroker() as broker:
        db = Path(tmp) / "shop.db"
        source = f"sqlite:///{db}"
        outbox = SqlOutbox(source)
        outbox.create_schema()
        shop = MetaData()
        orders_t = Table("orders", shop, Column("id", Integer, primary_key=True),
                         Column("customer", String(32)), Column("message_id", String(36)))
        invoices_t = Table("invoices", shop, Column("n", Integer, primary_key=True, autoincrement=True),
                           Column("message_id", String(36)), Column("customer", String(32)))
        shop.create_all(outbox.engine)
        echo(f"broker {broker.url}, shop database {db}")

        committed: list[str] = []

        def shop_writes() -> None:
            for i in range(orders):
                customer = f"customer-{i % 50}"
                with outbox.engine.begin() as conn:  # the order and its message: one transaction
                    mid = outbox.add(conn, topic=TOPIC, key=customer.encode(),
                                     value=json.dumps({"order": i, "customer": customer}).encode())
                    conn.execute(orders_t.insert().values(id=i, customer=customer, message_id=mid))
                committed.append(mid)

        writer = threading.Thread(target=shop_writes)
        writer.start()
        log = Path(tmp) / "relay.log"
        relay = _relay(source, broker.url, log)
        def delivered() -> int:
            return outbox.stats().counts[State.SUCCESS]

        _wait(lambda: delivered() >= orders // 3 or relay.poll() is not None, 120, "a third delivered")
        relay.send_signal(signal.SIGKILL)
        relay.wait()
        echo(f"relay SIGKILLed after {delivered()} of {orders} delivered; restarting it")
        relay = _relay(source, broker.url, log)
        writer.join()
        _wait(lambda: delivered() == orders or relay.poll() is not None, 120, "every order delivered")
        # A SIGTERM that lands before the restarted relay installed its handler would just kill
        # it; wait for its start-up line (the log then holds two) before asking it to drain.
        _wait(lambda: log.read_text(errors="replace").count("relay started") >= 2 or relay.poll() is not None,
              60, "the restarted relay to start")
        relay.send_signal(signal.SIGTERM)
        code = relay.wait(30)
        echo(f"relay drained and stopped on SIGTERM (exit {code})")

        # The consuming side: billing writes one invoice per order, in the same transaction as
        # its inbox row, so the relay's duplicates are skipped, never billed twice.
        inbox = SqlInbox(outbox.engine)
        inbox.create_schema()
        billing = Consumer(broker.url, group="billing", topics=[TOPIC], inbox=inbox,
                           config={"session.timeout.ms": 2000, "heartbeat.interval.ms": 500})

        @billing.handler
        def bill(msg: Received, tx: Any) -> None:
            order = json.loads(msg.value or b"{}")
            tx.execute(invoices_t.insert().values(message_id=msg.id, customer=order["customer"]))

        billing.run_until_idle(idle_s=3, timeout_s=120)
        billing.close()
        with outbox.engine.connect() as conn:
            effects = conn.execute(select(func.count()).select_from(invoices_t)).scalar_one()
            billed = conn.execute(select(func.count(func.distinct(invoices_t.c.message_id)))).scalar_one()

        seen = read_topic(broker.url, TOPIC, expect=committed, idle_s=5)
        lost = [m for m in committed if m not in seen.ids]
        out_of_order = sum(1 for ids in seen.order.values() if ids != sorted(ids))
        stats = outbox.stats()
        outbox.close()
        echo("")
        echo("ledger")
        echo(f"  orders committed         {len(committed)}")
        echo(f"  unique ids on the broker {len(seen.ids)}")
        echo(f"  lost                     {len(lost)}")
        echo(f"  duplicates on the broker {seen.duplicates}  (same zeroloss-id: a consumer's inbox drops them)")
        echo(f"  keys out of order        {out_of_order}")
        echo(f"  consumer: handled        {billing.counters.processed}, duplicates skipped by the inbox "
             f"{billing.counters.duplicates}")
        echo(f"  invoices (effects)       {effects}")
        echo(f"  orders never billed      {len(committed) - billed}")
        echo(f"  double effects           {effects - billed}")
        echo(f"  outbox: success={stats.counts[State.SUCCESS]} pending={stats.counts[State.PENDING]} "
             f"failed={stats.counts[State.FAILED]}")
        echo(f"  time                     {time.monotonic() - started:.1f}s")
        if lost:
            echo(f"LOST {len(lost)} messages, e.g. {lost[:3]}; relay log: {log}")
            echo("".join(log.read_text(errors="replace").splitlines(keepends=True)[-20:]))
            return 1
        ok = code == 0 and out_of_order == 0 and effects == billed == len(committed)
        return 0 if ok else 1
