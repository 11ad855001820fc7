"""W3C trace context across the broker: the ``traceparent`` header, from ``add`` to the handler.

With OpenTelemetry installed (``opentelemetry-api``), ``add`` writes the current context into the
message's headers (``traceparent``, and ``tracestate``/``baggage`` when there are any) through
OpenTelemetry's configured propagator, unless the app set ``traceparent`` itself; the consumer runs
each handler inside a CONSUMER span ``process <topic>`` whose parent is that context, so a trace
goes from the HTTP request that wrote the order to the handler that billed it, across the outbox,
the relay and the broker. Without OpenTelemetry both do nothing (the import is tried once), and
so does the consumer's side while no SDK is configured (nothing would record the span).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

TRACEPARENT = "traceparent"
Headers = tuple[tuple[str, bytes], ...]


@functools.cache
def _api() -> Any | None:
    try:
        from opentelemetry import propagate, trace
    except ImportError:
        return None
    return propagate, trace


def inject(headers: Headers) -> Headers:
    """``headers`` plus the current trace context's (the app's own headers win)."""
    api = _api()
    if api is None:
        return headers
    carrier: dict[str, str] = {}
    api[0].inject(carrier)
    have = {k.lower() for k, _ in headers}
    if TRACEPARENT in have:  # the app chose the parent itself
        return headers
    return (*headers, *((k, v.encode()) for k, v in carrier.items() if k.lower() not in have))


@functools.cache
def _tracer(provider: Any) -> Any:
    return provider.get_tracer("zeroloss")


@contextlib.contextmanager
def handling(topic: str, message_id: str, headers: Headers) -> Iterator[None]:
    """Run a handler's call in a span whose parent is the producer's context, if it sent one."""
    api = _api()
    if api is None:
        yield
        return
    propagate, trace = api
    provider = trace.get_tracer_provider()
    # No SDK configured (OpenTelemetry's default proxy or no-op provider): no span would be recorded,
    # so none is made — that costs tens of microseconds per message for nothing.
    if type(provider).__name__ in ("ProxyTracerProvider", "NoOpTracerProvider"):
        yield
        return
    carrier = {k.lower(): v.decode("latin-1") for k, v in headers}
    with _tracer(provider).start_as_current_span(
        f"process {topic}",
        context=propagate.extract(carrier),
        kind=trace.SpanKind.CONSUMER,
        attributes={
            "messaging.operation.type": "process",
            "messaging.destination.name": topic,
            "messaging.message.id": message_id,
        },
    ):
        yield


@contextlib.contextmanager
def handling_batch(topic: str | None, messages: list[tuple[str, Headers]]) -> Iterator[None]:
    """A batch handler's call: one span ``process <topic>`` linked to each message's producer
    context (OpenTelemetry's messaging conventions for a batch), no parent; nothing without an SDK.
    ``topic`` None: the messages came from several topics, so the span is ``process`` with no
    destination (the conventions' rule for a batch without one)."""
    api = _api()
    provider = None if api is None else api[1].get_tracer_provider()
    if api is None or type(provider).__name__ in ("ProxyTracerProvider", "NoOpTracerProvider"):
        yield
        return
    propagate, trace = api
    links = []
    for _, headers in messages:
        carrier = {k.lower(): v.decode("latin-1") for k, v in headers}
        span_context = trace.get_current_span(propagate.extract(carrier)).get_span_context()
        if span_context.is_valid:
            links.append(trace.Link(span_context))
    attributes: dict[str, str | int] = {
        "messaging.operation.type": "process",
        "messaging.batch.message_count": len(messages),
    }
    if topic is not None:
        attributes["messaging.destination.name"] = topic
    with _tracer(provider).start_as_current_span(
        "process" if topic is None else f"process {topic}",
        context=trace.set_span_in_context(trace.INVALID_SPAN),
        kind=trace.SpanKind.CONSUMER,
        links=links,
        attributes=attributes,
    ):
        yield
