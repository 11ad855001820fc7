"""Read a topic back from the broker, from the beginning, without joining a group.

Used by the demo and the tests. It assigns every partition explicitly, so there is no group
join to wait for, and reads every partition to its end (the client's end-of-partition event,
from the fetch responses; Tansu's separate high-watermark answer is unreliable); then it stops
if every expected id was seen, or else once nothing new arrived for ``idle_s`` (ids still on
their way).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from zeroloss.brokers.kafka import _kafka, parse_bootstrap
from zeroloss.errors import BrokerError
from zeroloss.message import ID_HEADER


@dataclass
class Readback:
    ids: Counter[str] = field(default_factory=Counter)  # zeroloss-id → copies on the broker
    order: dict[bytes, list[str]] = field(default_factory=dict)  # key → ids in partition order
    records: int = 0

    @property
    def duplicates(self) -> int:
        return self.records - len(self.ids)


def read_topic(url: str, topic: str, *, expect: Iterable[str] = (), idle_s: float = 3.0,
               timeout_s: float = 60.0) -> Readback:
    ck = _kafka()
    want = set(expect)
    consumer: Any = ck.Consumer({
        "bootstrap.servers": parse_bootstrap(url),
        "group.id": f"zeroloss-readback-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        "enable.partition.eof": True,
    })
    out = Readback()
    try:
        try:
            meta = consumer.list_topics(topic, timeout=10)
        except ck.KafkaException as exc:
            raise BrokerError(f"cannot read the broker's metadata at {url}: {exc.args[0]}") from exc
        parts = meta.topics[topic].partitions if topic in meta.topics else {}
        consumer.assign([ck.TopicPartition(topic, p, ck.OFFSET_BEGINNING) for p in parts])
        deadline = time.monotonic() + timeout_s
        last_new = time.monotonic()
        at_end: set[int] = set()  # partitions read to their end since their last record
        while time.monotonic() < deadline:
            batch = consumer.consume(1000, 0.2)
            for rec in batch:
                err = rec.error()
                if err is not None:
                    if err.code() == ck.KafkaError._PARTITION_EOF:
                        at_end.add(rec.partition())
                    continue
                at_end.discard(rec.partition())
                last_new = time.monotonic()
                mid = dict(rec.headers() or []).get(ID_HEADER, b"").decode()
                out.records += 1
                out.ids[mid] += 1
                if out.ids[mid] == 1 and rec.key() is not None:
                    out.order.setdefault(rec.key(), []).append(mid)
            if len(at_end) < len(parts):
                continue  # never stop short of the end: copies further on must be counted too
            if not want or want.issubset(out.ids) or time.monotonic() - last_new > idle_s:
                break
    finally:
        consumer.close()
    return out
