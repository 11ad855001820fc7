"""Consuming Apache RocketMQ 5 through its gRPC proxy (rocketmq-python-client's SimpleConsumer): a
received message stays invisible to the group while zeroloss holds it (extended in the background)
and is acked after the inbox commit; the group's retry limit is ``max_deliveries``; dead letters
go to zeroloss's ``<topic>.dlq`` through :class:`LetterPublisher`. Reading a topic without
consuming it is :mod:`zeroloss.brokers.rocketmq_reader`. Receiving, the delivery limit, dead
letters, names and message fields: docs/design.md, "brokers/rocketmq_subscription.py".
(Over 400 lines: receive, hold, extend, ack and give back share the held messages and their
receipt handles under one lock.)"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from zeroloss.brokers import rocketmq_client
from zeroloss.brokers._batch import KEY_HEADER, text_value, value_bytes
from zeroloss.brokers.base import Outcome, Status, publish_one
from zeroloss.brokers.rocketmq_admin import RocketMQAdmin
from zeroloss.brokers.rocketmq_client import rocketmq_module
from zeroloss.brokers.rocketmq_fields import is_system_property, key_text, rocketmq_topic
from zeroloss.brokers.rocketmq_url import RocketMQURL, parse_url
from zeroloss.brokers.subscription import Delivery, check_id
from zeroloss.errors import BrokerError, ConfigError
from zeroloss.message import ID_HEADER, Message
from zeroloss.received import Received
from zeroloss.urls import safe_url

log = logging.getLogger(__name__)

MIN_INVISIBLE_S = 10  # the proxy refuses a receive with less ("the invisibleTime is too small")
MAX_RECEIVE_BATCH = 32  # the proxy's receive_batch_size
# Exceptions of the client that say the message itself is wrong: the same send fails the same way.
# ValueError: a topic name RocketMQ cannot have (rocketmq_topic), which the proxy would refuse too.
_REFUSED = (
    "BadRequestException",
    "PayloadTooLargeException",
    "PayloadEmptyException",
    "RequestHeaderFieldsTooLargeException",
    "IllegalArgumentException",
    "ValueError",
)


def _broker_error(what: str, exc: BaseException) -> BrokerError:
    return BrokerError(f"RocketMQ {what}: {type(exc).__name__}: {exc}")


# -- dead letters: publishing one message --------------------------------------------------------


class LetterPublisher:
    """A minimal :class:`~zeroloss.brokers.base.Broker` for dead letters: one synchronous send per
    message (the client answers only once the broker stored it; a SYNC_FLUSH broker flushed it).
    The letter goes as a NORMAL message with the key as message key; a dead-letter topic made FIFO
    gets the key (else the id) as message group instead of a refusal."""

    def __init__(self, url: str, *, timeout_s: float = 30.0, config: RocketMQURL | None = None) -> None:
        self._rmq = rocketmq_module()
        self.url = url
        self.config = config or parse_url(url)
        self.timeout_s = timeout_s
        self._producer: Any = None

    def client_config(self) -> Any:
        return rocketmq_client.client_config(self.config, int(self.timeout_s))

    def _started(self) -> Any:
        if self._producer is None:
            producer = self._rmq.Producer(self.client_config())
            try:
                rocketmq_client.start(producer)
            except Exception as exc:
                raise _broker_error(f"at {safe_url(self.url)}: cannot start a producer", exc) from exc
            self._producer = producer
        return self._producer

    def _message(self, m: Message, fifo: bool) -> Any:
        msg = self._rmq.Message()
        msg.topic = rocketmq_topic(m.topic)
        msg.body = m.value
        for k, v in m.headers:
            if k not in (ID_HEADER, KEY_HEADER):
                msg.add_property(k, text_value(v))
        msg.add_property(ID_HEADER, m.id)
        if m.key is not None:
            msg.add_property(KEY_HEADER, text_value(m.key))
            msg.keys = text_value(m.key)
        msg.keys = m.id  # found by its id too (mqadmin queryMsgByKey), as the relay's messages are
        if fifo:
            msg.message_group = text_value(m.key) if m.key is not None else m.id
        return msg

    def publish(self, messages: Sequence[Message]) -> list[Outcome]:
        producer = self._started()
        out: list[Outcome] = []
        for m in messages:
            try:
                try:
                    receipt = producer.send(self._message(m, fifo=False))
                except Exception as exc:
                    if "message type not match" not in str(exc):
                        raise
                    receipt = producer.send(self._message(m, fifo=True))
            except Exception as exc:
                status = Status.REJECTED if type(exc).__name__ in _REFUSED else Status.RETRY
                out.append(Outcome(m, status, error=f"{type(exc).__name__}: {exc}"))
                continue
            out.append(Outcome(m, Status.DELIVERED, location=f"{rocketmq_topic(m.topic)}/{receipt.message_id}"))
        return out

    def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                producer.shutdown()


def _settings_consumer(rmq: Any) -> Any:
    """A SimpleConsumer that keeps the settings the proxy sends (the stock one drops them): the
    group's delivery limit is in them, and their arrival says the proxy accepted the group."""

    class SettingsConsumer(rmq.SimpleConsumer):  # type: ignore[misc]
        max_attempts: int | None = None
        fifo: bool | None = None  # the group's consumeMessageOrderly: its receives are FIFO

        def reset_setting(self, settings: Any) -> None:
            if settings.HasField("backoff_policy") and settings.backoff_policy.max_attempts > 0:
                self.max_attempts = int(settings.backoff_policy.max_attempts)
            if settings.HasField("subscription"):
                self.fifo = bool(settings.subscription.fifo)
            super().reset_setting(settings)

    return SettingsConsumer


