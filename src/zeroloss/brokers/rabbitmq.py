"""RabbitMQ adapter, publishing side (aio-pika on a private event loop): publisher confirms,
mandatory routing, persistent messages, quorum queues; a fanout exchange and a queue per topic and
their ``.dlq`` pair, declared on first use or by :meth:`RabbitBroker.declare`; batches go in
key waves. The consume side is :mod:`zeroloss.brokers.rabbitmq_subscription`.
The topology and the outcomes: docs/design.md, "brokers/rabbitmq.py"."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from zeroloss.brokers._batch import KEY_HEADER, BrokerWide, duplicate_header, publish_in_waves
from zeroloss.brokers._loop import LoopThread
from zeroloss.brokers.base import Declared, Outcome, Status, Stored, TopicSpec, with_dead_letters
from zeroloss.errors import BrokerError, ConfigError, MissingExtraError
from zeroloss.message import ID_HEADER, Message

log = logging.getLogger(__name__)

DLQ_SUFFIX = ".dlq"
DEADLINE_GRACE_S = 2.0  # past the batch's own deadline: for the cancellation of what was cut
DELIVERY_COUNT_HEADER = "x-delivery-count"


class _ConnectErrorRaisedToUs(logging.Filter):
    """aiormq logs a failed connect at ERROR and raises it; the adapters raise it again as a
    BrokerError naming the broker, which the caller reports: the ERROR line said it twice, first
    in the library's words."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("error when creating transport")


def aio_pika_module() -> Any:
    try:
        import aio_pika
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise MissingExtraError("aio-pika", "rabbitmq", "the RabbitMQ broker adapter") from exc
    connection_log = logging.getLogger("aiormq.connection")
    if not any(isinstance(f, _ConnectErrorRaisedToUs) for f in connection_log.filters):
        connection_log.addFilter(_ConnectErrorRaisedToUs())
    return aio_pika


def check_url(url: str) -> str:
    if not url.startswith(("amqp://", "amqps://")):
        raise ConfigError(f"not an AMQP URL: {url!r}; write amqp://USER:PASSWORD@HOST[:PORT]/[VHOST]")
    return url


def queue_arguments(topic: str, delivery_limit: int) -> dict[str, Any]:
    """The arguments of the quorum queue ``<topic>`` (the consumers' queue)."""
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": topic + DLQ_SUFFIX,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-delivery-limit": delivery_limit,
    }


async def declare_topology(channel: Any, topic: str, delivery_limit: int) -> None:
    """Declare (idempotently) the exchanges and quorum queues of ``topic``; the broker raises a
    channel error (406 PRECONDITION_FAILED) when something of that name exists differently."""
    ap = aio_pika_module()
    dead = topic if topic.endswith(DLQ_SUFFIX) else topic + DLQ_SUFFIX
    dlx = await channel.declare_exchange(dead, ap.ExchangeType.FANOUT, durable=True)
    dlq = await channel.declare_queue(dead, durable=True, arguments={"x-queue-type": "quorum"})
    await dlq.bind(dlx)
    if topic == dead:
        return
    ex = await channel.declare_exchange(topic, ap.ExchangeType.FANOUT, durable=True)
    q = await channel.declare_queue(topic, durable=True, arguments=queue_arguments(topic, delivery_limit))
    await q.bind(ex)


