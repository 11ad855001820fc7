"""Redis Streams adapter, publishing side (redis-py, synchronous): one ``MULTI``/``EXEC`` of
``XADD``s per batch, one stream entry per message (fields id, value, key, headers) in the stream
named after its topic. The consume side is :mod:`zeroloss.brokers.redis_subscription`.
The fields, durability, order and the HELD rule, dedup, declaring: docs/design.md, "brokers/redis.py"."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from zeroloss.brokers._batch import HELD_REASON
from zeroloss.brokers.base import Declared, Outcome, Status, Stored, TopicSpec, with_dead_letters
from zeroloss.errors import BrokerError, ConfigError, MissingExtraError
from zeroloss.message import Headers, Message

log = logging.getLogger(__name__)

F_ID, F_VALUE, F_KEY, F_HEADERS = b"id", b"value", b"key", b"headers"


def redis_module() -> Any:
    try:
        import redis
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise MissingExtraError("redis", "redis", "the Redis Streams broker adapter") from exc
    return redis


def check_url(url: str) -> str:
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"not a Redis URL: {url!r}; write redis://HOST:6379/DB")
    if not url.startswith("unix://"):  # redis-py would quietly use database 0 for a path like /orders
        db = url.partition("://")[2].partition("?")[0].partition("/")[2].strip("/")
        if db and not db.isdigit():
            raise ConfigError(f"Redis URL {url!r}: the database {db!r} is not a number; write redis://HOST:6379/DB")
    return url


def entry_fields(m: Message) -> dict[bytes, bytes]:
    fields = {F_ID: m.id.encode(), F_VALUE: m.value}
    if m.key is not None:
        fields[F_KEY] = m.key
    if m.headers:
        fields[F_HEADERS] = json.dumps([[k, base64.b64encode(v).decode()] for k, v in m.headers]).encode()
    return fields


def decode_headers(raw: bytes | None) -> Headers:
    """The headers field back to ``((name, bytes), ...)``; ValueError when it is not ours."""
    if not raw:
        return ()
    try:
        return tuple((str(k), base64.b64decode(v, validate=True)) for k, v in json.loads(raw))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"undecodable headers field: {raw[:80]!r}") from exc


def entry_id(fields: dict[bytes, bytes]) -> str | None:
    raw = fields.get(F_ID)
    return raw.decode("utf-8", "replace") if raw is not None else None


class RedisStreamBroker:
    """Publishes batches to Redis Streams; see docs/design.md, "brokers/redis.py"."""

    def __init__(self, url: str, *, timeout_s: float = 30.0, replicas: int = 0) -> None:
        self._r = redis_module()
        self.url = check_url(url)
        self.timeout_s = timeout_s
        self.replicas = replicas
        self._client: Any = None  # made by the first publish: a constructor never connects
        self._streams: set[str] = set()  # topics known to be streams (or free to become one)

    @property
    def _where(self) -> str:
        return self.url.rpartition("@")[2]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _connect(self) -> Any:
        if self._client is None:
            self._client = self._r.Redis.from_url(
                self.url,
                socket_timeout=self.timeout_s,
                socket_connect_timeout=min(self.timeout_s, 5.0),
                single_connection_client=True,  # WAIT counts the writes of its own connection
            )
        return self._client

    # -- declaring (TopicAdmin) ---------------------------------------------------------------

    def _admin_errors(self) -> Any:
        import contextlib

        r = self._r

        @contextlib.contextmanager
        def translate() -> Any:
            try:
                yield
            except r.exceptions.AuthenticationError as exc:  # the credentials are part of the URL
                raise ConfigError(f"Redis at {self._where} refused the login in the URL: {exc}") from exc
            except (r.exceptions.ConnectionError, r.exceptions.TimeoutError, r.exceptions.ResponseError) as exc:
                raise BrokerError(f"Redis at {self._where}: {type(exc).__name__}: {exc}") from exc

        return translate()

    def declare(self, topics: Sequence[str], spec: TopicSpec | None = None) -> list[Declared]:
        spec = spec or TopicSpec()
        if spec.partitions is not None or spec.replication_factor is not None:
            raise ConfigError(
                "Redis streams have no partitions and no replication factor (replicas are the "
                "server's own replication); those options are for Kafka"
            )
        out: list[Declared] = []
        with self._admin_errors():
            client = self._connect()
            for name in with_dead_letters(topics):
                kind = client.type(name)
                kind = kind.decode() if isinstance(kind, bytes) else str(kind)
                if kind not in ("stream", "none"):
                    raise ConfigError(
                        f"Redis key {name!r} holds a {kind}, not a stream: messages to it would be "
                        "rejected; delete the key or use another topic"
                    )
                entries = f"{client.xlen(name)} entries" if kind == "stream" else ""
                if name not in topics:  # a dead-letter stream: the consumer makes it when it needs it
                    out.append(
                        Declared(
                            "stream",
                            name,
                            "exists" if entries else "nothing needed",
                            entries or "made by the first dead letter",
                        )
                    )
                elif spec.group is None:
                    out.append(
                        Declared(
                            "stream",
                            name,
                            "exists" if entries else "nothing needed",
                            entries or "made by the first XADD; pass --group to create it now with its consumer group",
                        )
                    )
                else:
                    try:
                        client.xgroup_create(name, spec.group, id="0", mkstream=True)
                        made = True
                    except self._r.exceptions.ResponseError as exc:
                        if "BUSYGROUP" not in str(exc):
                            raise
                        made = False
                    out.append(Declared("stream", name, "exists" if entries else "created", entries))
                    out.append(
                        Declared(
                            "consumer group",
                            spec.group,
                            "created" if made else "exists",
                            f"on stream {name}" + (", reading from its start" if made else ""),
                        )
                    )
        return out

    def delete(self, topics: Sequence[str]) -> None:
        with self._admin_errors():
            self._connect().delete(*with_dead_letters(topics))
        self._streams.difference_update(with_dead_letters(topics))

    # -- reading without consuming (TopicReader) ----------------------------------------------

    READ_PAGE = 500

    def read(self, topic: str) -> Iterator[Stored]:
        """Every entry of the stream ``topic`` (``XRANGE``, page by page; no group involved)."""
        with self._admin_errors():
            client = self._connect()
            start = "-"
            while True:
                page = client.xrange(topic, min=start, max="+", count=self.READ_PAGE)
                for eid, f in page:
                    eid = eid.decode() if isinstance(eid, bytes) else str(eid)
                    try:
                        headers = decode_headers(f.get(F_HEADERS))
                    except ValueError:  # not written by zeroloss: shown without headers
                        headers = ()
                    yield Stored(f"{topic}/{eid}", -1, entry_id(f), f.get(F_KEY), f.get(F_VALUE, b""), headers)
                if len(page) < self.READ_PAGE:
                    return
                start = "(" + eid  # exclusive: after the last one seen

    # -- publishing ---------------------------------------------------------------------------

    def publish(self, messages: Sequence[Message]) -> list[Outcome]:
        if not messages:
            return []
        try:
            self._connect()
            refused = self._check_types({m.topic for m in messages})
            return self._publish(messages, refused)
        except (self._r.exceptions.ConnectionError, self._r.exceptions.TimeoutError) as exc:
            raise BrokerError(f"Redis at {self._where}: {type(exc).__name__}: {exc}") from exc
        except self._r.exceptions.ResponseError as exc:  # EXECABORT (OOM, READONLY, ...), WAIT refused
            raise BrokerError(f"Redis at {self._where} refused the batch: {exc}") from exc

    def _check_types(self, topics: set[str]) -> dict[str, str]:
        todo = sorted(topics - self._streams)
        if not todo:
            return {}
        pipe = self._client.pipeline(transaction=False)
        for t in todo:
            pipe.type(t)
        refused = {}
        for t, kind in zip(todo, pipe.execute(), strict=True):
            kind = kind.decode() if isinstance(kind, bytes) else str(kind)
            if kind in ("stream", "none"):
                self._streams.add(t)
            else:
                refused[t] = f"WRONGTYPE: Redis key {t!r} holds a {kind}, not a stream"
        return refused

    def _publish(self, messages: Sequence[Message], refused: dict[str, str]) -> list[Outcome]:
        outcomes: dict[str, Outcome] = {}
        blocked: set[bytes] = set()
        sent: list[Message] = []
        pipe = self._client.pipeline(transaction=True)
        for m in messages:
            if m.key is not None and m.key in blocked:
                outcomes[m.id] = Outcome(m, Status.HELD, error=HELD_REASON)
            elif m.topic in refused:
                outcomes[m.id] = Outcome(m, Status.REJECTED, error=refused[m.topic])
                if m.key is not None:
                    blocked.add(m.key)
            else:
                pipe.xadd(m.topic, entry_fields(m))
                sent.append(m)
        if sent:
            results = pipe.execute(raise_on_error=False)
            if self.replicas:  # WAIT cannot block inside MULTI: ask after EXEC, on the same connection
                acked = self._client.wait(self.replicas, int(self.timeout_s * 1000))
                if acked < self.replicas:
                    raise BrokerError(f"Redis at {self._where}: {acked} of {self.replicas} replicas acknowledged")
            for m, r in zip(sent, results, strict=True):
                if isinstance(r, Exception):  # the key changed type since it was checked
                    self._streams.discard(m.topic)
                    status = Status.REJECTED if "WRONGTYPE" in str(r) else Status.RETRY
                    outcomes[m.id] = Outcome(m, status, error=f"{type(r).__name__}: {r}")
                    if m.key is not None:
                        blocked.add(m.key)
                else:
                    if m.key is not None and m.key in blocked:  # only if a type changed mid-batch
                        log.error("message %s was stored after a failed message of its key", m.id)
                    eid = r.decode() if isinstance(r, bytes) else str(r)
                    outcomes[m.id] = Outcome(m, Status.DELIVERED, location=f"{m.topic}/{eid}")
        return [outcomes[m.id] for m in messages]
