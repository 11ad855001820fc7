"""``zeroloss dlq list|show|replay``: reading dead letters back and sending them again.

The envelope (the error headers) is :mod:`zeroloss.consumer.dead_letters`. The dead-letter topic
is an append-only log: a message can appear twice (a consumer crash after the dead letter was
acknowledged but before its offset was committed). :func:`replay` republishes to the original
topic *with the original id*, so the consumer's inbox runs it at most once even when it is
replayed twice, and leaves the letters where they are.
The details: docs/design.md, "dlq.py"."""

from __future__ import annotations

import logging
import time
from collections.abc import Generator, Iterable
from contextlib import closing
from dataclasses import asdict, dataclass
from typing import Any

from zeroloss.brokers.base import DLQ_SUFFIX, Broker, Status, Stored, TopicReader, dlq_topic
from zeroloss.consumer.dead_letters import (
    H_ATTEMPTS,
    H_ERROR_MESSAGE,
    H_ERROR_TYPE,
    H_FIRST_FAILURE,
    H_ORIGINAL_OFFSET,
    H_ORIGINAL_PARTITION,
    H_ORIGINAL_TOPIC,
    PREFIX,
)
from zeroloss.errors import BrokerError, ConfigError, UnknownMessageError
from zeroloss.message import ID_HEADER, REPLAY_HEADER, Headers, Message

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str
    topic: str  # the dead-letter topic
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: Headers  # the original record's own headers
    error_type: str
    error_message: str
    attempts: int
    original_topic: str
    original_partition: int
    original_offset: int
    first_failure: float
    position: str = ""  # where the letter itself sits, in the broker's terms

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly (bytes as text where they decode, else hex) for ``--json``."""

        def text(b: bytes | None) -> str | None:
            if b is None:
                return None
            try:
                return b.decode()
            except UnicodeDecodeError:
                return "hex:" + b.hex()

        d = asdict(self)
        d.update(key=text(self.key), value=text(self.value), headers=[[k, text(v)] for k, v in self.headers])
        return d


def _stored(topic: str, s: Stored) -> DeadLetter:
    """A message another broker keeps, read by :meth:`TopicReader.read`, as a dead letter."""
    return _letter(topic, 0, s.offset, s.position, s.id, s.key, s.value, list(s.headers))


def _letter(
    topic: str,
    partition: int,
    offset: int,
    position: str,
    mid: str | None,
    key: bytes | None,
    value: bytes,
    raw: list[tuple[str, bytes]],
) -> DeadLetter:
    h = {k: v.decode("utf-8", "replace") for k, v in reversed(raw)}  # first occurrence wins

    def num(name: str, cast: Any, default: Any) -> Any:
        try:
            return cast(h[name])
        except (KeyError, ValueError):
            return default

    return DeadLetter(
        id=mid or h.get(ID_HEADER, position),
        topic=topic,
        partition=partition,
        offset=offset,
        position=position,
        key=key,
        value=value,
        headers=tuple((k, v) for k, v in raw if k != ID_HEADER and not k.startswith(PREFIX)),
        error_type=h.get(H_ERROR_TYPE, ""),
        error_message=h.get(H_ERROR_MESSAGE, ""),
        attempts=num(H_ATTEMPTS, int, 0),
        original_topic=h.get(H_ORIGINAL_TOPIC, ""),
        original_partition=num(H_ORIGINAL_PARTITION, int, -1),
        original_offset=num(H_ORIGINAL_OFFSET, int, -1),
        first_failure=num(H_FIRST_FAILURE, float, 0.0),
    )


def _scan(url: str, topic: str, *, timeout_s: float) -> Generator[DeadLetter, None, None]:
    """Every dead letter on ``topic`` (the dead-letter topic), oldest first, left in place."""
    from zeroloss.registry import open_broker, scheme_of

    if scheme_of(url) == "kafka":  # read by the consumer API, which the KafkaBroker does not wrap
        yield from _scan_kafka(url, topic, timeout_s=timeout_s)
        return
    if scheme_of(url) == "rocketmq":  # the remoting protocol, which the gRPC publisher does not speak
        from zeroloss.brokers.rocketmq_reader import RocketMQReader

        for stored in RocketMQReader(url, timeout_s=timeout_s).read(topic):
            yield _stored(topic, stored)
        return
    broker = open_broker(url, timeout_s=timeout_s)
    try:
        if not isinstance(broker, TopicReader):
            raise ConfigError(f"zeroloss cannot read dead letters from {url.rpartition('@')[2]!r}")
        for stored in broker.read(topic):
            yield _stored(topic, stored)
    finally:
        broker.close()


def _scan_kafka(url: str, topic: str, *, timeout_s: float) -> Generator[DeadLetter, None, None]:
    """Every record of ``topic`` from the beginning, each partition read to its end."""
    from zeroloss.brokers.kafka_reader import KafkaReader

    with KafkaReader(url, timeout_s=timeout_s, purpose="dlq") as reader:
        if reader.partitions(topic) is None:
            origin = topic[: -len(DLQ_SUFFIX)] if topic.endswith(DLQ_SUFFIX) else topic
            if reader.partitions(origin) is None:  # a typo, not "no dead letters yet"
                raise ConfigError(f"no topic {origin!r} nor {topic!r} at {url}: check the name")
            return
        for rec in reader.scan(reader.from_start(topic)):
            yield _letter(
                rec.topic, rec.partition, rec.offset, rec.position, None, rec.key, rec.value, list(rec.headers)
            )


def list_dead_letters(url: str, topic: str, limit: int = 100, *, timeout_s: float = 60.0) -> list[DeadLetter]:
    """Up to ``limit`` dead letters of ``topic`` (``orders`` or ``orders.dlq``), oldest failure first."""
    out: list[DeadLetter] = []
    with closing(_scan(url, dlq_topic(topic), timeout_s=timeout_s)) as letters:
        for dl in letters:
            out.append(dl)
            if len(out) >= limit:
                break
    return sorted(out, key=lambda d: (d.first_failure, d.id))


def show(url: str, topic: str, message_id: str, *, timeout_s: float = 60.0) -> DeadLetter:
    """The newest dead letter with ``message_id``; UnknownMessageError if there is none."""
    found: DeadLetter | None = None
    for dl in _scan(url, dlq_topic(topic), timeout_s=timeout_s):
        if dl.id == message_id and (found is None or dl.first_failure >= found.first_failure):
            found = dl
    if found is None:
        raise UnknownMessageError(f"no dead letter {message_id} in {dlq_topic(topic)}")
    return found


def replay(url: str, topic: str, ids: Iterable[str], *, to_topic: str | None = None, timeout_s: float = 60.0) -> int:
    """Republish dead letters to their original topic (or ``to_topic``) with their original key,
    value, headers and **id**, so the consumer's inbox runs each at most once. All ids must exist
    (UnknownMessageError names the missing ones; nothing is sent then). Returns how many were
    delivered; BrokerError if any was not."""
    want = list(dict.fromkeys(ids))
    found: dict[str, DeadLetter] = {}
    for dl in _scan(url, dlq_topic(topic), timeout_s=timeout_s):
        if dl.id in want:
            found[dl.id] = dl  # a later copy replaces an earlier one: either is the same message
    missing = [i for i in want if i not in found]
    if missing:
        raise UnknownMessageError(f"no dead letter with id(s) {', '.join(missing)} in {dlq_topic(topic)}")
    nowhere = [i for i in want if not (to_topic or found[i].original_topic)]
    if nowhere:
        raise ConfigError(f"dead letter(s) {', '.join(nowhere)} name no original topic; pass to_topic")
    # Marked as a replay (when): an operator can tell, and NATS must not drop it as a duplicate of
    # the original publish still inside its dedup window. The id stays: the inbox runs it at most once.
    mark = ((REPLAY_HEADER, repr(time.time()).encode()),)
    msgs = [
        Message(
            id=dl.id,
            topic=to_topic or dl.original_topic,
            value=dl.value,
            key=dl.key,
            headers=tuple((k, v) for k, v in dl.headers if k != REPLAY_HEADER) + mark,
        )
        for dl in (found[i] for i in want)
    ]
    broker = _replay_broker(url, timeout_s)
    try:
        outcomes = broker.publish(msgs)
    finally:
        broker.close()
    failed = [f"{o.message.id}: {o.error}" for o in outcomes if o.status is not Status.DELIVERED]
    if failed:
        raise BrokerError(f"{len(failed)} of {len(msgs)} replays not delivered: {'; '.join(failed[:5])}")
    return len(msgs)


def _replay_broker(url: str, timeout_s: float) -> Broker:
    from zeroloss.registry import open_broker, scheme_of

    if scheme_of(url) == "kafka":  # idempotent, without a transactional.id: a one-off publish
        from zeroloss.brokers.kafka import KafkaBroker

        return KafkaBroker(url, timeout_s=timeout_s)
    return open_broker(url, timeout_s=timeout_s)
