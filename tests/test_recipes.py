"""The recipes of docs/recipes/ run (issue 15): the code in examples/, against PostgreSQL and the
embedded broker, from an HTTP request to the consumer's effect."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.conftest import PG_URL, require_service, unique_topic
from zeroloss import Relay, SqlInbox, SqlOutbox, open_broker, tracing
from zeroloss.embedded_broker import EmbeddedBroker
from zeroloss.errors import ConfigError
from zeroloss.message import new_message
from zeroloss.outbox.base import OutboxStore, State
from zeroloss.relay import RelaySettings
from zeroloss.sqlurl import normalize_url

pytestmark = pytest.mark.kafka
ROOT = Path(__file__).resolve().parent.parent
FAST_GROUP = {"session.timeout.ms": 2000, "heartbeat.interval.ms": 500}  # Tansu joins in session/2


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A PostgreSQL database of its own (the recipes' tables have the plain names an app uses)."""
    require_service("postgres")
    name = f"zl_recipe_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(normalize_url(PG_URL), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        yield sa.make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


def relay_all(store: OutboxStore, kafka: EmbeddedBroker) -> None:
    broker = open_broker(kafka.url)
    try:
        Relay(store, broker, RelaySettings(backoff_base_s=0.01)).drain(timeout_s=60)
    finally:
        broker.close()


@pytest.mark.postgres
def test_fastapi_orders_are_billed_once_through_the_orm(kafka: EmbeddedBroker, pg_database: str) -> None:
    from examples import fastapi_orders as recipe
    from fastapi.testclient import TestClient

    topic = unique_topic("orders")
    app = recipe.create_app(pg_database)
    outbox = app.state.outbox
    try:
        with TestClient(app) as client:
            # the recipe's topic is "orders"; the test session's broker is shared, so it gets its own
            made = [client.post("/orders", json={"customer": f"c{i}", "total": "9.90"}) for i in range(3)]
            refused = client.post("/orders", json={"customer": "c9", "total": "not a number"})
        assert [r.status_code for r in made] == [201, 201, 201] and refused.status_code == 422
        assert outbox.stats().counts[State.PENDING] == 3  # and not the refused one
        with app.state.engine.begin() as conn:
            conn.execute(outbox.table.update().values(topic=topic))
        relay_all(outbox, kafka)

        consumer = recipe.billing(kafka.url, pg_database, topic=topic, group=f"billing-{topic}")
        consumer.conf.update(FAST_GROUP)
        try:
            consumer.run_until_idle(idle_s=1.0, timeout_s=90)
        finally:
            consumer.close()
            consumer.inbox.engine.dispose()  # type: ignore[union-attr]  # the recipe's engine: the app's to dispose
        with app.state.engine.connect() as conn:
            invoices = conn.execute(sa.text("SELECT order_id, customer, total FROM invoices ORDER BY order_id")).all()
        assert invoices == [(r.json()["id"], r.json()["customer"], Decimal("9.90")) for r in made]
        assert consumer.counters.processed == 3 and consumer.counters.dead_lettered == 0
    finally:
        outbox.close()
        app.state.engine.dispose()


def _sqlite_outbox(tmp_path: Path) -> SqlOutbox:
    outbox = SqlOutbox(f"sqlite:///{tmp_path / 'shop.db'}")
    outbox.create_schema()
    return outbox


