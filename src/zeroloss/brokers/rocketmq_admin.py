"""RocketMQ admin work its gRPC proxy does not offer, over the remoting protocol
(:mod:`zeroloss.brokers.rocketmq_remoting`): create and delete topics (with their RocketMQ 5
message type) and consumer groups, read a broker's configuration and a group's, query and read
messages. The brokers are found through the name server's cluster info: topics and groups are made
on every master of the cluster, as ``mqadmin updateTopic -c CLUSTER`` does. Milliseconds per
request where ``mqadmin`` takes a JVM start. (Over 400 lines: one request per admin verb, each
short; split by verb, each module would repeat the connection and error handling.)"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from zeroloss.brokers.rocketmq_remoting import (
    Credentials,
    RemotingError,
    RequestCode,
    ResponseCode,
    StoredMessage,
    decode_messages,
    loads,
    parse_address,
    remoting_call,
)
from zeroloss.brokers.rocketmq_url import RocketMQURL, namesrv_addresses
from zeroloss.errors import BrokerError, ConfigError

MESSAGE_TYPES = ("NORMAL", "FIFO", "DELAY", "TRANSACTION")
MASTER_ID = 0


@dataclass(frozen=True)
class ClusterInfo:
    """What the name server knows: broker name → {broker id → address} (id 0 is the master), and
    cluster name → broker names."""

    brokers: dict[str, dict[int, str]] = field(default_factory=dict)
    clusters: dict[str, list[str]] = field(default_factory=dict)

    def masters(self, cluster: str | None = None) -> dict[str, str]:
        """Broker name → its master's address, of ``cluster`` (every cluster when None)."""
        names = self.clusters.get(cluster, []) if cluster is not None else list(self.brokers)
        return {n: self.brokers[n][MASTER_ID] for n in names if MASTER_ID in self.brokers.get(n, {})}

    def replicas(self, broker: str) -> dict[int, str]:
        return dict(self.brokers.get(broker, {}))


