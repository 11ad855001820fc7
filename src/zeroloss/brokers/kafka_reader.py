"""Reading Kafka partitions without consuming them: the one reader behind ``dlq``, ``audit`` and
the read-back of the demo and the tests.

One consumer, *assigned* (never subscribed: no group join to wait for, no offsets committed),
``read_committed``, that reads each partition from a start offset to its end. "The end" is the
client's end-of-partition event, which follows the fetch responses — right on Kafka and on Tansu
alike; a quiet spell is not the end (a broker slow to answer the first fetch would otherwise give
a partial answer, silently).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from zeroloss.brokers.base import Stored
from zeroloss.brokers.kafka_client import kafka_module, parse_bootstrap
from zeroloss.errors import BrokerError, ConfigError
from zeroloss.message import ID_HEADER, Headers

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: Headers  # as stored, the zeroloss-id header included

    @property
    def id(self) -> str | None:
        """The ``zeroloss-id`` header (first one), if the record has one."""
        for k, v in self.headers:
            if k == ID_HEADER:
                return v.decode(errors="replace")
        return None

    @property
    def position(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"


class KafkaReader:
    """Reads partitions of a Kafka cluster to their end; a :class:`~zeroloss.brokers.base.TopicReader`."""

    def __init__(self, url: str, *, timeout_s: float = 60.0, purpose: str = "read") -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._ck = kafka_module()
        self._consumer: Any = self._ck.Consumer({
            "bootstrap.servers": parse_bootstrap(url),
            "group.id": f"zeroloss-{purpose}-{uuid.uuid4().hex[:8]}",  # required by the client; never joined
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "logger": logging.getLogger("zeroloss.librdkafka"),
        })  # fmt: skip
        self._partitions: dict[str, list[int]] | None = None

    def partitions(self, topic: str) -> list[int] | None:
        """The partitions of ``topic``; None when there is no such topic. The whole cluster's
        metadata is asked for (asking for one topic could auto-create it), once per reader."""
        if self._partitions is None:
            try:
                md = self._consumer.list_topics(timeout=min(10.0, self.timeout_s))
            except self._ck.KafkaException as exc:  # unreachable: one clear line, not the client's traceback
                raise BrokerError(f"cannot read the broker's metadata at {self.url}: {exc.args[0]}") from exc
            self._partitions = {n: sorted(t.partitions) for n, t in md.topics.items() if t.error is None}
        return self._partitions.get(topic)

    def scan(
        self, starts: Mapping[TopicPartition, int], *, idle_s: float | None = None
    ) -> Generator[Record, None, None]:
        """Every record from each ``(topic, partition)``'s start offset to its end, partitions
        interleaved, each in offset order. Ends when every partition was read to its end; with
        ``idle_s``, also after that long without a record (an answer that may be partial — the
        caller decides). BrokerError when the ends are not reached within ``timeout_s``."""
        if not starts:
            return
        ck = self._ck
        self._consumer.assign([ck.TopicPartition(t, p, o) for (t, p), o in starts.items()])
        at_end: set[TopicPartition] = set()  # read to the end since their last record
        progress = time.monotonic()
        deadline = progress + self.timeout_s
        try:
            while len(at_end) < len(starts):
                if idle_s is not None and time.monotonic() - progress > idle_s:
                    return
                if time.monotonic() > deadline:
                    left = sorted(f"{t}/{p}" for t, p in set(starts) - at_end)
                    raise BrokerError(
                        f"could not read {', '.join(left)} to the end within {self.timeout_s:.0f}s "
                        f"at {self.url}: is their leader up?"
                    )
                for rec in self._consumer.consume(1000, 0.2):
                    tp = (rec.topic(), rec.partition())
                    err = rec.error()
                    if err is not None:
                        if err.code() == ck.KafkaError._PARTITION_EOF:
                            at_end.add(tp)
                        else:
                            log.warning("reading %s/%s: %s", tp[0], tp[1], err)
                        continue
                    at_end.discard(tp)
                    progress = time.monotonic()
                    yield Record(
                        tp[0],
                        tp[1],
                        rec.offset(),
                        rec.key(),
                        rec.value() or b"",
                        tuple((k, v or b"") for k, v in rec.headers() or []),
                    )
        finally:
            self._consumer.unassign()

    def from_start(self, topic: str) -> dict[TopicPartition, int]:
        """Start offsets that read all of ``topic`` (none when it does not exist)."""
        return {(topic, p): self._ck.OFFSET_BEGINNING for p in self.partitions(topic) or ()}

    def read(self, topic: str) -> Iterator[Stored]:
        """Everything ``topic`` holds, left in place (:class:`TopicReader`); ConfigError when it
        does not exist."""
        if self.partitions(topic) is None:
            raise ConfigError(f"no topic {topic!r} at {self.url}: check the name")
        for r in self.scan(self.from_start(topic)):
            yield Stored(
                position=r.position,
                offset=r.offset,
                id=r.id,
                key=r.key,
                value=r.value,
                headers=tuple((k, v) for k, v in r.headers if k != ID_HEADER),
                partition=r.partition,
            )

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> KafkaReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
