"""Consume-transform-produce in Kafka transactions: ``Consumer(..., transactional=True)``.
The details: docs/design.md, "consumer/kafka_txn.py"."""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from zeroloss.brokers.kafka_client import kafka_module, parse_bootstrap, producer_config
from zeroloss.message import ID_HEADER, Message, new_message

log = logging.getLogger(__name__)


class TxnAborted(Exception):  # internal: never leaves the consumer
    """The Kafka transaction was aborted; the consumer must rewind to its committed offsets."""


def derived_id(source_id: str, index: int, timestamp_ms: int) -> str:
    """A UUIDv7-shaped id that is the same every time for (source id, index): the time bits are
    the input record's timestamp, the rest a hash."""
    h = int.from_bytes(hashlib.sha256(f"{source_id}/{index}".encode()).digest()[:10], "big")
    ms = max(timestamp_ms, 0) & ((1 << 48) - 1)
    value = ms << 80 | 0x7 << 76 | (h >> 68 & 0xFFF) << 64 | 0b10 << 62 | (h & ((1 << 62) - 1))
    return str(uuid.UUID(int=value))


class Outbound:
    """The handler's ``tx`` in transactional mode: collects what it sends."""

    def __init__(self, source_id: str, timestamp_ms: int) -> None:
        self._source = source_id
        self._ts = timestamp_ms
        self.messages: list[Message] = []

    def send(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        headers: Mapping[str, bytes] | Iterable[tuple[str, bytes]] | None = None,
    ) -> str:
        """Queue a message for the transaction; returns its (deterministic) id. MessageError for
        an invalid one — which makes the input a poison message."""
        m = new_message(topic, value, key, headers)
        m = replace(m, id=derived_id(self._source, len(self.messages), self._ts))
        self.messages.append(m)
        return m.id


class KafkaTransactions:
    """One transactional producer; a transaction is opened by the first :meth:`add` of a batch
    and closed by :meth:`commit`."""

    def __init__(
        self, url: str, transactional_id: str, *, timeout_s: float = 30.0, config: dict[str, Any] | None = None
    ) -> None:
        self._ck = kafka_module()
        self.transactional_id = transactional_id
        self.timeout_s = timeout_s
        self._conf = producer_config(parse_bootstrap(url), transactional_id, timeout_s, config)
        self._producer: Any = None
        self.open = False
        self.aborts = 0

    def _ensure(self) -> Any:
        if self._producer is None:
            producer = self._ck.Producer(self._conf)
            producer.init_transactions(self.timeout_s)
            self._producer = producer
        if not self.open:
            self._producer.begin_transaction()
            self.open = True
        return self._producer

    def add(self, messages: Sequence[Message]) -> None:
        try:
            producer = self._ensure()
            for m in messages:
                headers = [*m.headers, (ID_HEADER, m.id.encode())]
                while True:
                    try:
                        producer.produce(m.topic, value=m.value, key=m.key, headers=headers)
                        break
                    except BufferError:
                        producer.poll(0.05)
        except self._ck.KafkaException as exc:
            raise self._abort(f"produce failed: {exc.args[0]}") from exc

    def commit(self, offsets: list[Any], group_metadata: Any) -> None:
        """Add the offsets to the transaction and commit it; TxnAborted if that failed."""
        deadline = time.monotonic() + self.timeout_s
        try:
            producer = self._ensure()
            producer.send_offsets_to_transaction(offsets, group_metadata, self.timeout_s)
            while True:
                try:
                    producer.commit_transaction(max(0.1, deadline - time.monotonic()))
                    self.open = False
                    return
                except self._ck.KafkaException as exc:
                    err = exc.args[0]
                    if not (err.retriable() and not err.txn_requires_abort() and time.monotonic() < deadline):
                        raise
        except self._ck.KafkaException as exc:
            raise self._abort(f"commit failed: {exc.args[0]}") from exc

    def _abort(self, why: str) -> TxnAborted:
        self.aborts += 1
        log.warning("aborting the Kafka transaction (%s); the batch will run again", why)
        producer, self.open = self._producer, False
        if producer is not None:
            try:
                producer.abort_transaction(self.timeout_s)
            except self._ck.KafkaException:  # fatal or fenced: start over with a new producer
                self.close()
        return TxnAborted(why)

    def close(self) -> None:
        """Drop the producer; an open transaction is aborted by the broker (or fenced by the
        next producer with this transactional id)."""
        producer, self._producer, self.open = self._producer, None, False
        if producer is not None:
            try:
                producer.purge(in_queue=True, in_flight=True, blocking=False)
                producer.flush(0)
            except Exception:
                log.debug("purging the transactional producer failed", exc_info=True)