class RabbitBroker:
    """Publishes batches to RabbitMQ with publisher confirms; see docs/design.md, "brokers/rabbitmq.py"."""

    def __init__(
        self, url: str, *, timeout_s: float = 30.0, delivery_limit: int = 20, connection_name: str = "zeroloss-relay"
    ) -> None:
        self._ap = aio_pika_module()
        import aiormq

        self._aiormq = aiormq
        self.url = check_url(url)
        self.timeout_s = timeout_s
        self.delivery_limit = delivery_limit
        self.connection_name = connection_name  # shown in the management UI's connection list
        self._loop = LoopThread("zeroloss-rabbitmq")
        self._conn: Any = None
        self._channel: Any = None  # the confirm channel publishing goes through
        self._exchanges: dict[str, Any] = {}  # topic → declared exchange on this connection
        self._conflicts: dict[str, str] = {}  # topic → why its topology cannot be declared
        self._stale: set[str] = set()  # topics a message came back from unroutable
        self._broken = False  # a send failed broker-wide: replace the connection before the next batch
        self.connections_made = 0  # tests read it

    # -- the sync face --------------------------------------------------------------------

    def publish(self, messages: Sequence[Message]) -> list[Outcome]:
        if not messages:
            return []
        try:
            # _publish keeps its own deadline of timeout_s; this one only backs it up.
            outcomes = self._loop.run(self._publish(messages), self.timeout_s + DEADLINE_GRACE_S)
        except TimeoutError:
            self._drop()
            raise BrokerError(f"RabbitMQ at {self._where} did not confirm within {self.timeout_s}s") from None
        except BrokerWide as exc:
            self._drop()
            raise BrokerError(f"RabbitMQ at {self._where}: {exc}") from exc
        if self._broken:  # a send failed broker-wide after part was acknowledged: keep that, not the connection
            self._drop()
        return outcomes

    def _drop(self) -> None:
        with contextlib.suppress(TimeoutError, RuntimeError):
            self._loop.run(self._drop_connection(), 10.0)

    def _admin_run(self, coro: Any, topics: Sequence[str], doing: str) -> Any:
        try:
            return self._loop.run(coro, self.timeout_s * (2 + len(topics)))
        except TimeoutError:
            self._drop()
            raise BrokerError(
                f"RabbitMQ at {self._where} did not answer within {self.timeout_s}s while {doing}"
            ) from None
        except BrokerWide as exc:
            self._drop()
            if isinstance(exc.__cause__, self._aiormq.exceptions.ProbableAuthenticationError):
                # The user and password are part of the URL: a configuration error, not an outage.
                raise ConfigError(f"RabbitMQ at {self._where} refused the login in the URL: {exc.__cause__}") from exc
            if isinstance(exc.__cause__, self._aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(
                exc.__cause__
            ):
                # Closed in answer to connection.open: the one thing checked there is the vhost.
                vhost = self.url.rpartition("@")[2].partition("/")[2] or "/"
                raise ConfigError(
                    f"RabbitMQ at {self._where} closed the connection on open: the virtual host "
                    f"{vhost!r} in the URL does not exist or the user may not use it"
                ) from exc
            raise BrokerError(f"RabbitMQ at {self._where}: {exc}") from exc

    def declare(self, topics: Sequence[str], spec: TopicSpec | None = None) -> list[Declared]:
        """Declare each topic's exchanges and quorum queues (docs/design.md, "brokers/rabbitmq.py")."""
        spec = spec or TopicSpec()
        if spec.partitions is not None:
            raise ConfigError("RabbitMQ queues have no partitions; --partitions is for Kafka")
        if spec.replication_factor is not None:
            # x-quorum-initial-group-size is one of the arguments a re-declaration must repeat: the
            # relay and the consumers declare the queue with fixed arguments and would be refused.
            raise ConfigError(
                "--replication-factor is not taken for RabbitMQ: a quorum queue gets a replica on "
                "every node of the cluster (RabbitMQ's default initial group size); to limit it, "
                "use a policy or rabbitmq-queues grow/shrink"
            )
        out: list[Declared] = self._admin_run(self._declare_ahead(topics), topics, "declaring")
        if spec.group:
            out.append(
                Declared(
                    "consumer group",
                    spec.group,
                    "nothing needed",
                    "RabbitMQ consumers of a topic share its queue; the group only names their inbox claims",
                )
            )
        return out

    async def _queue_exists(self, name: str) -> bool:
        try:
            async with self._conn.channel(publisher_confirms=False) as ch:  # a 404 closes this channel only
                await ch.declare_queue(name, passive=True)
        except self._aiormq.exceptions.ChannelNotFoundEntity:
            return False
        return True

    async def _declare_ahead(self, topics: Sequence[str]) -> list[Declared]:
        await self._connect()
        out: list[Declared] = []
        for topic in dict.fromkeys(topics):
            names = with_dead_letters([topic])
            try:
                existed = {n: await self._queue_exists(n) for n in names}
                async with self._conn.channel(publisher_confirms=False) as ch:
                    await declare_topology(ch, topic, self.delivery_limit)
            except self._aiormq.exceptions.ChannelPreconditionFailed as exc:
                raise ConfigError(
                    f"RabbitMQ already has {topic!r} (or its dead-letter queue) declared with other "
                    f"settings: {exc}; delete it or use another topic"
                ) from exc
            except self._aiormq.exceptions.ChannelAccessRefused as exc:
                raise ConfigError(f"RabbitMQ refused access declaring {topic!r}: {exc}") from exc
            except self._wide_errors() as exc:
                raise BrokerWide(f"declaring {topic!r} failed: {type(exc).__name__}: {exc}") from exc
            self._exchanges.pop(topic, None)  # fetched again by the next publish
            for n in names:
                detail = f"quorum, fed by fanout exchange {n}"
                if not n.endswith(DLQ_SUFFIX):
                    detail += f", x-delivery-limit {self.delivery_limit}, dead letters to {n}{DLQ_SUFFIX}"
                out.append(Declared("queue", n, "exists" if existed[n] else "created", detail))
        return out

    def delete(self, topics: Sequence[str]) -> None:
        self._admin_run(self._delete(topics), topics, "deleting")

    def read(self, topic: str) -> Iterator[Stored]:
        """Refused: a queue cannot be read without taking its messages. Peeking (get, then requeue)
        counts as a delivery, and quorum queues on RabbitMQ 4.0-4.2 drop a message returned 20
        times by default: listing dead letters could lose them."""
        raise ConfigError(
            f"reading {topic!r} on RabbitMQ is not supported: a queue cannot be read without "
            "taking messages off it, and requeueing them counts toward a quorum queue's delivery "
            "limit (RabbitMQ 4.0-4.2 drop a message past it by default; the management UI's Get "
            "messages requeues the same way). zeroloss dlq reads Kafka, NATS, Redis and RocketMQ"
        )

    async def _delete(self, topics: Sequence[str]) -> None:
        await self._connect()
        for name in with_dead_letters(topics):
            self._exchanges.pop(name, None)
            for kind in ("queue", "exchange"):
                try:  # one channel per call: a 404 on one closes that channel
                    async with self._conn.channel(publisher_confirms=False) as ch:
                        if kind == "queue":
                            await ch.queue_delete(name)
                        else:
                            await ch.exchange_delete(name)
                except self._aiormq.exceptions.ChannelNotFoundEntity:
                    pass
                except self._wide_errors() as exc:
                    raise BrokerWide(f"deleting {kind} {name!r} failed: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        self._drop()
        self._loop.close()

    @property
    def _where(self) -> str:
        return self.url.rpartition("@")[2]  # never the password

    # -- on the loop ------------------------------------------------------------------------

    def _wide_errors(self) -> tuple[type[BaseException], ...]:
        return (
            self._aiormq.exceptions.AMQPError,
            self._aiormq.exceptions.ChannelInvalidStateError,
            ConnectionError,
            OSError,
            asyncio.TimeoutError,
        )

    async def _connect(self) -> Any:
        if (
            self._conn is not None
            and not self._conn.is_closed
            and self._channel is not None
            and not self._channel.is_closed
            and not self._broken
        ):
            return self._channel
        await self._drop_connection()
        try:
            self._conn = await self._ap.connect(
                self.url, timeout=self.timeout_s, client_properties={"connection_name": self.connection_name}
            )
            self._channel = await self._conn.channel(publisher_confirms=True, on_return_raises=True)
        except self._wide_errors() as exc:
            await self._drop_connection()
            raise BrokerWide(f"cannot connect: {type(exc).__name__}: {exc}") from exc
        self.connections_made += 1
        return self._channel

    async def _drop_connection(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        self._broken = False
        self._exchanges.clear()
        self._conflicts.clear()
        self._stale.clear()
        if conn is not None and not conn.is_closed:
            try:
                await asyncio.wait_for(conn.close(), 5.0)
            except Exception:  # it is being thrown away; a broken one may refuse to close cleanly
                log.debug("closing a RabbitMQ connection failed", exc_info=True)

    async def _declare(self, topics: set[str]) -> None:
        """Declare the topology of topics not yet declared on this connection, on a channel of
        its own: a conflict closes that channel, never the confirm channel."""
        for topic in self._stale:
            self._exchanges.pop(topic, None)
        self._stale.clear()
        self._conflicts.clear()  # looked at again every batch: an operator may have fixed it
        todo = sorted(t for t in topics if t not in self._exchanges and t not in self._conflicts)
        for topic in todo:
            try:
                async with self._conn.channel(publisher_confirms=False) as ch:
                    await declare_topology(ch, topic, self.delivery_limit)
            except self._aiormq.exceptions.ChannelPreconditionFailed as exc:
                self._conflicts[topic] = f"topology conflict for {topic!r}: {exc}"
                log.error("RabbitMQ: %s", self._conflicts[topic])
                continue
            except self._aiormq.exceptions.ChannelAccessRefused as exc:
                self._conflicts[topic] = f"access refused declaring {topic!r}: {exc}"
                continue
            except self._wide_errors() as exc:
                raise BrokerWide(f"declaring {topic!r} failed: {type(exc).__name__}: {exc}") from exc
            self._exchanges[topic] = await self._channel.get_exchange(topic, ensure=False)

    async def _publish(self, messages: Sequence[Message]) -> list[Outcome]:
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        async with asyncio.timeout_at(deadline):  # connecting counts against the batch's time
            await self._connect()
            await self._declare({m.topic for m in messages})
        return await publish_in_waves(messages, self._send, deadline)

    async def _send(self, m: Message) -> Outcome:
        if m.topic in self._conflicts:
            return Outcome(m, Status.REJECTED, error=self._conflicts[m.topic])
        if (dup := duplicate_header(m.headers)) is not None:
            return Outcome(m, Status.REJECTED, error=f"header {dup!r} appears twice; AMQP headers hold one value")
        exchange = self._exchanges[m.topic]
        # Bytes travel as AMQP byte arrays ('x'): pamqp encodes bytearray, not bytes.
        headers: dict[str, Any] = {k: bytearray(v) for k, v in m.headers}
        headers[ID_HEADER] = m.id
        if m.key is not None:
            headers[KEY_HEADER] = bytearray(m.key)
        body = self._ap.Message(
            m.value, headers=headers, message_id=m.id, delivery_mode=self._ap.DeliveryMode.PERSISTENT
        )
        try:
            await exchange.publish(body, routing_key=m.topic, mandatory=True, timeout=self.timeout_s)
        except (TypeError, ValueError) as exc:  # refused by the frame encoder, before sending
            return Outcome(m, Status.REJECTED, error=f"cannot encode as AMQP: {exc}")
        except self._aiormq.exceptions.PublishError as exc:  # basic.return: no queue bound
            self._stale.add(m.topic)  # declared again (re-bound) before the next batch
            why = exc.args[0] if exc.args else exc
            return Outcome(m, Status.RETRY, error=f"unroutable: returned by exchange {m.topic!r}: {why}")
        except self._aiormq.exceptions.DeliveryError as exc:  # basic.nack
            return Outcome(m, Status.RETRY, error=f"nacked by the broker (queue full or internal error): {exc}")
        except self._wide_errors() as exc:
            self._broken = True
            raise BrokerWide(f"{type(exc).__name__}: {exc}") from exc
        return Outcome(m, Status.DELIVERED, location=m.topic)
