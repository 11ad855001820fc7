"""Apache RocketMQ 5 adapter, publishing side: the official gRPC client (rocketmq-python-client,
``zeroloss[rocketmq]``) sends to the broker's gRPC proxy, synchronously acknowledged; delivered
means SEND_OK. A key becomes the FIFO message group and a message key; a batch goes in key waves.
Also RocketMQ's TopicAdmin, through :mod:`zeroloss.brokers.rocketmq_admin`. The URL, what
SEND_OK means, order, what is carried and the outcomes: docs/design.md, "brokers/rocketmq.py".
(Over 400 lines: one class, the send and the mapping of its many failure answers to outcomes,
which only make sense read together.)"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from zeroloss.brokers import rocketmq_client
from zeroloss.brokers._batch import BrokerWide, duplicate_header, publish_in_waves
from zeroloss.brokers.base import Declared, Outcome, Status, TopicSpec, with_dead_letters
from zeroloss.brokers.rocketmq_admin import RocketMQAdmin
from zeroloss.brokers.rocketmq_client import rocketmq_module
from zeroloss.brokers.rocketmq_fields import index_key, message_group, rocketmq_topic, user_properties
from zeroloss.brokers.rocketmq_url import parse_url
from zeroloss.errors import BrokerError, ConfigError
from zeroloss.message import Message
from zeroloss.urls import safe_url

log = logging.getLogger(__name__)
T = TypeVar("T")

MESSAGE_ID = re.compile(r"[0-9A-Fa-f]{16,64}")
ROUTE_TTL_S = 30.0  # as long as the client keeps a route before it asks again
# The client's own attempts per send (Producer.DEFAULT_MAX_SEND_ATTEMPTS, not configurable): each
# gets request_timeout, so request_timeout is a third of our timeout_s.
CLIENT_SEND_ATTEMPTS = 3
WAIT_SLICE_S = 0.25  # how often a send in flight looks at interrupt()

# gRPC status codes (apache.rocketmq.v2.Code) that say the broker, not the message, failed.
BROKER_WIDE_CODES = {
    40100: "UNAUTHORIZED",
    40300: "FORBIDDEN",
    42900: "TOO_MANY_REQUESTS",
    50001: "INTERNAL_ERROR",
    50002: "HA_NOT_AVAILABLE (the broker's SLAVE_NOT_AVAILABLE)",
    50400: "PROXY_TIMEOUT",
    50401: "MASTER_PERSISTENCE_TIMEOUT (the broker's FLUSH_DISK_TIMEOUT)",
    50402: "SLAVE_PERSISTENCE_TIMEOUT (the broker's FLUSH_SLAVE_TIMEOUT)",
    50000: "INTERNAL_SERVER_ERROR",
}
TOPIC_NOT_FOUND = 40402


@dataclass(frozen=True)
class Refusal:
    """What every message of a topic gets without being sent (no such topic, a name RocketMQ refuses)."""

    status: Status
    error: str


def location(topic: str, receipt: Any) -> str:
    """``topic/message-id/queue-offset`` from the client's SendReceipt. Not the queue: the proxy
    picks it (by message group) and does not say which; the queue in the receipt is the client's
    guess, wrong about half the time (measured). The message id finds the message (QUERY_MESSAGE)."""
    return f"{topic}/{receipt.message_id}/{receipt.offset}"


def parse_location(text: str) -> tuple[str, str, int] | None:
    """(RocketMQ topic, message id, queue offset) from a :func:`location`, None for anything else
    (a message id is hex: 34 digits from RocketMQ 5 clients, 32 from older ones)."""
    parts = text.split("/")
    if len(parts) != 3 or not MESSAGE_ID.fullmatch(parts[1]) or not parts[2].lstrip("-").isdigit():
        return None
    return parts[0], parts[1], int(parts[2])


class RocketMQBroker:
    """Publishes batches through a RocketMQ 5 gRPC proxy; see docs/design.md, "brokers/rocketmq.py". Also the
    :class:`~zeroloss.brokers.base.TopicAdmin` of RocketMQ (through the name server)."""

    def __init__(self, url: str, *, timeout_s: float = 30.0, queues: int = 4) -> None:
        self._rmq = rocketmq_module()
        self.url = url
        self.config = parse_url(url)
        self.timeout_s = timeout_s
        self.queues = queues
        # request_timeout is whole seconds on the wire (a protobuf Duration's seconds).
        self.request_timeout = max(1, int(timeout_s // CLIENT_SEND_ATTEMPTS))
        self._producer: Any = None
        self._kinds: dict[str, tuple[float, str]] = {}  # RocketMQ topic → (when looked up, message type)
        self._warned_normal: set[str] = set()
        self._interrupted = threading.Event()
        self._broken = False
        self.producers_made = 0

    # -- the client -----------------------------------------------------------------------------

    def client_config(self) -> Any:
        return rocketmq_client.client_config(self.config, self.request_timeout)

    def _ensure_producer(self) -> Any:
        if self._producer is not None and not self._broken:
            return self._producer
        self._drop()
        producer = self._rmq.Producer(self.client_config())
        try:
            rocketmq_client.start(producer)
        except Exception as exc:
            raise BrokerWide(f"cannot start a producer: {type(exc).__name__}: {exc}") from exc
        self._producer = producer
        self.producers_made += 1
        return producer

    def _drop(self) -> None:
        producer, self._producer = self._producer, None
        self._broken = False
        self._kinds.clear()
        if producer is not None:
            try:
                producer.shutdown()
            except Exception:  # being thrown away
                log.debug("shutting a RocketMQ producer down failed", exc_info=True)

    def close(self) -> None:
        self._drop()

    def check_reachable(self) -> None:
        """BrokerError unless the gRPC proxy accepts a connection (Reachable). Declaring goes to the
        name server, so it says nothing of the proxy the relay sends to, and the client's producer
        starts "successfully" with nothing to talk to: a relay would retry against a dead port."""
        refused = rocketmq_client.proxy_refusal(self.config.endpoint, min(self.timeout_s, 5.0))
        if refused is not None:
            raise BrokerError(
                f"RocketMQ proxy {self.config.endpoint} (the URL's HOST:PORT, gRPC) does not accept "
                f"connections: {type(refused).__name__}: {refused}; start it (mqbroker --enable-proxy, "
                f"or mqproxy) or fix the URL"
            ) from refused

    def interrupt(self) -> None:
        self._interrupted.set()

    # -- publishing -----------------------------------------------------------------------------

    def publish(self, messages: Sequence[Message]) -> list[Outcome]:
        if not messages:
            return []
        if self._interrupted.is_set():
            raise BrokerError(f"RocketMQ at {self.config.endpoint}: interrupted, the relay is stopping")
        try:
            outcomes = asyncio.run(self._publish(messages))
        except BrokerWide as exc:
            self._drop()
            raise BrokerError(f"RocketMQ at {self.config.endpoint}: {exc}") from exc
        if self._broken:  # a send failed broker-wide after part was acknowledged: keep that, not the producer
            self._drop()
        return outcomes

    async def _publish(self, messages: Sequence[Message]) -> list[Outcome]:
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        producer = self._ensure_producer()
        kinds: dict[str, str | Refusal] = {}
        for topic in sorted({m.topic for m in messages}):
            kinds[topic] = await self._kind(producer, topic)

        async def send(m: Message) -> Outcome:
            kind = kinds[m.topic]
            if isinstance(kind, Refusal):  # the topic's own problem, the same for each of its messages
                return Outcome(m, kind.status, error=kind.error)
            return await self._send(producer, m, kind)

        return await publish_in_waves(messages, send, deadline)

    async def _answer(self, future: Any, limit_s: float | None = None) -> Any:
        """The result of one of the client's futures, awaited in slices so that :meth:`interrupt`
        cuts it short (BrokerWide); after ``limit_s`` a TimeoutError."""
        wrapped = asyncio.wrap_future(future)
        give_up = None if limit_s is None else asyncio.get_running_loop().time() + limit_s
        try:
            while True:
                if self._interrupted.is_set():
                    raise BrokerWide("interrupted, the relay is stopping")
                if give_up is not None and asyncio.get_running_loop().time() >= give_up:
                    raise TimeoutError(f"no answer within {limit_s:.0f}s")
                done, _ = await asyncio.wait({wrapped}, timeout=WAIT_SLICE_S)
                if done:
                    return wrapped.result()
        finally:
            # Left unanswered (interrupt, deadline, the batch cut): cancel it, or its late answer
            # would be handed to this batch's event loop after asyncio.run closed it.
            wrapped.cancel()

    async def _kind(self, producer: Any, topic: str) -> str | Refusal:
        """The message type of ``topic`` on the broker (NORMAL, FIFO, ...), from a route query of
        our own: the client's says only "failed to fetch route" for a missing topic and a dead proxy
        alike. A Refusal when the topic itself is the problem."""
        try:
            name = rocketmq_topic(topic)
        except ValueError as exc:
            return Refusal(Status.REJECTED, str(exc))
        cached = self._kinds.get(name)
        if cached is not None and time.monotonic() - cached[0] < ROUTE_TTL_S:
            return cached[1]
        proto = self._rmq.grpc_protocol
        req = proto.QueryRouteRequest()
        req.topic.name = name
        req.endpoints.CopyFrom(producer.client_configuration.rpc_endpoints.endpoints)
        try:
            future = producer.rpc_client.query_topic_route_async(
                producer.client_configuration.rpc_endpoints, req, metadata=producer.sign(), timeout=self.request_timeout
            )
            res = await self._answer(future, self.request_timeout + 5.0)
        except BrokerWide:
            raise
        except Exception as exc:  # grpc's AioRpcError (UNAVAILABLE, DEADLINE_EXCEEDED), a future timeout
            raise BrokerWide(f"route of topic {name!r}: {_describe(exc)}") from exc
        code = res.status.code
        if code == TOPIC_NOT_FOUND:
            return Refusal(
                Status.RETRY,
                f"topic {name!r} does not exist on RocketMQ (zeroloss init --target URL "
                f"--topic {topic} creates it, FIFO)",
            )
        if code != proto.Code.OK:
            why = f"route of topic {name!r}: code {code} {proto.Code.Name(code) if code in proto.Code.values() else ''}"
            if code in BROKER_WIDE_CODES or code >= 50000:
                raise BrokerWide(f"{why}, {res.status.message}")
            return Refusal(Status.RETRY, f"{why}, {res.status.message}")
        types = {t for q in res.message_queues for t in q.accept_message_types}
        kind = "FIFO" if proto.MessageType.FIFO in types else proto.MessageType.Name(min(types)) if types else "NORMAL"
        self._kinds[name] = (time.monotonic(), kind)
        return kind

    def _client_message(self, m: Message, kind: str) -> Any:
        """The client's Message for ``m`` (ValueError for what RocketMQ cannot carry)."""
        if not m.value:
            raise ValueError("RocketMQ does not store a message with an empty body")
        if (dup := duplicate_header(m.headers)) is not None:
            raise ValueError(f"header {dup!r} appears twice; RocketMQ user properties hold one value")
        msg = self._rmq.Message()
        msg.topic = rocketmq_topic(m.topic)
        msg.body = m.value
        for k, v in user_properties(m).items():
            msg.add_property(k, v)
        msg.keys = m.id  # the setter adds one key to the message's set
        if m.key is not None:
            msg.keys = index_key(m.key)
        if kind == "FIFO":
            msg.message_group = message_group(m)
        elif m.key is not None and msg.topic not in self._warned_normal:
            self._warned_normal.add(msg.topic)
            log.warning(
                "RocketMQ topic %s is %s, not FIFO: messages of one key can be consumed out of order "
                "(zeroloss init creates FIFO topics)",
                msg.topic,
                kind,
            )
        return msg

    async def _send(self, producer: Any, m: Message, kind: str) -> Outcome:
        exc_mod = self._rmq.v5.exception
        try:
            msg = self._client_message(m, kind)
        except (ValueError, exc_mod.IllegalArgumentException) as exc:  # the client checks names and values too
            return Outcome(m, Status.REJECTED, error=str(exc))
        try:
            future = producer.send_async(msg)
        except exc_mod.IllegalArgumentException as exc:  # checked before sending: type, size, empty body
            return Outcome(m, Status.REJECTED, error=f"the client refused it: {exc}")
        except Exception as exc:
            self._broken = True
            raise BrokerWide(_describe(exc)) from exc
        try:
            receipt = await self._answer(future)  # the batch's deadline is publish_in_waves's
        except BrokerWide:
            raise
        except Exception as exc:
            return self._failed(m, exc)
        return Outcome(m, Status.DELIVERED, location=location(msg.topic, receipt))

    def _failed(self, m: Message, exc: Exception) -> Outcome:
        """A send that did not end in SEND_OK: the message's own fault → REJECTED/RETRY, else BrokerWide."""
        exc_mod = self._rmq.v5.exception
        code = getattr(exc, "code", None)
        why = _describe(exc)
        if not isinstance(exc, exc_mod.ClientException) or isinstance(exc, exc_mod.IllegalStateException):
            self._broken = True  # no answer (gRPC UNAVAILABLE, DEADLINE_EXCEEDED): a new channel next time
            raise BrokerWide(why) from exc
        if code in BROKER_WIDE_CODES:
            raise BrokerWide(why) from exc
        if code == TOPIC_NOT_FOUND or isinstance(exc, exc_mod.NotFoundException):
            self._kinds.clear()
            return Outcome(m, Status.RETRY, error=f"topic {rocketmq_topic(m.topic)!r} does not exist: {why}")
        if isinstance(
            exc,
            (
                exc_mod.BadRequestException,
                exc_mod.PayloadTooLargeException,
                exc_mod.PayloadEmptyException,
                exc_mod.RequestHeaderFieldsTooLargeException,
                exc_mod.UnsupportedException,
                exc_mod.IllegalArgumentException,
            ),
        ):
            return Outcome(m, Status.REJECTED, error=f"the broker refused it: {why}")
        return Outcome(m, Status.RETRY, error=why)

    # -- declaring (TopicAdmin) -------------------------------------------------------------------

    def admin(self) -> RocketMQAdmin:
        """The remoting-protocol admin client on the URL's name server."""
        return RocketMQAdmin.for_url(self.config, timeout_s=min(self.timeout_s, 10.0))

    def _admin_call(self, doing: str, call: Callable[[RocketMQAdmin], T]) -> T:
        """Run ``call`` with the admin client; an unreachable name server says which one was tried."""
        try:
            return call(self.admin())
        except BrokerError as exc:
            if not exc.retriable:
                raise
            raise BrokerError(
                f"RocketMQ name server {self.config.namesrv} (from {safe_url(self.url)!r}; set it with "
                f"?namesrv=HOST:PORT) while {doing}: {exc}"
            ) from exc

    def declare(self, topics: Sequence[str], spec: TopicSpec | None = None) -> list[Declared]:
        """Create each topic and its dead-letter topic as FIFO topics on every master (``--partitions``
        is the queues per broker), and the consumer group if asked (orderly, 16 retries before
        RocketMQ's own ``%DLQ%``) with its offsets at each queue's first message where it has none
        (RocketMQ would start it at the last: :meth:`RocketMQAdmin.start_group_at_first`).
        A topic that exists is left as it is: NORMAL is said to keep no
        order, DELAY or TRANSACTION is a ConfigError (the relay's messages are neither)."""
        spec = spec or TopicSpec()
        if spec.replication_factor is not None:
            raise ConfigError(
                "RocketMQ keeps copies per broker (a master's slaves, brokerRole SYNC_MASTER), not per "
                "topic; --replication-factor is for Kafka and NATS (zeroloss doctor checks the brokers)"
            )
        queues = spec.partitions or self.queues
        try:
            names = {t: rocketmq_topic(t) for t in with_dead_letters(topics)}
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        subscribed = [names[t] for t in topics]
        return self._admin_call("declaring", lambda admin: self._declare(admin, names, queues, spec.group, subscribed))

    def _declare(
        self,
        admin: RocketMQAdmin,
        names: dict[str, str],
        queues: int,
        group: str | None,
        subscribed: Sequence[str] = (),
    ) -> list[Declared]:
        out: list[Declared] = []
        masters = admin.masters()
        for topic, name in names.items():
            configs = {addr: admin.topic_config(name, addr) for addr in masters.values()}
            found = [c for c in configs.values() if c is not None]
            kinds = sorted({admin.message_type(c) for c in found})
            unusable = [k for k in kinds if k not in ("FIFO", "NORMAL")]
            if unusable:
                raise ConfigError(
                    f"RocketMQ topic {name!r} exists with message type {', '.join(unusable)}; the relay "
                    f"sends FIFO (or NORMAL) messages: use another topic or recreate it"
                )
            missing = [addr for addr, c in configs.items() if c is None]
            if missing:
                kind = kinds[0] if kinds else "FIFO"
                for addr in missing:
                    admin.create_topics({name: kind}, queues=queues, brokers=[addr])
            detail = f"RocketMQ topic {name}" if name != topic else ""
            kind = kinds[0] if kinds else "FIFO"
            detail = ", ".join(
                x
                for x in (
                    detail,
                    f"{kind}, {queues if not found else found[0].get('writeQueueNums')} "
                    f"queue(s) on {len(masters)} broker(s)",
                )
                if x
            )
            if kind == "NORMAL":
                detail += "; NORMAL keeps no order per key: a FIFO topic does"
            out.append(Declared("topic", topic, "created" if not found else "exists", detail))
        if group:
            exists = admin.group_config(group) is not None
            if not exists:
                admin.create_group(group, fifo=True)
            config = admin.group_config(group) or {}
            # Else its first receive would start at each queue's last message (rocketmq_admin).
            started = admin.start_group_at_first(group, subscribed)
            out.append(
                Declared(
                    "consumer group",
                    group,
                    "exists" if exists else "created",
                    f"orderly {config.get('consumeMessageOrderly')}, retry max times "
                    f"{config.get('retryMaxTimes')} before %DLQ%{group}"
                    + (f"; set to read {started} queue(s) from their first message" if started else ""),
                )
            )
        return out

    def delete(self, topics: Sequence[str]) -> None:
        """Delete the topics and their dead-letter topics from every master and the name server."""
        names = []
        for t in with_dead_letters(topics):
            try:
                names.append(rocketmq_topic(t))
            except ValueError:
                continue  # cannot exist on RocketMQ
        self._admin_call("deleting", lambda admin: admin.delete_topics(names))

    def delete_group(self, group: str) -> None:
        """Delete the consumer group and its offsets from every master (GroupAdmin)."""
        self._admin_call(f"deleting consumer group {group!r}", lambda admin: admin.delete_group(group))


def _describe(exc: BaseException) -> str:
    """An exception from the client or gRPC as one line: gRPC errors by their status code."""
    code = getattr(exc, "code", None)
    if callable(code):  # grpc.RpcError: code() is a grpc.StatusCode
        details = getattr(exc, "details", lambda: "")()
        return f"gRPC {getattr(code(), 'name', code())}: {details}"
    name = BROKER_WIDE_CODES.get(code) if isinstance(code, int) else None
    return f"{type(exc).__name__}: {exc}" + (f" [{name}]" if name else "")
