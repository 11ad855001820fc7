"""RocketMQ half messages, the producer: :class:`HalfMessageProducer` sends a half message, runs the
local transaction, then commits or rolls the half message back; it answers the broker's
check-backs from a :class:`~zeroloss.half_messages.table.HalfMessageTable` or the caller's own
``check(CheckBack) -> Resolution``."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import sqlalchemy as sa

from zeroloss.brokers import rocketmq_client
from zeroloss.brokers.rocketmq_url import parse_url
from zeroloss.errors import BrokerError, ConfigError, MessageError, StoreError
from zeroloss.half_messages.table import CommitOutcomeUnknown, HalfMessageTable, Resolution
from zeroloss.message import ID_HEADER, uuid7, validate_topic
from zeroloss.urls import safe_url

log = logging.getLogger("zeroloss.half_messages")  # one logger name for the feature, as before the split
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class CheckBack:
    """A half message the broker asks about: zeroloss's id (the ``zeroloss-id`` property), its
    topic, key, body, user properties, the broker's message id, and how often it was asked."""

    id: str
    topic: str
    key: str | None
    value: bytes
    headers: Mapping[str, str]
    message_id: str
    check_times: int


@dataclass(frozen=True, slots=True)
class Sent(Generic[T]):
    """The outcome of :meth:`HalfMessageProducer.send`: the local transaction committed.

    ``settled`` is False when the broker's commit of the half message failed (broker or proxy
    unreachable, proxy restarted): the message is then delivered after the broker's check-back."""

    id: str
    message_id: str
    result: T
    settled: bool


CheckSource = HalfMessageTable | Callable[[CheckBack], Resolution]


