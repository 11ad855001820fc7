"""Read a topic back from the broker, from the beginning, without joining a group.

Used by the demo and the tests. It assigns every partition explicitly, so there is no group
join to wait for, and reads every partition to its end (the client's end-of-partition event,
from the fetch responses; Tansu's separate high-watermark answer is unreliable); then it stops
if every expected id was seen, or else once nothing new arrived for ``idle_s`` (ids still on
their way).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from zeroloss.brokers.kafka_reader import KafkaReader


@dataclass
class Readback:
    ids: Counter[str] = field(default_factory=Counter)  # zeroloss-id → copies on the broker
    order: dict[bytes, list[str]] = field(default_factory=dict)  # key → ids in partition order
    records: int = 0

    @property
    def duplicates(self) -> int:
        return self.records - len(self.ids)


def read_topic(
    url: str, topic: str, *, expect: Iterable[str] = (), idle_s: float = 3.0, timeout_s: float = 60.0
) -> Readback:
    want = set(expect)
    out = Readback()
    with KafkaReader(url, timeout_s=timeout_s, purpose="readback") as reader:
        starts = reader.from_start(topic)
        deadline = time.monotonic() + timeout_s
        last_new = time.monotonic()
        while True:
            # Each pass reads every partition to its end: never stop short of copies further on.
            for rec in reader.scan(starts):
                last_new = time.monotonic()
                mid = rec.id or ""
                out.records += 1
                out.ids[mid] += 1
                if out.ids[mid] == 1 and rec.key is not None:
                    out.order.setdefault(rec.key, []).append(mid)
                starts[(rec.topic, rec.partition)] = rec.offset + 1
            if not want or want.issubset(out.ids) or not starts:
                break
            if time.monotonic() - last_new > idle_s or time.monotonic() > deadline:
                break  # expected ids that did not come: the caller sees them missing
    return out
