"""``zeroloss demo``: the whole producer path, with a crash in the middle.

A shop writes orders to SQLite, each with its outbox message in the same transaction; a relay
subprocess publishes them to a broker, is SIGKILLed once part-way, and is restarted; then a
zeroloss Consumer bills every order through a SqlInbox (the relay's duplicates are skipped) and a
ledger is printed. Exit 1 on any loss or double effect.
The details: docs/design.md, "demo.py"."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Integer, MetaData, String, Table, func, select

from zeroloss.brokers.base import GroupAdmin, Reachable, TopicAdmin, TopicSpec
from zeroloss.consumer import Consumer, ConsumerSettings, Received
from zeroloss.embedded_broker import EmbeddedBroker
from zeroloss.errors import BrokerError, ConfigError
from zeroloss.inbox import SqlInbox
from zeroloss.outbox.base import State
from zeroloss.outbox.sql import SqlOutbox
from zeroloss.readback import read_topic
from zeroloss.registry import open_broker, safe_url, scheme_of

TOPIC = "orders"
# Tansu joins a group in session.timeout.ms / 2; a real Kafka refuses a session timeout below its
# group.min.session.timeout.ms (6 s by default), so these are for the embedded broker only.
EMBEDDED_GROUP_CONFIG = {"session.timeout.ms": 2000, "heartbeat.interval.ms": 500}
BROKER_NAMES = {
    "kafka": "Kafka",
    "amqp": "RabbitMQ",
    "amqps": "RabbitMQ",
    "nats": "NATS JetStream",
    "redis": "Redis Streams",
    "rediss": "Redis Streams",
    "rocketmq": "RocketMQ",
}
# What a dead endpoint's error adds for the servers this repository runs for trying zeroloss out.
SERVER_HINTS = {
    "rocketmq": "the repository's RocketMQ test server (rocketmq://127.0.0.1:18081?namesrv=127.0.0.1:19876) "
    "is started by: make services",
}

shop = MetaData()
orders_t = Table(
    "orders",
    shop,
    Column("id", Integer, primary_key=True),
    Column("customer", String(32)),
    Column("message_id", String(36)),
)
invoices_t = Table(
    "invoices",
    shop,
    Column("n", Integer, primary_key=True, autoincrement=True),
    Column("message_id", String(36)),
    Column("customer", String(32)),
    Column("order_no", Integer),
)


@dataclass(frozen=True, slots=True)
class Run:
    """Where this run's messages go."""

    url: str
    topic: str
    group: str
    relay_id: str
    consumer_config: dict[str, Any]


@dataclass(frozen=True, slots=True)
class BrokerView:
    """What reached the broker: read back (Kafka) or as the consumer received it (the others)."""

    ids: set[str]
    duplicates: int
    out_of_order: int  # keys whose messages are not in commit order
    source: str  # how these numbers were found, for the ledger
    duplicates_note: str


def _relay(source: str, run: Run, log: Path, batch_size: int) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "zeroloss",
        "-v",
        "relay",
        "--source",
        source,
        "--target",
        run.url,
        "--batch-size",
        str(batch_size),
        "--relay-id",
        run.relay_id,
        "--lease-s",
        "4",
        "--timeout-s",
        "3",
    ]
    # A short lease so the restarted relay takes over the killed one's claims within seconds.
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


def _wait(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"demo: timed out waiting for {what}")
        time.sleep(0.05)


def _out_of_order(by_key: dict[bytes, list[str]] | dict[str, list[int]]) -> int:
    """Keys whose sequence is not ascending (UUIDv7 ids and order numbers both grow with commit order)."""
    return sum(1 for seq in by_key.values() if list(seq) != sorted(seq))


def _rocketmq_view(run: Run) -> BrokerView:
    """The topic as the RocketMQ brokers keep it, pulled from every queue over the remoting protocol
    without a group (what ``zeroloss dlq`` reads with): a SimpleConsumer's acks remove nothing."""
    from zeroloss.brokers.rocketmq_reader import RocketMQReader

    copies: Counter[str] = Counter()
    by_key: dict[bytes, list[str]] = {}
    for stored in RocketMQReader(run.url).read(run.topic):  # oldest first; a key's messages share a queue
        mid = stored.id or ""
        copies[mid] += 1
        if copies[mid] == 1 and stored.key is not None:
            by_key.setdefault(stored.key, []).append(mid)
    return BrokerView(
        set(copies),
        copies.total() - len(copies),
        _out_of_order(by_key),
        "read back from the broker",
        "same zeroloss-id: a consumer's inbox drops them",
    )