class RocketMQAdmin:
    """Admin requests through the name server at ``namesrv`` (``host:port``); every failure to reach
    it or a broker is a retriable :class:`BrokerError`, a refused request a :class:`RemotingError`."""

    def __init__(
        self,
        namesrv: str,
        *,
        timeout_s: float = 10.0,
        cluster: str | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        self.namesrv = namesrv
        self.credentials = credentials  # every request signed with them (a broker with ACL checks)
        self.namesrvs = namesrv_addresses(namesrv)  # several: each is asked in turn until one answers
        self.address = self.namesrvs[0]
        self.timeout_s = timeout_s
        self.cluster = cluster

    @classmethod
    def for_url(cls, config: RocketMQURL, timeout_s: float = 10.0) -> RocketMQAdmin:
        """The admin of a parsed ``rocketmq://`` URL: its name servers, cluster and credentials."""
        return cls(config.namesrv, timeout_s=timeout_s, cluster=config.cluster, credentials=config.credentials)

    # -- requests ----------------------------------------------------------------------------

    def call(
        self, address: tuple[str, int] | str, code: int, fields: Mapping[str, str] | None = None, body: bytes = b""
    ) -> tuple[dict[str, Any], bytes]:
        """One request to ``address`` (the name server's or a broker's); the answer as it is."""
        where = parse_address(address, 10911) if isinstance(address, str) else address
        # The name servers share nothing and each knows every broker: the next one answers as well.
        tried = self.namesrvs if where == self.address else (where,)
        failures = []
        for one in tried:
            try:
                return remoting_call(one, code, fields, body, self.timeout_s, self.credentials)
            except (OSError, ValueError) as exc:  # ValueError: an answer that is not a remoting frame
                failures.append(f"{one[0]}:{one[1]} (request {code}): {type(exc).__name__}: {exc}")
                error = exc
        raise BrokerError(f"RocketMQ at {'; at '.join(failures)}", retriable=True) from error

    def request(
        self,
        address: tuple[str, int] | str,
        code: int,
        fields: Mapping[str, str] | None = None,
        body: bytes = b"",
        what: str = "",
    ) -> bytes:
        """:meth:`call`, and the answer's body when its code is SUCCESS, else RemotingError."""
        header, answer = self.call(address, code, fields, body)
        status = int(header.get("code", -1))
        if status != ResponseCode.SUCCESS:
            raise RemotingError(what or f"request {code} {dict(fields or {})}", status, str(header.get("remark")))
        return answer

    # -- the name server ----------------------------------------------------------------------

    def cluster_info(self) -> ClusterInfo:
        data = loads(self.request(self.address, RequestCode.GET_BROKER_CLUSTER_INFO, what="cluster info"))
        brokers = {
            name: {int(i): addr for i, addr in (b.get("brokerAddrs") or {}).items()}
            for name, b in (data.get("brokerAddrTable") or {}).items()
        }
        return ClusterInfo(brokers, {c: list(ns) for c, ns in (data.get("clusterAddrTable") or {}).items()})

    def masters(self) -> dict[str, str]:
        """Broker name → master address, of this admin's cluster (all when None); BrokerError if none."""
        found = self.cluster_info().masters(self.cluster)
        if not found:
            where = f"cluster {self.cluster!r}" if self.cluster else "any cluster"
            raise BrokerError(f"the name server at {self.namesrv} knows no master broker in {where}", retriable=True)
        return found

    def broker_registered(self, address: str) -> bool:
        """Whether the name server lists a broker at ``address`` (``host:port``)."""
        try:
            info = self.cluster_info()
        except RemotingError:
            return False
        return any(address in addrs.values() for addrs in info.brokers.values())

    def routed(self, topic: str) -> bool:
        """Whether the name server has a route for ``topic``."""
        header, _ = self.call(self.address, RequestCode.GET_ROUTEINFO_BY_TOPIC, {"topic": topic})
        code = int(header.get("code", -1))
        if code == ResponseCode.TOPIC_NOT_EXIST:
            return False
        if code != ResponseCode.SUCCESS:
            raise RemotingError(f"route of topic {topic!r}", code, str(header.get("remark")))
        return True

    def wait_routed(self, topics: Iterable[str], timeout_s: float = 30.0) -> None:
        """Return once the name server routes every topic (a broker registers a new topic at once,
        but the name server answers from what it was told); BrokerError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        for topic in topics:
            while not self.routed(topic):
                if time.monotonic() >= deadline:
                    raise BrokerError(
                        f"the name server at {self.namesrv} has no route to topic {topic!r} "
                        f"{timeout_s:.0f}s after it was created",
                        retriable=True,
                    )
                time.sleep(0.05)

    # -- topics -------------------------------------------------------------------------------

    def topic_config(self, topic: str, broker: str | None = None) -> dict[str, Any] | None:
        """The topic's configuration on ``broker`` (address; the first master when None), None
        when that broker has no such topic. ``attributes["message.type"]`` is its RocketMQ 5 type."""
        address = broker or next(iter(self.masters().values()))
        header, body = self.call(address, RequestCode.GET_TOPIC_CONFIG, {"topic": topic})
        code = int(header.get("code", -1))
        if code == ResponseCode.TOPIC_NOT_EXIST:
            return None
        if code != ResponseCode.SUCCESS:
            raise RemotingError(f"configuration of topic {topic!r}", code, str(header.get("remark")))
        config: dict[str, Any] = loads(body)
        return config

    @staticmethod
    def message_type(config: Mapping[str, Any]) -> str:
        """A topic configuration's message type; a topic made without one counts as NORMAL."""
        return str((config.get("attributes") or {}).get("message.type") or "NORMAL")

    def create_topics(
        self, topics: Mapping[str, str], queues: int = 4, wait_s: float = 30.0, brokers: Iterable[str] | None = None
    ) -> None:
        """Create or update topics, name → message type (NORMAL, FIFO, DELAY, TRANSACTION), on every
        master (or on ``brokers``, addresses), and wait until the name server routes each of them."""
        bad = {t: k for t, k in topics.items() if k not in MESSAGE_TYPES}
        if bad:
            raise ConfigError(f"RocketMQ message types are {', '.join(MESSAGE_TYPES)}, not {bad}")
        for address in brokers if brokers is not None else self.masters().values():
            for name, kind in topics.items():
                # "+message.type=FIFO" is mqadmin updateTopic's -a syntax for a topic attribute.
                self.request(
                    address,
                    RequestCode.UPDATE_AND_CREATE_TOPIC,
                    {
                        "topic": name,
                        "defaultTopic": "TBW102",
                        "readQueueNums": str(queues),
                        "writeQueueNums": str(queues),
                        "perm": "6",
                        "topicFilterType": "SINGLE_TAG",
                        "topicSysFlag": "0",
                        "order": "false",
                        "attributes": f"+message.type={kind}",
                    },
                    what=f"creating topic {name!r} ({kind}) on {address}",
                )
        self.wait_routed(topics, wait_s)

    def delete_topics(self, topics: Iterable[str]) -> None:
        """Delete topics and everything in them from every master and from the name server; a topic
        that does not exist is fine."""
        names = list(topics)
        for address in self.masters().values():
            for name in names:
                self.request(
                    address,
                    RequestCode.DELETE_TOPIC_IN_BROKER,
                    {"topic": name},
                    what=f"deleting topic {name!r} on {address}",
                )
        for name in names:
            fields = {"topic": name} | ({"clusterName": self.cluster} if self.cluster else {})
            self.request(
                self.address, RequestCode.DELETE_TOPIC_IN_NAMESRV, fields, what=f"deleting the route of topic {name!r}"
            )

    # -- consumer groups -------------------------------------------------------------------------

    def create_group(self, group: str, *, fifo: bool = False, retry_max_times: int = 16) -> None:
        """Create or update a consumer group on every master: a gRPC consumer cannot join a group
        that does not exist. ``fifo`` sets consumeMessageOrderly, which a FIFO topic's consumers need
        for per-message-group order; after ``retry_max_times`` failed deliveries a message goes to
        ``%DLQ%<group>``."""
        config = {
            "groupName": group,
            "consumeEnable": True,
            "consumeFromMinEnable": True,
            "consumeBroadcastEnable": False,
            "consumeMessageOrderly": fifo,
            "retryQueueNums": 1,
            "retryMaxTimes": retry_max_times,
            "brokerId": MASTER_ID,
            "whichBrokerWhenConsumeSlowly": 1,
            "notifyConsumerIdsChangedEnable": True,
        }
        for address in self.masters().values():
            self.request(
                address,
                RequestCode.UPDATE_AND_CREATE_SUBSCRIPTIONGROUP,
                body=json.dumps(config).encode(),
                what=f"creating consumer group {group!r} on {address}",
            )

    def group_config(self, group: str, broker: str | None = None) -> dict[str, Any] | None:
        """The group's configuration on ``broker`` (the first master when None), None if it has no
        such group. Read from the list of all groups: asking for one group by name
        (GET_SUBSCRIPTIONGROUP_CONFIG) creates it on a broker with autoCreateSubscriptionGroup."""
        address = broker or next(iter(self.masters().values()))
        data = loads(self.request(address, RequestCode.GET_ALL_SUBSCRIPTIONGROUP_CONFIG, what="consumer groups"))
        found = (data.get("subscriptionGroupTable") or {}).get(group)
        return dict(found) if isinstance(found, dict) else None

    def group_offset(self, group: str, topic: str, queue_id: int, broker: str) -> int | None:
        """The offset ``group`` has committed on one queue of ``topic`` at ``broker``, None when it
        has none (QUERY_CONSUMER_OFFSET with setZeroIfNotFound=false: without it the broker answers
        0 for a group it knows nothing of while the queue's first message is in memory)."""
        header, _ = self.call(
            broker,
            RequestCode.QUERY_CONSUMER_OFFSET,
            {"consumerGroup": group, "topic": topic, "queueId": str(queue_id), "setZeroIfNotFound": "false"},
        )
        code = int(header.get("code", -1))
        if code == ResponseCode.QUERY_NOT_FOUND:
            return None
        if code != ResponseCode.SUCCESS:
            raise RemotingError(
                f"offset of group {group!r} on queue {queue_id} of topic {topic!r} at {broker}",
                code,
                str(header.get("remark")),
            )
        return int((header.get("extFields") or {}).get("offset", 0))

    def missing_offsets(self, group: str, topic: str) -> list[tuple[str, int, int, int]]:
        """The queues of ``topic`` where ``group`` has no committed offset: (broker address, queue,
        first offset, next offset) each."""
        out = []
        for address in self.masters().values():
            config = self.topic_config(topic, address)
            for queue_id in range(int((config or {}).get("readQueueNums", 0))):
                if self.group_offset(group, topic, queue_id, address) is None:
                    out.append((address, queue_id, *self.queue_offsets(address, topic, queue_id)))
        return out

    def start_group_at_first(self, group: str, topics: Iterable[str]) -> int:
        """Commit, for ``group``, each queue's first offset wherever the group has none yet, so that
        it reads every message still stored; the number of queues set.

        Why: the gRPC proxy's receive (a "pop") starts a group without an offset at the queue's LAST
        message (ConsumeInitMode.MAX, fixed in ReceiveMessageActivity) unless the queue's first
        message is still in memory (BrokerConfig.initPopOffsetByCheckMsgInMem, and the commit log
        since it within accessMessageInMemoryMaxRatio of RAM): a backlog published before a new
        group's first receive would be skipped. A queue that already has an offset is left as is.
        Between the query and the commit another consumer's first receive may commit its own
        start: moving it back to the first message redelivers, which the inbox absorbs."""
        done = 0
        topics = list(topics)
        for topic in topics:
            for address, queue_id, first, _next in self.missing_offsets(group, topic):
                self.request(
                    address,
                    RequestCode.UPDATE_CONSUMER_OFFSET,
                    {"consumerGroup": group, "topic": topic, "queueId": str(queue_id), "commitOffset": str(first)},
                    what=f"setting group {group!r} to the first message of queue {queue_id} of {topic!r} on {address}",
                )
                done += 1
        return done

    def delete_group(self, group: str) -> None:
        for address in self.masters().values():
            self.request(
                address,
                RequestCode.DELETE_SUBSCRIPTIONGROUP,
                {"groupName": group, "cleanOffset": "true"},
                what=f"deleting consumer group {group!r} on {address}",
            )

    # -- messages -----------------------------------------------------------------------------

    def query_messages(
        self,
        topic: str,
        key: str,
        *,
        unique: bool = False,
        max_num: int = 32,
        begin_ms: int = 0,
        end_ms: int | None = None,
    ) -> list[StoredMessage]:
        """The stored messages of ``topic`` with message key ``key`` (or message id, ``unique``), from
        every master's index (QUERY_MESSAGE, what ``mqadmin queryMsgByKey`` / ``queryMsgByUniqueKey``
        do); [] when none. The index is written shortly after the message (asynchronously)."""
        fields = {
            "topic": topic,
            "key": key,
            "maxNum": str(max_num),
            "beginTimestamp": str(begin_ms),
            "endTimestamp": str(end_ms if end_ms is not None else int(time.time() * 1000) + 60_000),
        }
        if unique:
            fields["_UNIQUE_KEY_QUERY"] = "true"
        out: list[StoredMessage] = []
        for address in self.masters().values():
            header, body = self.call(address, RequestCode.QUERY_MESSAGE, fields)
            code = int(header.get("code", -1))
            if code == ResponseCode.SUCCESS:
                out.extend(dataclasses.replace(m, broker=address) for m in decode_messages(body))
            elif code not in (ResponseCode.QUERY_NOT_FOUND, ResponseCode.TOPIC_NOT_EXIST):
                raise RemotingError(
                    f"query of {key!r} in topic {topic!r} on {address}", code, str(header.get("remark"))
                )
        return out

    def read_queue(
        self,
        broker: str,
        topic: str,
        queue_id: int,
        offset: int = 0,
        *,
        group: str = "zeroloss-reader",
        batch: int = 32,
    ) -> Iterator[StoredMessage]:
        """Every message of one queue from ``offset`` to its end, leaving them there (PULL_MESSAGE
        with ``group``, which commits no offset; the broker must have the group or create groups)."""
        while True:
            header, body = self.call(
                broker,
                RequestCode.PULL_MESSAGE,
                {
                    "consumerGroup": group,
                    "topic": topic,
                    "queueId": str(queue_id),
                    "queueOffset": str(offset),
                    "maxMsgNums": str(batch),
                    "sysFlag": "4",
                    "commitOffset": "0",
                    "suspendTimeoutMillis": "0",
                    "subscription": "*",
                    "subVersion": "0",
                    "expressionType": "TAG",
                },
            )
            code = int(header.get("code", -1))
            if code in (ResponseCode.PULL_NOT_FOUND, ResponseCode.PULL_OFFSET_MOVED):
                return
            if code not in (ResponseCode.SUCCESS, ResponseCode.PULL_RETRY_IMMEDIATELY):
                raise RemotingError(
                    f"reading queue {queue_id} of topic {topic!r} on {broker}", code, str(header.get("remark"))
                )
            got = [dataclasses.replace(m, broker=broker) for m in decode_messages(body)] if code == 0 else []
            yield from got
            following = int((header.get("extFields") or {}).get("nextBeginOffset", offset))
            if following <= offset and not got:
                return
            offset = following

    def queue_offsets(self, broker: str, topic: str, queue_id: int) -> tuple[int, int]:
        """(first, next) offset of one queue on ``broker``: what a consumer can still read is
        first <= offset < next (0, 0 for a queue or topic the broker does not have)."""
        fields = {"topic": topic, "queueId": str(queue_id)}
        ends = []
        for code in (RequestCode.GET_MIN_OFFSET, RequestCode.GET_MAX_OFFSET):
            header, _ = self.call(broker, code, fields)
            if int(header.get("code", -1)) != ResponseCode.SUCCESS:
                raise RemotingError(
                    f"offsets of queue {queue_id} of topic {topic!r} on {broker}",
                    int(header.get("code", -1)),
                    str(header.get("remark")),
                )
            ends.append(int((header.get("extFields") or {}).get("offset", 0)))
        return ends[0], ends[1]

    def read_topic(self, topic: str, *, group: str = "zeroloss-reader") -> Iterator[StoredMessage]:
        """Every message of ``topic`` on every master, queue by queue, each queue in offset order."""
        for address in self.masters().values():
            config = self.topic_config(topic, address)
            for queue_id in range(int((config or {}).get("readQueueNums", 0))):
                yield from self.read_queue(address, topic, queue_id, group=group)

    # -- brokers ------------------------------------------------------------------------------

    def broker_config(self, broker: str | None = None) -> dict[str, str]:
        """A running broker's configuration as it reports it (what ``mqadmin getBrokerConfig``
        prints); the first master's when ``broker`` (an address) is None."""
        address = broker or next(iter(self.masters().values()))
        text = self.request(address, RequestCode.GET_BROKER_CONFIG, what=f"configuration of broker {address}").decode()
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def update_broker_config(self, settings: Mapping[str, str], broker: str) -> None:
        """Change settings of the running broker at ``broker`` (an address)."""
        body = "".join(f"{k}={v}\n" for k, v in settings.items()).encode()
        self.request(broker, RequestCode.UPDATE_BROKER_CONFIG, body=body, what=f"updating broker {broker}")