@dataclass(slots=True)
class _Held:
    message: Any  # the client's Message; its receipt handle changes at every extension
    extended: float  # monotonic time of the last receive or extension
    # The last receipt handle the broker gave for it. rocketmq-python-client (5.1.x) copies the
    # handle of every visibility-change answer into the message before it checks the answer's
    # status: a refused change leaves the message with an empty handle, and the ack after the inbox
    # commit then fails (50001) and the message comes back. The one kept here is put back.
    handle: str

    def latest_handle(self) -> None:
        """Keep the message's receipt handle if it has one (a change that succeeded, even late,
        gave a new one and retired the old), else give it back the last one it had."""
        if self.message.receipt_handle:
            self.handle = self.message.receipt_handle
        else:
            self.message.receipt_handle = self.handle


class RocketMQSubscription:
    """A :class:`~zeroloss.brokers.subscription.Subscription` on RocketMQ; see docs/design.md,
    "brokers/rocketmq_subscription.py".

    ``invisible_s``: how long a received message stays invisible to the rest of the group without
    an extension (at least 10): after a consumer crash, its messages come back after this long.
    ``settle_s``: how long to wait for the proxy to accept the group's settings at start."""

    def __init__(
        self,
        url: str,
        group: str,
        topics: Sequence[str],
        *,
        timeout_s: float = 30.0,
        invisible_s: float = 30.0,
        settle_s: float = 10.0,
    ) -> None:
        self._rmq = rocketmq_module()
        self.url = url
        self.config = parse_url(url)
        self.group = group
        self.topics = list(topics)
        try:
            self._by_name = {rocketmq_topic(t): t for t in self.topics}
        except ValueError as exc:  # a name no RocketMQ topic can have: no subscription could ever receive
            raise ConfigError(str(exc)) from None
        if invisible_s < MIN_INVISIBLE_S:
            raise ConfigError(f"invisible_s={invisible_s}: RocketMQ's proxy refuses less than {MIN_INVISIBLE_S} s")
        self.invisible_s = math.ceil(invisible_s)
        self.timeout_s = timeout_s
        self.max_deliveries: int | None = None
        self._lock = threading.Lock()  # receipt handles: an ack must use the latest extension's
        self._held: dict[int, _Held] = {}
        self._closed = threading.Event()
        # change_invisible_duration blocks in the client: a pool runs a batch's calls side by side.
        self._calls = concurrent.futures.ThreadPoolExecutor(MAX_RECEIVE_BATCH, f"zeroloss-rocketmq-{group}-calls")
        self._letters = LetterPublisher(url, timeout_s=timeout_s, config=self.config)
        subscription = {name: self._rmq.FilterExpression() for name in self._by_name}
        self._consumer = _settings_consumer(self._rmq)(self.client_config(), group, subscription, await_duration=1)
        self._started = False
        try:
            self._open(settle_s)
        except BaseException:
            self.close()
            raise
        self._extender = threading.Thread(target=self._extend_loop, name=f"zeroloss-rocketmq-{group}", daemon=True)
        self._extender.start()

    def client_config(self) -> Any:
        return rocketmq_client.client_config(self.config, int(self.timeout_s))

    def _open(self, settle_s: float) -> None:
        where = f"at {safe_url(self.url)} (group {self.group}, topics {', '.join(self._by_name)})"
        # The client starts "successfully" with nothing to talk to, and says why only in its own
        # log: an unreachable proxy is told apart from a missing group or topic here.
        refused = rocketmq_client.proxy_refusal(self.config.endpoint, min(self.timeout_s, 5.0))
        if refused is not None:
            raise BrokerError(f"RocketMQ {where}: the proxy does not answer: {refused}") from refused
        try:
            rocketmq_client.start(self._consumer)
        except Exception as exc:
            raise _broker_error(f"{where}: cannot subscribe", exc) from exc
        self._started = True
        event = self._consumer._init_settings_event
        if event is None or not event.wait(settle_s):
            # The settings go to the brokers a topic's route names and are refused for an unknown
            # group; the client says why only in its own log, but a route request answers with the
            # proxy's own refusal (credentials refused by its ACL: 40100 UNAUTHORIZED).
            raise BrokerError(
                f"RocketMQ {where}: the proxy accepted no settings for the consumer within "
                f"{settle_s:.0f}s: the group or a topic does not exist (zeroloss init --target URL "
                f"--group {self.group} TOPIC... creates them), or the proxy cannot reach the broker"
                f"{self._route_refusal()}"
            )
        self.max_deliveries = self._consumer.max_attempts
        self._check_order(where)
        self._start_at_first()

    def _route_refusal(self) -> str:
        """Why the proxy refuses the first topic's route, as a clause of an error message ("" if it does not)."""
        name = next(iter(self._by_name))
        why = rocketmq_client.route_refusal(self._consumer, name, min(self.timeout_s, 5.0))
        return "" if why is None else f"; the proxy refuses the route of {name}: {why}"

    def _check_order(self, where: str) -> None:
        """A FIFO topic read by a group that is not orderly keeps no key order: the proxy receives
        for such a group without the FIFO lock, so a key's next message goes to another consumer
        (or comes first after a redelivery) while the one before it is still being handled
        (measured on 5.5.0). zeroloss promises key order on FIFO topics: such a group is refused."""
        if self._consumer.fifo is not False:
            return
        fifo_type = self._rmq.grpc_protocol.MessageType.FIFO
        unordered = []
        for name in self._by_name:
            try:
                route = self._consumer._retrieve_topic_route_data(name)
            except Exception as exc:  # the receive will say what is wrong with the topic
                log.warning("RocketMQ %s: cannot read the route of %s to check its type (%s)", where, name, exc)
                continue
            if any(fifo_type in q.accept_message_types for q in route.message_queues):
                unordered.append(name)
        if unordered:
            raise ConfigError(
                f"RocketMQ {where}: the group is not orderly (consumeMessageOrderly=false) but "
                f"{', '.join(unordered)} is a FIFO topic: a key's messages would be handled out of "
                f"order; make it orderly: zeroloss init --target URL --group {self.group} TOPIC..., "
                f"or mqadmin updateSubGroup -g {self.group} -o true"
            )

    def _start_at_first(self) -> None:
        """Before the first receive: the group's queues without an offset are set to their first
        message, as ``zeroloss init --group`` does, for a group made otherwise or a queue added since.
        The proxy would start them at the last message and skip the backlog
        (:meth:`~zeroloss.brokers.rocketmq_admin.RocketMQAdmin.start_group_at_first`). This needs
        the name server; without it the consumer still runs, on the offsets it has, and says so."""
        admin = RocketMQAdmin.for_url(self.config, timeout_s=min(self.timeout_s, 10.0))
        try:
            started = admin.start_group_at_first(self.group, list(self._by_name))
        except BrokerError as exc:
            log.warning(
                "RocketMQ group %s: could not check its offsets through the name server %s (%s): on a "
                "queue where it has none its first receive starts at the last message and skips the "
                "backlog (zeroloss init --group %s sets them)",
                self.group,
                self.config.namesrv,
                exc,
                self.group,
            )
            return
        if started:
            log.info("RocketMQ group %s had no offset on %d queue(s): set to their first message", self.group, started)

    # -- receiving ------------------------------------------------------------------------------

    def fetch(self, max_messages: int, timeout_s: float) -> list[Delivery]:
        self._consumer.await_duration = max(1, math.ceil(timeout_s))
        msgs: list[Any] = []
        for _ in self._by_name:  # each receive asks one topic, round robin: go round once at most
            try:
                msgs = list(self._consumer.receive(min(max_messages, MAX_RECEIVE_BATCH), self.invisible_s))
            except Exception as exc:
                raise _broker_error(f"at {safe_url(self.url)}: receive failed", exc) from exc
            if msgs:
                break
        now = time.monotonic()
        out = []
        with self._lock:
            for m in msgs:
                self._held[id(m)] = _Held(m, now, m.receipt_handle)
                out.append(self._delivery(m))
        return out

    def _delivery(self, m: Any) -> Delivery:
        props = dict(m.properties or {})
        topic = self._by_name.get(m.topic, m.topic)
        ours = props.pop(ID_HEADER, None)
        mid, poison = check_id(ours or m.message_id, f"{m.topic}/{m.message_id}")
        key = key_text(props.pop(KEY_HEADER, None), sorted(m.keys or ()), m.message_group, ours is not None)
        # The proxy passes some of RocketMQ's own properties on as user properties (a FIFO
        # message's __SHARDINGKEY): they are not the message's headers, and sent on they would
        # make a dead letter a FIFO message that its NORMAL topic refuses.
        headers = tuple((k, value_bytes(v)) for k, v in sorted(props.items()) if not is_system_property(k))
        if m.corrupted:  # the body's checksum did not match: handling it would act on garbage
            poison = poison or f"message {m.message_id}: its body failed the broker's checksum"
        received = Received(
            mid, topic, 0, -1, None if key is None else value_bytes(key), m.body or b"", headers, m.born_timestamp or 0
        )
        return Delivery(received, m, poison, delivered=m.delivery_attempt or 0)

    # -- settling -------------------------------------------------------------------------------

    def ack(self, d: Delivery) -> None:
        with self._lock:
            held = self._held.get(id(d.token))
            if held is not None:  # a refused visibility change, even one answered late, blanks it
                held.latest_handle()
            try:
                self._consumer.ack(d.token)
            except Exception as exc:
                raise _broker_error(f"ack of {d.received.id}", exc) from exc
            finally:
                self._held.pop(id(d.token), None)

    def touch(self, d: Delivery) -> None:
        with self._lock:
            held = self._held.get(id(d.token))
            if held is not None:
                self._extend([held], time.monotonic())

    def _invisible(self, msgs: Sequence[Any], seconds: int) -> dict[int, BaseException | None]:
        """Under the lock: ``change_invisible_duration(m, seconds)`` for every message at once, so
        that a broker that answers nothing costs one request timeout, not one per message (one
        after another, 32 held messages were 32 timeouts under the lock: acks waited that long,
        and a stop twice as long). id(message) → None if done, else why not."""
        try:
            calls = {id(m): self._calls.submit(self._consumer.change_invisible_duration, m, seconds) for m in msgs}
        except RuntimeError:  # the pool is shut down: the subscription is closed
            return {id(m): BrokerError("the subscription is closed") for m in msgs}
        # The client's own deadline ends each call after its request timeout; the margin is for its threads.
        concurrent.futures.wait(calls.values(), timeout=self.timeout_s + 5)
        return {
            key: call.exception() if call.done() else TimeoutError(f"no answer within {self.timeout_s + 5:.0f}s")
            for key, call in calls.items()
        }

    def _extend(self, helds: Sequence[_Held], now: float) -> None:
        """Under the lock: invisible for another ``invisible_s`` from now."""
        failed = self._invisible([h.message for h in helds], self.invisible_s)
        for held in helds:
            exc = failed[id(held.message)]
            held.latest_handle()
            if exc is None:
                held.extended = now
            else:
                # It may be handed to another consumer; the inbox still lets only one of them commit.
                log.warning(
                    "could not keep message %s invisible (%s: %s): it may be redelivered",
                    held.message.message_id,
                    type(exc).__name__,
                    exc,
                )

    def _extend_loop(self) -> None:
        period = self.invisible_s / 3
        while not self._closed.wait(min(1.0, period / 2)):
            now = time.monotonic()
            with self._lock:
                due = [h for h in self._held.values() if now - h.extended >= period]
                if due and not self._closed.is_set():
                    self._extend(due, now)

    def dead_letter(self, d: Delivery, letter: Message) -> str:
        where = publish_one(self._letters, letter, "dead letter")
        try:
            self.ack(d)
        except BrokerError as exc:
            # The letter is stored; raising would publish it again. The original comes back after
            # invisible_s and is dead-lettered once more (a copy with the same id).
            log.warning(
                "dead letter %s stored; acking the original failed (%s): it will be redelivered", letter.id, exc
            )
        return where

    def release(self, ds: Sequence[Delivery]) -> None:
        """Visible again at once (an invisible duration of 0): redelivered within seconds."""
        self._give_back([d.token for d in ds])

    def _give_back(self, msgs: Sequence[Any]) -> None:
        with self._lock:
            for m in msgs:
                held = self._held.pop(id(m), None)
                if held is not None:
                    held.latest_handle()
            failed = self._invisible(msgs, 0)
        for m in msgs:
            if (exc := failed[id(m)]) is not None:
                log.warning(
                    "could not give message %s back (%s: %s): it comes back after %ds",
                    m.message_id,
                    type(exc).__name__,
                    exc,
                    self.invisible_s,
                )

    def close(self) -> None:
        """What is still held goes back at once rather than after ``invisible_s`` (a handler that
        blew up, a stop mid-batch); a process that dies without closing leaves them to time out."""
        self._closed.set()
        extender = getattr(self, "_extender", None)
        if extender is not None:
            extender.join(self.timeout_s)
        if self._started and self._held:
            self._give_back([h.message for h in list(self._held.values())])
        if self._started:
            self._started = False
            with contextlib.suppress(Exception):
                self._consumer.shutdown()
        self._calls.shutdown(wait=False)  # a call still in flight ends by its own deadline
        self._letters.close()
