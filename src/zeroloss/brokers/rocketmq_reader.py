"""RocketMQ's :class:`~zeroloss.brokers.base.TopicReader` (``zeroloss dlq``, the demo): a topic's
messages read where they are, over the remoting protocol, without consuming them. The name
server's route names each broker and queue; each queue is pulled from its min to its max offset as
the built-in ``TOOLS_CONSUMER`` group, committing no offset. Why not a SimpleConsumer in a
throwaway group: docs/design.md, "brokers/rocketmq_subscription.py"."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from zeroloss.brokers._batch import KEY_HEADER, value_bytes
from zeroloss.brokers.base import DLQ_SUFFIX, Stored
from zeroloss.brokers.rocketmq_fields import is_system_property, key_text, rocketmq_topic
from zeroloss.brokers.rocketmq_remoting import (
    RequestCode,
    ResponseCode,
    StoredMessage,
    decode_messages,
    loads,
    remoting_call,
)
from zeroloss.brokers.rocketmq_url import parse_url
from zeroloss.errors import BrokerError, ConfigError
from zeroloss.message import ID_HEADER

READER_GROUP = "TOOLS_CONSUMER"  # built into every broker; mqadmin reads messages as it
PULL_SUBSCRIPTION_FLAG = 4  # sysFlag: the subscription comes with the request (no commit, no suspend)
PULL_BATCH = 32
AGAIN = (ResponseCode.PULL_NOT_FOUND, ResponseCode.PULL_RETRY_IMMEDIATELY)  # nothing at that offset now


class RocketMQReader:
    """Reads a topic's messages where they are (:class:`~zeroloss.brokers.base.TopicReader`); see
    the module docstring. Nothing held: one connection per request."""

    def __init__(self, url: str, *, timeout_s: float = 30.0) -> None:
        self.url = url
        config = parse_url(url)
        self.namesrv = config.namesrvs[0]  # the first: reading is a tool's job, not failover's
        self.credentials = config.credentials
        self.timeout_s = timeout_s

    def _call(self, address: tuple[str, int], code: int, fields: dict[str, str]) -> tuple[dict[str, Any], bytes]:
        try:
            return remoting_call(address, code, fields, timeout=self.timeout_s, credentials=self.credentials)
        except (OSError, ValueError) as exc:
            raise BrokerError(
                f"RocketMQ at {address[0]}:{address[1]} (remoting protocol): {type(exc).__name__}: {exc}"
            ) from exc

    def _route(self, name: str) -> dict[str, Any] | None:
        header, body = self._call(self.namesrv, RequestCode.GET_ROUTEINFO_BY_TOPIC, {"topic": name})
        if header.get("code") == ResponseCode.TOPIC_NOT_EXIST:
            return None
        if header.get("code") != ResponseCode.SUCCESS:
            raise BrokerError(
                f"RocketMQ name server: route of {name}: code {header.get('code')}, {header.get('remark')}"
            )
        route: dict[str, Any] = loads(body)
        return route

    def _offset(self, broker: tuple[str, int], code: int, name: str, queue: int) -> int:
        header, _ = self._call(broker, code, {"topic": name, "queueId": str(queue)})
        if header.get("code") != ResponseCode.SUCCESS:
            raise BrokerError(
                f"RocketMQ broker: offset of {name}/{queue}: code {header.get('code')}, {header.get('remark')}"
            )
        return int(header["extFields"]["offset"])

    def read(self, topic: str) -> Iterator[Stored]:
        """Every message of ``topic``, oldest stored first, left where it is."""
        origin = topic[: -len(DLQ_SUFFIX)] if topic.endswith(DLQ_SUFFIX) else topic
        try:
            name, origin_name = rocketmq_topic(topic), rocketmq_topic(origin)
        except ValueError as exc:  # a name RocketMQ cannot have: no such topic, whatever the broker says
            raise ConfigError(str(exc)) from None
        route = self._route(name)
        if route is None:
            if origin == topic or self._route(origin_name) is None:  # a typo, not "none yet"
                raise ConfigError(
                    f"no topic {origin_name!r} nor {name!r} at the name server "
                    f"{self.namesrv[0]}:{self.namesrv[1]}: check the name"
                )
            return
        masters = {b["brokerName"]: b["brokerAddrs"].get("0") for b in route.get("brokerDatas", [])}
        found: list[StoredMessage] = []
        for q in route.get("queueDatas", []):
            addr = masters.get(q["brokerName"])
            if not addr:
                raise BrokerError(f"RocketMQ: topic {name} on {q['brokerName']}, which has no master now")
            host, _, port = addr.rpartition(":")
            broker = (host, int(port))
            for queue in range(int(q["readQueueNums"])):
                found.extend(self._queue(broker, name, queue))
        # Queues are independent logs: oldest first across them means holding them all (a dead-letter
        # topic is small; a large topic read this way costs its size in memory).
        found.sort(key=lambda s: (s.store_timestamp_ms, s.queue_id, s.queue_offset))
        for s in found:
            props = dict(s.properties)
            mid = props.get(ID_HEADER) or props.get("UNIQ_KEY")
            key = key_text(
                props.get(KEY_HEADER), props.get("KEYS", "").split(), props.get("__SHARDINGKEY"), ID_HEADER in props
            )
            headers = tuple(
                (k, value_bytes(v))
                for k, v in sorted(props.items())
                if k not in (ID_HEADER, KEY_HEADER) and not is_system_property(k)
            )
            yield Stored(
                f"{name}/{s.queue_id}/{s.queue_offset}",
                s.queue_offset,
                mid,
                None if key is None else value_bytes(key),
                s.body,
                headers,
                partition=s.queue_id,
            )

    def _queue(self, broker: tuple[str, int], name: str, queue: int) -> list[StoredMessage]:
        offset = self._offset(broker, RequestCode.GET_MIN_OFFSET, name, queue)
        end = self._offset(broker, RequestCode.GET_MAX_OFFSET, name, queue)
        out: list[StoredMessage] = []
        while offset < end:
            header, body = self._call(
                broker,
                RequestCode.PULL_MESSAGE,
                {
                    "consumerGroup": READER_GROUP,
                    "topic": name,
                    "queueId": str(queue),
                    "queueOffset": str(offset),
                    "maxMsgNums": str(PULL_BATCH),
                    "sysFlag": str(PULL_SUBSCRIPTION_FLAG),
                    "commitOffset": "0",
                    "suspendTimeoutMillis": "0",
                    "subscription": "*",
                    "subVersion": "0",
                    "expressionType": "TAG",
                },
            )
            code, ext = header.get("code"), header.get("extFields") or {}
            if code == ResponseCode.SUCCESS:
                try:
                    got = decode_messages(body)
                except ValueError as exc:
                    raise BrokerError(f"RocketMQ: unreadable pull answer, {name}/{queue} at {offset}: {exc}") from exc
                out.extend(got)
                offset = int(ext.get("nextBeginOffset", offset + len(got)))
                if not got:
                    break
            elif code in (ResponseCode.PULL_OFFSET_MOVED, *AGAIN) and int(ext.get("nextBeginOffset", offset)) > offset:
                offset = int(ext["nextBeginOffset"])  # a hole (expired files, a filtered run): on past it
            elif code in AGAIN:
                break
            else:
                raise BrokerError(
                    f"RocketMQ broker: pull of {name}/{queue} at {offset}: code {code}, {header.get('remark')}"
                )
        return out

    def close(self) -> None:
        """Nothing held: one connection per request."""