def run_demo(orders: int = 3000, echo: Callable[[str], None] = print, target: str | None = None) -> int:
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        if target is None:
            url = stack.enter_context(EmbeddedBroker()).url
            run = Run(url, TOPIC, "billing", "demo", dict(EMBEDDED_GROUP_CONFIG))
        else:
            suffix = uuid.uuid4().hex[:8]
            run = Run(target, f"{TOPIC}-{suffix}", f"zeroloss-demo-{suffix}", f"demo-{suffix}", {})
        admin = open_broker(run.url, relay_id=run.relay_id, timeout_s=30)  # a bad URL stops here: exit 2
        stack.callback(admin.close)
        if not isinstance(admin, TopicAdmin):
            raise ConfigError(f"the demo cannot declare topics on {safe_url(run.url)}")
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="zeroloss-demo-"))
        echo(f"broker {safe_url(run.url)} ({BROKER_NAMES.get(scheme_of(run.url), '?')}), topic {run.topic}")
        if isinstance(admin, Reachable):  # else a dead endpoint shows only as the relay's 2-minute wait
            try:
                admin.check_reachable()  # before declaring, which would leave a topic behind
            except BrokerError as exc:
                hint = SERVER_HINTS.get(scheme_of(run.url))
                if hint is None:
                    raise
                raise BrokerError(f"{exc}; {hint}", retriable=exc.retriable) from exc
        for declared in admin.declare([run.topic], TopicSpec(group=run.group)):
            echo(f"  {declared}")
        code = _run(orders, run, Path(tmp), echo, started)
        if target is not None:
            if code == 0:
                admin.delete([run.topic])
                echo(f"removed {run.topic} and {run.topic}.dlq from the broker")
                if isinstance(admin, GroupAdmin):
                    admin.delete_group(run.group)
                    echo(f"removed consumer group {run.group} from the broker")
            else:
                group = f" and consumer group {run.group}" if isinstance(admin, GroupAdmin) else ""
                echo(f"kept {run.topic}{group} on the broker for inspection")
    return code


