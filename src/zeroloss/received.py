"""What a consumer's handler receives: :class:`Received`, and :class:`PoisonMessage` to refuse it.

``msg.json()``, ``msg.text()`` and ``msg.decode(Model)`` read the value (:mod:`zeroloss.payload`);
one that cannot be read is poison: dead-lettered at once with the reason, never retried.

:func:`from_record` turns a confluent-kafka record into a :class:`Received`. The message id is the
``zeroloss-id`` header or, for a foreign record without one, ``"topic/partition/offset"``; a header
that no inbox can store (not UTF-8, not 1-255 characters, a NUL: :func:`~zeroloss.inbox.id_problem`)
makes the record poison.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from zeroloss.errors import MessageError
from zeroloss.inbox import id_problem
from zeroloss.message import ID_HEADER, Headers
from zeroloss.payload import CONTENT_TYPE, decode_json, decode_model

T = TypeVar("T")


class PoisonMessage(MessageError):
    """Raise from a handler for a message that no retry can fix: it is dead-lettered at once."""


@dataclass(frozen=True, slots=True)
class Received:
    """One record as the handler sees it. ``attempts`` counts tries from 1: this process's, plus,
    on RabbitMQ and NATS, the broker's earlier deliveries of it that were never settled."""

    id: str  # the zeroloss-id header, or "topic/partition/offset" for foreign records
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int = 0  # the record's timestamp, epoch milliseconds
    attempts: int = 1

    def header(self, name: str) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    @property
    def content_type(self) -> str | None:
        """The ``content-type`` header the producer set (``add(value=obj)`` sets it), or None."""
        raw = self.header(CONTENT_TYPE)
        return None if raw is None else raw.decode("utf-8", "replace")

    def json(self) -> Any:
        """The value parsed as JSON; PoisonMessage (dead-lettered at once) if it is not JSON."""
        try:
            return decode_json(self.value)
        except MessageError as exc:
            raise PoisonMessage(f"message {self.id} on {self.topic}: {exc}") from exc

    def text(self) -> str:
        """The value as UTF-8 text; PoisonMessage if it is not."""
        try:
            return (self.value or b"").decode()
        except UnicodeDecodeError as exc:
            raise PoisonMessage(
                f"message {self.id} on {self.topic}: the value is not UTF-8 text ({exc.reason} at byte {exc.start})"
            ) from exc

    def decode(self, model: type[T]) -> T:
        """The value as a ``model``: a pydantic model, a dataclass or a class taking the JSON
        object's fields; PoisonMessage if it is not one."""
        try:
            return decode_model(self.value, model)
        except MessageError as exc:
            raise PoisonMessage(f"message {self.id} on {self.topic}: {exc}") from exc


Handler = Callable[[Received, Any], None]
BatchHandler = Callable[[list[Received], Any], None]


def position(rec: Any) -> str:
    return f"{rec.topic()}/{rec.partition()}/{rec.offset()}"


def record_headers(rec: Any) -> Headers:
    return tuple((k, v if v is not None else b"") for k, v in rec.headers() or ())


def from_record(rec: Any) -> Received:
    """A Received for a confluent-kafka record; PoisonMessage if its id header is unusable."""
    headers = record_headers(rec)
    raw = next((v for k, v in headers if k == ID_HEADER), None)
    if raw is None:
        mid = position(rec)
    else:
        try:
            mid = raw.decode()
        except UnicodeDecodeError as exc:
            raise PoisonMessage(f"header {ID_HEADER} is not UTF-8: {raw[:80]!r}") from exc
        if (why := id_problem(mid)) is not None:
            raise PoisonMessage(f"header {ID_HEADER} {mid!r:.80} {why}")
    ts = rec.timestamp()[1]
    return Received(mid, rec.topic(), rec.partition(), rec.offset(), rec.key(), rec.value(), headers, ts)