class HalfMessageProducer:
    """A RocketMQ producer of transactional messages whose check-backs are answered by ``check``.

    Keep one running per topic while half messages may be unresolved: the broker's check-back
    reaches only a live producer of that topic. ``topics`` must be TRANSACTION topics."""

    def __init__(
        self, url: str, topics: list[str] | tuple[str, ...], check: CheckSource, *, request_timeout: int = 10
    ) -> None:
        if not topics:
            raise ConfigError("name the topics: the broker sends a topic's check-backs to its producers")
        self.topics = tuple(validate_topic(t) for t in topics)
        if not isinstance(check, HalfMessageTable) and not callable(check):
            raise ConfigError("check must be a HalfMessageTable or a callable(CheckBack) -> Resolution")
        self.check = check
        self.url = url
        self.config = parse_url(url)
        self._client_config = rocketmq_client.client_config(self.config, request_timeout)
        self._producer: Any = None
        self._lock = threading.Lock()

    def __enter__(self) -> HalfMessageProducer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Connect, and from now on answer the broker's check-backs for ``topics``."""
        from rocketmq import Producer, TransactionChecker, TransactionResolution

        answers = {
            Resolution.COMMIT: TransactionResolution.COMMIT,
            Resolution.ROLLBACK: TransactionResolution.ROLLBACK,
            Resolution.UNKNOWN: TransactionResolution.TRANSACTION_RESOLUTION_UNSPECIFIED,
        }
        resolve = self.resolve

        class _Checker(TransactionChecker):  # type: ignore[misc]
            def check(self, message: Any) -> Any:
                return answers[resolve(message)]

        with self._lock:
            if self._producer is not None:
                return
            producer = Producer(self._client_config, self.topics, _Checker())
            try:
                rocketmq_client.start(producer)
            except Exception as exc:
                raise BrokerError(f"cannot start a RocketMQ producer at {safe_url(self.url)}: {exc}") from exc
            self._producer = producer

    def close(self) -> None:
        with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            producer.shutdown()

    def resolve(self, message: Any) -> Resolution:
        """The answer to one check-back (a client Message); UNKNOWN when it cannot be known."""
        props = dict(message.properties or {})
        half_id = props.get(ID_HEADER)
        if not half_id:
            log.warning(
                "check-back for message %s on %s without a %s property (not sent by zeroloss): UNKNOWN",
                message.message_id,
                message.topic,
                ID_HEADER,
            )
            return Resolution.UNKNOWN
        try:
            if isinstance(self.check, HalfMessageTable):
                answer = self.check.resolve(half_id, message.topic)
            else:
                answer = self.check(self._check_back(message, half_id, props))
            if not isinstance(answer, Resolution):
                raise TypeError(f"the check returned {answer!r}, not a Resolution")
        except Exception:
            log.exception("check-back of half message %s failed: UNKNOWN", half_id)
            return Resolution.UNKNOWN
        log.info("check-back of half message %s (%s): %s", half_id, message.topic, answer.value)
        return answer

    @staticmethod
    def _check_back(message: Any, half_id: str, props: Mapping[str, str]) -> CheckBack:
        keys = sorted(message.keys or ())
        return CheckBack(
            id=half_id,
            topic=message.topic,
            key=keys[0] if keys else None,
            value=bytes(message.body),
            headers={
                k: v
                for k, v in props.items()
                if k != ID_HEADER and not k.startswith("__") and k != "TRANSACTION_CHECK_TIMES"
            },
            message_id=message.message_id,
            check_times=int(props.get("TRANSACTION_CHECK_TIMES", "1")),
        )

    # -- sending -----------------------------------------------------------------------------------

    def send(
        self,
        topic: str,
        value: bytes,
        local_transaction: Callable[[Any], T],
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Sent[T]:
        """Send ``value`` to ``topic`` if, and only if, ``local_transaction`` commits.

        With a HalfMessageTable, ``local_transaction(conn)`` runs in a transaction on the table's
        engine, which zeroloss commits; with a callable check, ``local_transaction(id)`` runs and
        commits its own transaction, recording ``id`` where the check will look.

        Raises BrokerError if the half message could not be sent (nothing ran); otherwise what the
        local transaction raised, after rolling back the half message — in callable mode only if
        the check says ROLLBACK (an exception there does not prove the commit did not happen).
        A local COMMIT that raised is settled by the table's fence at once when the database
        answers; when it cannot, StoreError, and the broker's check-back settles it later."""
        producer = self._producer
        if producer is None:
            raise ConfigError("the producer is not started: call start() or use it as a context manager")
        half_id = uuid7()
        message = self._message(topic, value, key, headers, half_id)
        transaction = producer.begin_transaction()
        try:
            receipt = producer.send(message, transaction)
        except Exception as exc:
            if "message type not match" in str(exc):
                raise ConfigError(
                    f"topic {topic!r} is not a TRANSACTION topic (message.type=TRANSACTION): {exc}"
                ) from exc
            raise BrokerError(f"half message {half_id} to {topic!r} not sent: {exc}") from exc
        if isinstance(self.check, HalfMessageTable):
            return self._run_with_table(self.check, transaction, half_id, topic, receipt.message_id, local_transaction)
        return self._run_with_callback(self.check, transaction, message, half_id, receipt.message_id, local_transaction)

    def _run_with_table(
        self,
        table: HalfMessageTable,
        transaction: Any,
        half_id: str,
        topic: str,
        message_id: str,
        local_transaction: Callable[[sa.Connection], T],
    ) -> Sent[T]:
        try:
            result = table.run(half_id, topic, message_id, local_transaction)
        except CommitOutcomeUnknown as exc:
            answer = table.resolve(half_id, topic)
            if answer is Resolution.COMMIT:
                log.warning("half message %s: the local COMMIT raised (%s) but did commit", half_id, exc)
                return Sent(half_id, message_id, exc.result, self._end(transaction, half_id, commit=True))
            if answer is Resolution.ROLLBACK:
                self._end(transaction, half_id, commit=False)
                raise StoreError(
                    f"half message {half_id}: the local transaction did not commit: {exc}", retriable=True
                ) from exc
            raise StoreError(
                f"half message {half_id}: the local COMMIT raised ({exc}) and the database cannot tell "
                "yet whether it committed; the broker's check-back will settle it",
                retriable=False,
            ) from exc
        except BaseException:
            self._end(transaction, half_id, commit=False)  # never issued COMMIT: it cannot have committed
            raise
        return Sent(half_id, message_id, result, self._end(transaction, half_id, commit=True))

    def _run_with_callback(
        self,
        check: Callable[[CheckBack], Resolution],
        transaction: Any,
        message: Any,
        half_id: str,
        message_id: str,
        local_transaction: Callable[[str], T],
    ) -> Sent[T]:
        try:
            result = local_transaction(half_id)
        except BaseException:
            answer = self.resolve(message)
            if answer is not Resolution.UNKNOWN:
                self._end(transaction, half_id, commit=answer is Resolution.COMMIT)
            raise
        return Sent(half_id, message_id, result, self._end(transaction, half_id, commit=True))

    def _end(self, transaction: Any, half_id: str, *, commit: bool) -> bool:
        """Commit or roll back the half message; False (logged) if the broker did not take it:
        the check-back gives the same answer later."""
        try:
            transaction.commit() if commit else transaction.rollback()
        except Exception as exc:
            log.warning(
                "half message %s: %s failed (%s); the broker's check-back will settle it",
                half_id,
                "commit" if commit else "rollback",
                exc,
            )
            return False
        return True

    @staticmethod
    def _message(topic: str, value: bytes, key: str | None, headers: Mapping[str, str] | None, half_id: str) -> Any:
        from rocketmq import Message

        validate_topic(topic)
        if not isinstance(value, (bytes, bytearray)) or not value:
            raise MessageError("value must be non-empty bytes (RocketMQ refuses an empty body)")
        message = Message()
        message.topic = topic
        message.body = bytes(value)
        try:
            if key is not None:
                message.keys = key
            for name, text in (headers or {}).items():
                if name == ID_HEADER:
                    raise MessageError(f"header {ID_HEADER!r} is reserved: zeroloss sets it to the message id")
                message.add_property(name, text)
        except MessageError:
            raise
        except Exception as exc:  # the client's IllegalArgumentException: a blank key or property
            raise MessageError(f"cannot build the message: {exc}") from exc
        message.add_property(ID_HEADER, half_id)
        return message
