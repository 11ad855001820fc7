"""Dead letters: the envelope a message the consumer gave up on travels in, and how it is published.

A dead letter is the original record (key, value, headers) plus these headers::

    zeroloss-id                       the message id (for foreign records: "topic/partition/offset",
                                      the same id the inbox deduplicated them by)
    zeroloss-dlq-error-type           the exception's class, e.g. "ValueError"
    zeroloss-dlq-error-message        str(exception), at most 2000 characters
    zeroloss-dlq-attempts             how many times the handler ran (0: undecodable, never ran)
    zeroloss-dlq-original-topic       where it came from …
    zeroloss-dlq-original-partition
    zeroloss-dlq-original-offset
    zeroloss-dlq-first-failure        epoch seconds of the first failed attempt

Reading them back (``zeroloss dlq list|show|replay``) is :mod:`zeroloss.dlq`.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from zeroloss.backoff import backoff_s
from zeroloss.brokers.base import DLQ_SUFFIX, dlq_topic, publish_one
from zeroloss.brokers.kafka import KafkaBroker
from zeroloss.errors import BrokerError
from zeroloss.message import ID_HEADER, Headers, Message

log = logging.getLogger(__name__)

PREFIX = "zeroloss-dlq-"
H_ERROR_TYPE = PREFIX + "error-type"
H_ERROR_MESSAGE = PREFIX + "error-message"
H_ATTEMPTS = PREFIX + "attempts"
H_ORIGINAL_TOPIC = PREFIX + "original-topic"
H_ORIGINAL_PARTITION = PREFIX + "original-partition"
H_ORIGINAL_OFFSET = PREFIX + "original-offset"
H_FIRST_FAILURE = PREFIX + "first-failure"
MAX_ERROR_CHARS = 2000


def dead_letter(
    *,
    message_id: str,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    headers: Headers,
    error: BaseException,
    attempts: int,
    first_failure: float,
    suffix: str = DLQ_SUFFIX,
) -> Message:
    """The dead-letter message for a record the consumer gives up on."""
    kept = tuple((k, v) for k, v in headers if k != ID_HEADER and not k.startswith(PREFIX))
    ours = (
        (H_ERROR_TYPE, type(error).__name__.encode()),
        (H_ERROR_MESSAGE, str(error)[:MAX_ERROR_CHARS].encode("utf-8", "replace")),
        (H_ATTEMPTS, str(attempts).encode()),
        (H_ORIGINAL_TOPIC, topic.encode()),
        (H_ORIGINAL_PARTITION, str(partition).encode()),
        (H_ORIGINAL_OFFSET, str(offset).encode()),
        (H_FIRST_FAILURE, repr(first_failure).encode()),
    )
    return Message(id=message_id, topic=dlq_topic(topic, suffix), value=value or b"", key=key, headers=kept + ours)


class DeadLetterPublisher:
    """Publishes dead letters with an idempotent, acks=all producer and waits for the delivery
    report; :meth:`publish` returns only once the broker has the message, else raises."""

    def __init__(self, url: str, *, timeout_s: float = 30.0, config: dict[str, Any] | None = None) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.config = config
        self._broker: KafkaBroker | None = None

    def publish(self, msg: Message) -> str:
        if self._broker is None:
            self._broker = KafkaBroker(self.url, timeout_s=self.timeout_s, config=self.config)
        return publish_one(self._broker, msg, "dead letter")

    def deliver(self, msg: Message, stop: threading.Event, backoff_base_s: float, max_backoff_s: float, *,
                raise_rejected: bool = False) -> str | None:
        """:meth:`publish` until it succeeds, backing off between tries (the consumer holds the
        offset meanwhile); the location, or None if ``stop`` was set while waiting. With
        ``raise_rejected`` a refusal for good (too large, say) is raised instead of retried."""
        failures = 0
        while True:
            try:
                return self.publish(msg)
            except BrokerError as err:
                if raise_rejected and not err.retriable:
                    raise
                failures += 1
                log.error("message %s: publishing to %s failed (%s); its offset is held", msg.id, msg.topic, err)
            if stop.wait(backoff_s(failures, backoff_base_s, max_backoff_s)):
                return None

    def close(self) -> None:
        if self._broker is not None:
            self._broker.close()
            self._broker = None
