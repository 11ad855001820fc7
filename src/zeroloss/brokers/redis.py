"""Redis Streams adapter (redis-py, synchronous): one ``MULTI``/``EXEC`` of ``XADD``s per batch.

Each message becomes one stream entry in the stream named after its topic, with the fields::

    id        our message id (the consumer's dedup key; same as the zeroloss-id header)
    value     the value bytes
    key       the key bytes (absent when the message has no key)
    headers   JSON [[name, base64 value], ...] (absent when there are none)

The entry id Redis assigns is the location (``stream/1712345678901-0``). ``XADD`` carries no
``MAXLEN``: trimming a stream a consumer has not read yet would lose messages.

**Durability** is what the server is configured for: the reply to ``EXEC`` means the entries are
in memory and in the AOF buffer; with ``appendonly yes`` and ``appendfsync always`` they are on
disk, with ``everysec`` a power loss can take the last second. ``WAIT`` (``replicas=N``) makes the
ack wait for N replicas — the strongest acknowledgement Redis has.

**Order and the HELD rule.** ``MULTI``/``EXEC`` runs the batch's ``XADD``s atomically, in order. A
command refused while queueing (out of memory, read-only replica) discards the whole transaction:
nothing was written, and that is broker-wide → :class:`BrokerError`. The only per-command failure
left is ``WRONGTYPE`` (the topic's key holds something that is not a stream); streams are checked
with ``TYPE`` before the first use, so such messages are ``REJECTED`` — and later messages of their
keys ``HELD`` — before anything is sent.

**Dedup** of republished ids is the consumer's job (the inbox keyed by ``id``): Redis has no
idempotent ``XADD``.

**Declaring ahead** (:meth:`RedisStreamBroker.declare`): a stream comes into being with its first
``XADD``, so there is nothing to create — except a consumer group, whose ``XGROUP CREATE …
MKSTREAM`` creates the stream with it. What can be checked is that no key of the topic's name
holds something other than a stream.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from zeroloss.brokers._batch import HELD_REASON
from zeroloss.brokers.base import Declared, Outcome, Status, Stored, TopicSpec, publish_one, with_dead_letters
from zeroloss.brokers.subscription import Delivery, check_id
from zeroloss.errors import BrokerError, ConfigError, MissingExtraError
from zeroloss.message import Headers, Message
from zeroloss.received import Received

log = logging.getLogger(__name__)

F_ID, F_VALUE, F_KEY, F_HEADERS = b"id", b"value", b"key", b"headers"


def _redis() -> Any:
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
    """Publishes batches to Redis Streams; see the module docstring."""

    def __init__(self, url: str, *, timeout_s: float = 30.0, replicas: int = 0) -> None:
        self._r = _redis()
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
                self.url, socket_timeout=self.timeout_s, socket_connect_timeout=min(self.timeout_s, 5.0),
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
            raise ConfigError("Redis streams have no partitions and no replication factor (replicas are the "
                              "server's own replication); those options are for Kafka")
        out: list[Declared] = []
        with self._admin_errors():
            client = self._connect()
            for name in with_dead_letters(topics):
                kind = client.type(name)
                kind = kind.decode() if isinstance(kind, bytes) else str(kind)
                if kind not in ("stream", "none"):
                    raise ConfigError(f"Redis key {name!r} holds a {kind}, not a stream: messages to it would be "
                                      "rejected; delete the key or use another topic")
                entries = f"{client.xlen(name)} entries" if kind == "stream" else ""
                if name not in topics:  # a dead-letter stream: the consumer makes it when it needs it
                    out.append(Declared("stream", name, "exists" if entries else "nothing needed",
                                        entries or "made by the first dead letter"))
                elif spec.group is None:
                    out.append(Declared("stream", name, "exists" if entries else "nothing needed",
                                        entries or "made by the first XADD; pass --group to create it now "
                                        "with its consumer group"))
                else:
                    try:
                        client.xgroup_create(name, spec.group, id="0", mkstream=True)
                        made = True
                    except self._r.exceptions.ResponseError as exc:
                        if "BUSYGROUP" not in str(exc):
                            raise
                        made = False
                    out.append(Declared("stream", name, "exists" if entries else "created", entries))
                    out.append(Declared("consumer group", spec.group, "created" if made else "exists",
                                        f"on stream {name}" + (", reading from its start" if made else "")))
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



# -- consuming ----------------------------------------------------------------------------------


class RedisSubscription:
    """A consumer group (``XGROUP CREATE … MKSTREAM``, from the stream's start) per topic's stream;
    ``XREADGROUP`` hands out new entries, ``XACK`` after the inbox commit. Entries a dead consumer
    left pending are taken over with ``XAUTOCLAIM`` once idle for ``claim_idle_s`` — keep it above
    the longest time a handler (with its retries) can take, or a slow consumer's entry is
    processed twice at once (the inbox still lets only one commit). Dead letters are appended to
    ``<stream>.dlq`` (same entry format, with the error headers), then the original is acked.
    Redis has no idempotent ``XADD``: a republished id is dropped by the consumer's inbox."""

    def __init__(self, url: str, group: str, topics: Sequence[str], *, timeout_s: float = 30.0,
                 claim_idle_s: float = 60.0, claim_every_s: float = 5.0, consumer_name: str | None = None) -> None:
        import os
        import socket
        import uuid

        self._r = _redis()
        self.url = check_url(url)
        self.group = group
        self.topics = list(topics)
        self.timeout_s = timeout_s
        self.claim_idle_s = claim_idle_s
        self.claim_every_s = claim_every_s
        self.name = consumer_name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._next_claim = 0.0
        self._claim_from = {t: "0-0" for t in self.topics}
        self.max_deliveries: int | None = None  # Redis never gives up on a pending entry by itself
        self._client = self._r.Redis.from_url(url, socket_timeout=timeout_s + 5,
                                              socket_connect_timeout=min(timeout_s, 5.0))
        self._dlq = RedisStreamBroker(url, timeout_s=timeout_s)
        with self._errors():
            for t in self.topics:
                try:
                    self._client.xgroup_create(t, group, id="0", mkstream=True)
                except self._r.exceptions.ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise

    def _errors(self) -> Any:
        import contextlib

        r = self._r

        @contextlib.contextmanager
        def translate() -> Any:
            try:
                yield
            except (r.exceptions.ConnectionError, r.exceptions.TimeoutError, r.exceptions.ResponseError) as exc:
                raise BrokerError(f"Redis at {self.url.rpartition('@')[2]}: {type(exc).__name__}: {exc}") from exc

        return translate()

    def fetch(self, max_messages: int, timeout_s: float) -> list[Delivery]:
        import time

        out: list[Delivery] = []
        with self._errors():
            if time.monotonic() >= self._next_claim:  # what dead consumers left behind
                self._next_claim = time.monotonic() + self.claim_every_s
                for t in self.topics:
                    if len(out) >= max_messages:
                        break
                    nxt, entries, *_ = self._client.xautoclaim(
                        t, self.group, self.name, int(self.claim_idle_s * 1000), self._claim_from[t],
                        count=max_messages - len(out))
                    self._claim_from[t] = nxt.decode() if isinstance(nxt, bytes) else str(nxt)
                    out.extend(self._delivery(t, eid, f) for eid, f in entries if f is not None)
            if len(out) < max_messages:
                got = self._client.xreadgroup(self.group, self.name, dict.fromkeys(self.topics, ">"),
                                              count=max_messages - len(out), block=max(1, int(timeout_s * 1000)))
                for stream, entries in got or []:
                    t = stream.decode() if isinstance(stream, bytes) else str(stream)
                    out.extend(self._delivery(t, eid, f) for eid, f in entries if f is not None)
        return out

    def _delivery(self, topic: str, eid: Any, f: dict[bytes, bytes]) -> Delivery:
        eid = eid.decode() if isinstance(eid, bytes) else str(eid)
        mid, poison = check_id(f.get(F_ID), f"{topic}/{eid}")  # bytes: check_id decodes strictly
        try:
            headers = decode_headers(f.get(F_HEADERS))
        except ValueError as exc:
            headers, poison = (), poison or str(exc)
        ms = int(eid.split("-", 1)[0]) if eid.split("-", 1)[0].isdigit() else 0
        received = Received(mid, topic, 0, ms, f.get(F_KEY), f.get(F_VALUE, b""), headers, ms)
        return Delivery(received, (topic, eid), poison)

    def ack(self, d: Delivery) -> None:
        with self._errors():
            self._client.xack(d.token[0], self.group, d.token[1])

    def touch(self, d: Delivery) -> None:
        """Reset the entry's idle time so no one claims it while the handler retries."""
        with self._errors():
            self._client.xclaim(d.token[0], self.group, self.name, 0, [d.token[1]], justid=True)

    def dead_letter(self, d: Delivery, letter: Message) -> str:
        where = publish_one(self._dlq, letter, "dead letter")
        try:
            self.ack(d)
        except BrokerError as exc:
            # The letter is stored; raising would append it again on every retry. The entry stays
            # pending, is claimed again after claim_idle_s and dead-lettered once more (a copy).
            log.warning("dead letter %s stored; XACK of the original failed (%s): it will be redelivered",
                        letter.id, exc)
        return where

    def release(self, ds: Sequence[Delivery]) -> None:
        """Mark them idle for longer than ``claim_idle_s`` (``XCLAIM … IDLE``), so the next
        ``XAUTOCLAIM`` of any consumer in the group takes them at once."""
        idle_ms = int(self.claim_idle_s * 1000) + 1
        with self._errors():
            for d in ds:
                self._client.xclaim(d.token[0], self.group, self.name, 0, [d.token[1]], idle=idle_ms, justid=True)
        self._claim_from = dict.fromkeys(self.topics, "0-0")
        self._next_claim = 0.0

    def close(self) -> None:
        self._client.close()
        self._dlq.close()