def _run(orders: int, run: Run, tmp: Path, echo: Callable[[str], None], started: float) -> int:
    db = tmp / "shop.db"
    source = f"sqlite:///{db}"
    outbox = SqlOutbox(source)
    try:
        outbox.create_schema()
        shop.create_all(outbox.engine)
        echo(f"shop database {db}")
        committed: list[str] = []

        def shop_writes() -> None:
            for i in range(orders):
                customer = f"customer-{i % 50}"
                with outbox.engine.begin() as conn:  # the order and its message: one transaction
                    mid = outbox.add(
                        conn,
                        topic=run.topic,
                        key=customer.encode(),
                        value=json.dumps({"order": i, "customer": customer}).encode(),
                    )
                    conn.execute(orders_t.insert().values(id=i, customer=customer, message_id=mid))
                committed.append(mid)

        writer = threading.Thread(target=shop_writes)
        writer.start()
        log = tmp / "relay.log"
        # Batches of a twentieth of the run, so the SIGKILL lands while batches are still going
        # out even when all orders are written before the relay has started.
        batch_size = min(200, max(10, orders // 20))
        relay = _relay(source, run, log, batch_size)

        def delivered() -> int:
            return outbox.stats().counts[State.SUCCESS]

        try:
            _wait(lambda: delivered() >= orders // 3 or relay.poll() is not None, 120, "a third delivered")
            relay.send_signal(signal.SIGKILL)
            relay.wait()
            echo(f"relay SIGKILLed after {delivered()} of {orders} delivered; restarting it")
            relay = _relay(source, run, log, batch_size)
            writer.join()
            _wait(lambda: delivered() == orders or relay.poll() is not None, 120, "every order delivered")
            # A SIGTERM that lands before the restarted relay installed its handler would just kill
            # it; wait for its start-up line (the log then holds two) before asking it to drain.
            _wait(
                lambda: log.read_text(errors="replace").count("relay started") >= 2 or relay.poll() is not None,
                60,
                "the restarted relay to start",
            )
            relay.send_signal(signal.SIGTERM)
            code = relay.wait(30)
        finally:
            if relay.poll() is None:
                relay.kill()
                relay.wait()
            writer.join()
        echo(f"relay drained and stopped on SIGTERM (exit {code})")

        # The consuming side: billing writes one invoice per order, in the same transaction as
        # its inbox row, so the relay's duplicates are skipped, never billed twice.
        inbox = SqlInbox(outbox.engine)
        inbox.create_schema()
        billing = Consumer(run.url, run.group, [run.topic], inbox, ConsumerSettings(config=run.consumer_config))

        @billing.handler
        def bill(msg: Received, tx: Any) -> None:
            order = json.loads(msg.value or b"{}")
            tx.execute(
                invoices_t.insert().values(message_id=msg.id, customer=order["customer"], order_no=order["order"])
            )

        try:
            billing.run_until_idle(idle_s=3, timeout_s=120)
        finally:
            billing.close()
        with outbox.engine.connect() as conn:
            effects = conn.execute(select(func.count()).select_from(invoices_t)).scalar_one()
            billed = conn.execute(select(func.count(func.distinct(invoices_t.c.message_id)))).scalar_one()
            by_customer: dict[str, list[int]] = {}
            for customer, order_no in conn.execute(
                select(invoices_t.c.customer, invoices_t.c.order_no).order_by(invoices_t.c.n)
            ):
                by_customer.setdefault(customer, []).append(order_no)
            claimed = set(
                conn.execute(select(inbox.table.c.message_id).where(inbox.table.c.group_name == run.group)).scalars()
            )

        if scheme_of(run.url) == "kafka":
            seen = read_topic(run.url, run.topic, expect=committed, idle_s=5)
            view = BrokerView(
                set(seen.ids),
                seen.duplicates,
                _out_of_order(seen.order),
                "read back from the broker",
                "same zeroloss-id: a consumer's inbox drops them",
            )
        elif scheme_of(run.url) == "rocketmq":
            view = _rocketmq_view(run)
        else:
            name = BROKER_NAMES.get(scheme_of(run.url), "this broker")
            view = BrokerView(
                claimed,
                billing.counters.duplicates,
                _out_of_order(by_customer),
                f"as the consumer received them: the demo reads only Kafka and RocketMQ back, not {name}",
                "copies the consumer received; its inbox dropped them",
            )
        lost = [m for m in committed if m not in view.ids]
        stats = outbox.stats()
        echo("")
        echo("ledger")
        echo(f"  orders committed         {len(committed)}")
        echo(f"  unique ids on the broker {len(view.ids)}  ({view.source})")
        echo(f"  lost                     {len(lost)}")
        echo(f"  duplicates on the broker {view.duplicates}  ({view.duplicates_note})")
        echo(f"  keys out of order        {view.out_of_order}")
        echo(
            f"  consumer: handled        {billing.counters.processed}, duplicates skipped by the inbox "
            f"{billing.counters.duplicates}"
        )
        echo(f"  invoices (effects)       {effects}")
        echo(f"  orders never billed      {len(committed) - billed}")
        echo(f"  double effects           {effects - billed}")
        echo(f"  effects out of key order {_out_of_order(by_customer)}")
        echo(
            f"  outbox: success={stats.counts[State.SUCCESS]} pending={stats.counts[State.PENDING]} "
            f"failed={stats.counts[State.FAILED]}"
        )
        echo(f"  time                     {time.monotonic() - started:.1f}s")
        if lost:
            echo(f"LOST {len(lost)} messages, e.g. {lost[:3]}; relay log: {log}")
            echo("".join(log.read_text(errors="replace").splitlines(keepends=True)[-20:]))
            return 1
        ok = (
            code == 0
            and view.out_of_order == 0
            and _out_of_order(by_customer) == 0
            and effects == billed == len(committed)
        )
        return 0 if ok else 1
    finally:
        outbox.close()