def test_the_trace_goes_from_the_request_through_the_broker_to_the_handler(
    kafka: EmbeddedBroker, tmp_path: Path
) -> None:
    from examples import traced_orders as recipe
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    if not isinstance(trace.get_tracer_provider(), TracerProvider):  # set once per process (OpenTelemetry's rule)
        trace.set_tracer_provider(provider)
    else:
        trace.get_tracer_provider().add_span_processor(SimpleSpanProcessor(exporter))  # type: ignore[attr-defined]
    topic = unique_topic("traced")
    outbox = _sqlite_outbox(tmp_path)
    inbox = SqlInbox(f"sqlite:///{tmp_path / 'billing.db'}")
    inbox.create_schema()
    try:
        mid = recipe.place_order(outbox, 7, "customer-7")
        with outbox.engine.begin() as conn:
            conn.execute(outbox.table.update().values(topic=topic))
        (sent,) = outbox.list(State.PENDING)
        assert (sent.header("traceparent") or b"").startswith(b"00-")
        relay_all(outbox, kafka)
        consumer = recipe.traced_billing(kafka.url, inbox, topic=topic, group=f"g-{topic}", config=FAST_GROUP)
        try:
            consumer.run_until_idle(idle_s=1.0, timeout_s=90)
        finally:
            consumer.close()
        assert consumer.counters.processed == 1
        spans = {s.name: s for s in exporter.get_finished_spans()}
        request, handled = spans["POST /orders"], spans[f"process {topic}"]
        assert handled.context.trace_id == request.context.trace_id
        assert handled.parent is not None and handled.parent.span_id == request.context.span_id
        assert handled.kind == trace.SpanKind.CONSUMER
        assert handled.attributes is not None and handled.attributes["messaging.message.id"] == mid
        assert handled.attributes["order.id"] == 7
    finally:
        exporter.shutdown()  # later tests' spans are not kept
        outbox.close()
        inbox.close()


def test_without_opentelemetry_nothing_is_added(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # import opentelemetry → ImportError
    tracing._api.cache_clear()
    try:
        msg = new_message("t", b"v")
        assert msg.headers == ()
        with tracing.handling("t", msg.id, msg.headers):
            pass
    finally:
        tracing._api.cache_clear()


def test_an_async_handler_runs_in_the_inbox_transaction_from_an_asyncio_app(
    kafka: EmbeddedBroker, tmp_path: Path
) -> None:
    from examples import async_handler as recipe

    topic = unique_topic("async")
    outbox = _sqlite_outbox(tmp_path)
    inbox = SqlInbox(f"sqlite:///{tmp_path / 'billing.db'}")
    inbox.create_schema()
    with inbox.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE invoices (order_id INTEGER PRIMARY KEY, total_eur REAL)"))
    try:
        with outbox.engine.begin() as conn:
            outbox.add(conn, topic=topic, key="c", value={"id": 1, "total": 10.0, "currency": "USD"})
            outbox.add(conn, topic=topic, key="c", value={"id": 2, "total": 5.0, "currency": "EUR"})
            outbox.add(conn, topic=topic, key="d", value={"id": 3, "total": 5.0, "currency": "XXX"})  # KeyError
        relay_all(outbox, kafka)
        consumer = recipe.async_billing(
            kafka.url,
            inbox,
            topic=topic,
            group=f"g-{topic}",
            config=FAST_GROUP,
            max_attempts=2,
            backoff_base_s=0.01,
            parked_dir=tmp_path / "parked",
        )

        async def wrong() -> None:  # run on the app's own loop: refused before any message is taken
            consumer.run_until_idle(idle_s=1.0, timeout_s=90)

        with pytest.raises(ConfigError, match=r"asyncio\.to_thread"):
            asyncio.run(wrong())
        try:
            asyncio.run(recipe.main(consumer, run=lambda: consumer.run_until_idle(idle_s=1.0, timeout_s=90)))
        finally:
            consumer.close()
        with inbox.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT order_id, total_eur FROM invoices ORDER BY order_id")).all() == [
                (1, 9.0),
                (2, 5.0),
            ]
        assert consumer.counters.processed == 2 and consumer.counters.dead_lettered == 1
    finally:
        outbox.close()
        inbox.close()


@pytest.mark.postgres
def test_django_atomic_holds_the_order_and_its_message(pg_database: str, tmp_path: Path) -> None:
    """In a process of its own: Django's settings are once per process."""
    done = subprocess.run(
        [sys.executable, "-m", "examples.django_orders", pg_database],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["orders"] == 2 and "outside transaction.atomic()" in report["refused"]
    assert "Django's connection is postgresql, the outbox's engine sqlite" in report["mismatch"]
    outbox = SqlOutbox(pg_database)
    try:
        sent = sorted(outbox.list(State.PENDING), key=lambda m: m.id)
        assert [json.loads(m.value) for m in sent] == [
            {"id": report["placed"][0], "customer": "customer-7", "total": "99.50"},
            {"id": report["placed"][1], "customer": "customer-8", "total": "12.00"},
        ]
        assert [m.key for m in sent] == [b"customer-7", b"customer-8"]
        assert all(m.header("content-type") == b"application/json" for m in sent)
    finally:
        outbox.close()
