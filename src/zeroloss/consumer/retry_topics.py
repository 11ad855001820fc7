"""Non-blocking retries (Kafka): a failing message waits on a delay topic, not on its partition.

With ``Consumer(..., retry_delays_s=(1, 10, 60))`` a message whose handler fails on ``orders`` is
copied to ``orders.retry.1`` and the consumer moves on; the copy is tried again once its delay has
passed, then goes on to ``orders.retry.2``, ``orders.retry.3``, and after the last to
``orders.dlq`` — four handler runs in all (``1 + len(retry_delays_s)``; ``max_attempts`` is not
used in this mode). This is Spring Kafka's retry-topic pattern: one bad message no longer holds
every later message of its partition for the whole backoff.
The details: docs/design.md, "consumer/retry_topics.py"."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from zeroloss.errors import ConfigError
from zeroloss.message import ID_HEADER, Headers, Message

PREFIX = "zeroloss-retry-"
H_GROUP = PREFIX + "group"
H_ATTEMPTS = PREFIX + "attempts"
H_NOT_BEFORE = PREFIX + "not-before"
H_ORIGINAL_TOPIC = PREFIX + "original-topic"
H_ORIGINAL_PARTITION = PREFIX + "original-partition"
H_ORIGINAL_OFFSET = PREFIX + "original-offset"
H_FIRST_FAILURE = PREFIX + "first-failure"
H_ERROR_TYPE = PREFIX + "error-type"
H_ERROR_MESSAGE = PREFIX + "error-message"
MAX_ERROR_CHARS = 2000

_STAGE = re.compile(r"^(?P<topic>.+)\.retry\.(?P<n>[1-9][0-9]*)$")


def retry_topic(topic: str, stage: int) -> str:
    """``orders``, 2 → ``orders.retry.2``."""
    return f"{topic}.retry.{stage}"


def retry_pattern(topic: str) -> str:
    """The subscription pattern of every retry stage of ``topic`` (librdkafka regex)."""
    return "^" + topic.replace(".", "\\.") + "\\.retry\\.[0-9]+$"


def check_delays(delays: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(d) for d in delays)
    if any(d < 0 for d in out):
        raise ConfigError(f"retry delays must be 0 or more seconds, got {list(delays)}")
    return out


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a record stands in its retry journey."""

    topic: str  # the topic it was first published to
    partition: int
    offset: int
    stage: int  # 0: read from the original topic; n: read from <topic>.retry.<n> (at most the last stage)
    group: str | None  # the group a retry copy belongs to
    attempts: int  # handler runs before this one
    first_failure: float | None
    not_before_ms: int  # 0: due now


def _header(headers: Headers, name: str) -> str | None:
    for k, v in headers:
        if k == name:
            return v.decode("utf-8", "replace")
    return None


def origin(topic: str, partition: int, offset: int, headers: Headers, stages: int) -> Origin:
    """The journey of a record read from ``topic``. Retry headers count only on a retry topic
    read by a consumer with retry stages: a dead letter replayed to ``orders`` starts afresh. A
    stage beyond ``stages`` (the configuration shrank) counts as the last one."""
    m = _STAGE.match(topic)
    if m is None or stages == 0:
        return Origin(topic, partition, offset, stage=0, group=None, attempts=0, first_failure=None, not_before_ms=0)

    def num(name: str, default: int) -> int:
        try:
            return int(_header(headers, name) or "")
        except ValueError:
            return default

    try:
        first: float | None = float(_header(headers, H_FIRST_FAILURE) or "")
    except ValueError:
        first = None
    return Origin(
        topic=_header(headers, H_ORIGINAL_TOPIC) or m["topic"],
        partition=num(H_ORIGINAL_PARTITION, partition),
        offset=num(H_ORIGINAL_OFFSET, offset),
        stage=min(int(m["n"]), stages),
        group=_header(headers, H_GROUP),
        attempts=max(0, num(H_ATTEMPTS, int(m["n"]))),
        first_failure=first,
        not_before_ms=num(H_NOT_BEFORE, 0),
    )


def retry_copy(
    *,
    message_id: str,
    key: bytes | None,
    value: bytes | None,
    headers: Headers,
    at: Origin,
    group: str,
    attempts: int,
    first_failure: float,
    error: BaseException,
    delay_s: float,
    now: float,
) -> Message:
    """The copy of a failed record for the next retry topic (``at.stage + 1``)."""
    kept = tuple((k, v) for k, v in headers if k != ID_HEADER and not k.startswith(PREFIX))
    ours = (
        (H_GROUP, group.encode()),
        (H_ATTEMPTS, str(attempts).encode()),
        (H_NOT_BEFORE, str(int((now + delay_s) * 1000)).encode()),
        (H_ORIGINAL_TOPIC, at.topic.encode()),
        (H_ORIGINAL_PARTITION, str(at.partition).encode()),
        (H_ORIGINAL_OFFSET, str(at.offset).encode()),
        (H_FIRST_FAILURE, repr(first_failure).encode()),
        (H_ERROR_TYPE, type(error).__name__.encode()),
        (H_ERROR_MESSAGE, str(error)[:MAX_ERROR_CHARS].encode("utf-8", "replace")),
    )
    return Message(
        id=message_id, topic=retry_topic(at.topic, at.stage + 1), value=value or b"", key=key, headers=kept + ours
    )
