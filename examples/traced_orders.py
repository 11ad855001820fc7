"""Trace context across the broker (docs/recipes/tracing.md): the span that writes an order is the
parent of the span the consumer's handler runs in, through the outbox, the relay and the broker.

zeroloss needs nothing but ``opentelemetry-api`` installed: ``add`` writes the W3C ``traceparent``
of the current span into the message's headers, and the consumer runs each handler in a CONSUMER
span ``process <topic>`` whose parent is that context. The app configures OpenTelemetry as usual
(an SDK, an exporter); here, spans printed to the console."""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from sqlalchemy import Connection, text

from zeroloss import Consumer, SqlOutbox

tracer = trace.get_tracer("shop")


# [recipe:place_order]
def place_order(outbox: SqlOutbox, order_id: int, customer: str) -> str:
    """One request: its span is current while the message is added, so the message carries it."""
    with tracer.start_as_current_span("POST /orders"), outbox.engine.begin() as conn:
        return outbox.add(conn, topic="orders", key=customer, value={"id": order_id, "customer": customer})


# [/recipe]


def traced_billing(
    broker: str, inbox: Any, *, topic: str = "orders", group: str = "billing", **options: Any
) -> Consumer:
    consumer = Consumer(broker, group=group, topics=[topic], inbox=inbox, **options)

    # [recipe:bill]
    @consumer.handler
    def bill(msg: Any, tx: Connection) -> None:
        span = trace.get_current_span()  # "process orders", a child of the producer's "POST /orders"
        span.set_attribute("order.id", msg.json()["id"])
        tx.execute(text("SELECT 1"))  # the effect; its database spans (if instrumented) nest here

    # [/recipe]

    return consumer


if __name__ == "__main__":
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)
    shop = SqlOutbox("sqlite:///shop.db")
    shop.create_schema()
    print("message", place_order(shop, 1, "customer-7"), "- now run the relay, then the consumer")
    traced_billing("kafka://127.0.0.1:9092", "sqlite:///billing.db").run_until_idle()
