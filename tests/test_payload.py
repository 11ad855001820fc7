"""Typed payloads (issue 15): ``add(value=obj)`` encodes JSON or text with a ``content-type`` header,
bytes pass untouched; ``msg.json()``, ``msg.decode(Model)`` and ``@consumer.handler(model=Order)``
read them back; a value that cannot be read is poison, dead-lettered at once with the reason."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import json
import uuid
from pathlib import Path
from typing import Any

import pydantic
import pytest
import sqlalchemy as sa

from tests.conftest import PG_URL, require_service, unique_topic
from zeroloss import Consumer, FileSpool, PoisonMessage, Received, Relay, SqlInbox, SqlOutbox, dlq, open_broker
from zeroloss.embedded_broker import EmbeddedBroker
from zeroloss.errors import MessageError
from zeroloss.message import new_message
from zeroloss.relay import RelaySettings

FAST_GROUP = {"session.timeout.ms": 2000, "heartbeat.interval.ms": 500}


class Order(pydantic.BaseModel):
    id: int
    total: decimal.Decimal
    customer: str


@dataclasses.dataclass
class Refund:
    order_id: int
    reason: str


class Color(enum.Enum):
    RED = "red"


def received(msg: Any) -> Received:
    return Received(msg.id, msg.topic, 0, 0, msg.key, msg.value, msg.headers)


def test_values_are_encoded_by_type_and_labelled() -> None:
    raw = new_message("t", b"\x00raw", key="customer-7")
    assert raw.value == b"\x00raw" and raw.key == b"customer-7"
    assert raw.header("content-type") is None  # bytes: the app's own format, nothing added

    text = new_message("t", "héllo")
    assert text.value == "héllo".encode() and text.header("content-type") == b"text/plain; charset=utf-8"

    when = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)
    doc = new_message(
        "t",
        {
            "at": when,
            "id": uuid.UUID(int=1),
            "n": decimal.Decimal("1.50"),
            "c": Color.RED,
            "tags": {"a"},
            "refund": Refund(1, "late"),
            "order": Order(id=1, total=decimal.Decimal(2), customer="c"),
        },
    )
    assert doc.header("content-type") == b"application/json"
    assert json.loads(doc.value) == {
        "at": "2026-11-30T12:00:00+00:00",
        "id": "00000000-0000-0000-0000-000000000001",
        "n": "1.50",
        "c": "red",
        "tags": ["a"],
        "refund": {"order_id": 1, "reason": "late"},
        "order": {"id": 1, "total": "2", "customer": "c"},
    }

    model = new_message("t", Order(id=7, total=decimal.Decimal("9.90"), customer="c"))
    assert json.loads(model.value) == {"id": 7, "total": "9.90", "customer": "c"}
    assert new_message("t", [1, 2]).value == b"[1,2]"

    own = new_message("t", {"a": 1}, headers={"Content-Type": b"application/vnd.shop+json"})
    assert [v for k, v in own.headers if k.lower() == "content-type"] == [b"application/vnd.shop+json"]


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (object(), "value of type object cannot be sent as JSON"),
        ({"x": float("inf")}, "cannot be sent as JSON"),
        (None, "value is None"),
        ("\ud800", "value is not valid Unicode"),
    ],
)
def test_a_value_that_cannot_be_encoded_is_refused_at_add(value: object, words: str) -> None:
    with pytest.raises(MessageError, match=words):
        new_message("t", value)


def test_the_consumer_side_reads_json_text_and_models_or_says_why_not() -> None:
    good = received(new_message("t", {"id": 3, "total": "4.5", "customer": "c"}))
    assert good.content_type == "application/json"
    assert good.json() == {"id": 3, "total": "4.5", "customer": "c"}
    assert good.decode(Order) == Order(id=3, total=decimal.Decimal("4.5"), customer="c")
    assert received(new_message("t", {"order_id": 1, "reason": "r"})).decode(Refund) == Refund(1, "r")
    assert received(new_message("t", "plain")).text() == "plain"

    for value, method, words in [
        (b"{not json", "json", "the value is not JSON"),
        (b"\xff\xfe", "json", "not UTF-8"),
        (b"\xff", "text", "not UTF-8"),
        ({"id": "x", "total": 1, "customer": "c"}, Order, "not a valid Order"),
        ([1, 2], Refund, "a JSON list, not an object with the fields of Refund"),
        ({"order_id": 1}, Refund, "not a valid Refund"),
    ]:
        msg = received(new_message("t", value))
        with pytest.raises(PoisonMessage, match=words) as caught:
            msg.decode(method) if isinstance(method, type) else getattr(msg, str(method))()
        assert msg.id in str(caught.value)


@pytest.mark.kafka
@pytest.mark.postgres
def test_typed_orders_go_from_add_to_a_model_handler_and_bad_ones_are_dead_lettered(
    kafka: EmbeddedBroker, tmp_path: Path
) -> None:
    require_service("postgres")
    topic = unique_topic("typed")
    outbox = SqlOutbox(
        sa.create_engine(sa.make_url(PG_URL).set(drivername="postgresql+psycopg")),
        table=f"zl_typed_{uuid.uuid4().hex[:8]}",
    )
    spool = FileSpool(tmp_path / "spool")
    inbox = SqlInbox(f"sqlite:///{tmp_path / 'billing.db'}")
    outbox.create_schema()
    inbox.create_schema()
    try:
        with outbox.engine.begin() as conn:
            good = outbox.add(
                conn,
                topic=topic,
                key="customer-7",
                value=Order(id=1, total=decimal.Decimal("9.90"), customer="customer-7"),
            )
            outbox.add(conn, topic=topic, key="customer-8", value={"id": "not a number", "total": 1, "customer": "c"})
            outbox.add(conn, topic=topic, key="customer-9", value=b"<xml/>")
        with spool.transaction() as tx:
            tx.add(topic=topic, key="customer-7", value={"id": 2, "total": "5", "customer": "customer-7"})
        for store in (outbox, spool):
            broker = open_broker(kafka.url)
            try:
                Relay(store, broker, RelaySettings(backoff_base_s=0.01)).drain(timeout_s=60)
            finally:
                broker.close()

        seen: list[Order] = []  # every call, rolled-back runs of a shared transaction included
        bills = sa.Table(
            "bills",
            sa.MetaData(),
            sa.Column("order_id", sa.Integer, primary_key=True),
            sa.Column("total", sa.String(20)),
        )
        bills.create(inbox.engine)
        consumer = Consumer(
            kafka.url,
            group=f"g-{topic}",
            topics=[topic],
            inbox=inbox,
            config=FAST_GROUP,
            backoff_base_s=0.01,
            parked_dir=tmp_path / "parked",
        )

        @consumer.handler(model=Order)
        def bill(order: Order, tx: sa.Connection) -> None:
            assert isinstance(order, Order)
            seen.append(order)
            tx.execute(bills.insert(), {"order_id": order.id, "total": str(order.total)})

        assert bill.__name__ == "bill"  # the decorator returns the function as written
        try:
            consumer.run_until_idle(idle_s=1.0, timeout_s=90)
        finally:
            consumer.close()
        assert {o.id for o in seen} == {1, 2}
        with inbox.engine.connect() as conn:
            assert sorted(conn.execute(sa.select(bills)).all()) == [(1, "9.90"), (2, "5")]
        assert consumer.counters.processed == 2 and consumer.counters.dead_lettered == 2
        assert consumer.counters.retries == 0  # poison: never retried
        letters = {d.key: d for d in dlq.list_dead_letters(kafka.url, topic)}
        assert set(letters) == {b"customer-8", b"customer-9"}
        assert all(d.error_type == "PoisonMessage" and d.attempts == 1 for d in letters.values())
        assert "not a valid Order" in letters[b"customer-8"].error_message
        assert "not a valid Order" in letters[b"customer-9"].error_message  # pydantic: "Invalid JSON"
        assert good not in {d.id for d in letters.values()}
    finally:
        outbox.drop_schema()
        outbox.close()
        outbox.engine.dispose()
        spool.close()
        inbox.drop_schema()
        inbox.close()
