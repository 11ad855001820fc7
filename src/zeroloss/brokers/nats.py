"""NATS JetStream adapter, publishing side (nats-py on a private event loop): every publish waits for
its stream ack; our id travels as ``Nats-Msg-Id`` so the stream itself drops a republished copy
within its duplicate window. One stream per topic (:func:`stream_name`), created on first use;
batches go in key waves. The consume side is :mod:`zeroloss.brokers.nats_subscription`.
Streams, the dedup window, order, headers and outcomes: docs/design.md, "brokers/nats.py"."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from zeroloss.brokers._batch import (
    KEY_HEADER,
    BrokerWide,
    duplicate_header,
    publish_in_waves,
    text_value,
    value_bytes,
)
from zeroloss.brokers._loop import LoopThread
from zeroloss.brokers.base import Declared, Outcome, Status, Stored, TopicSpec, with_dead_letters
from zeroloss.errors import BrokerError, ConfigError, MissingExtraError
from zeroloss.message import ID_HEADER, REPLAY_HEADER, Message

log = logging.getLogger(__name__)

MSG_ID_HEADER = "Nats-Msg-Id"
ERR_SUBJECTS_OVERLAP = 10065
ERR_STREAM_NAME_IN_USE = 10058
ERR_STREAM_NOT_FOUND = 10059
# Replicas the deployment cannot place: not clustered, no suitable peers, insufficient resources.
ERR_TOO_MANY_REPLICAS = (10074, 10005, 10023)
ERR_STREAM_INVALID_CONFIG = 10052  # 500, yet about what we asked for: waiting will not fix it
ERR_REPLICAS_NOT_SUPPORTED = 10074  # 500: replicas > 1 on a server that is not clustered
ERR_NO_PEERS = 10005  # 400, yet a cluster with a node down: heals when the node returns
DEADLINE_GRACE_S = 2.0  # past the batch's own deadline: for the cancellation of what was cut


def nats_module() -> Any:
    try:
        import nats
        import nats.js.api
        import nats.js.errors
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise MissingExtraError("nats-py", "nats", "the NATS JetStream broker adapter") from exc
    return nats


def broker_wide(exc: Exception) -> bool:
    """Is this JetStream API error the server's state rather than the request's fault? 503
    (JetStream not enabled, temporarily unavailable — a leader election —, insufficient
    resources, a store failure) and 500 (server errors) heal by waiting: an outage, retried with
    backoff, no attempt spent. A 4xx, and the few 500s that name our stream's configuration,
    are about this request: the same request fails the same way until a person acts."""
    code = getattr(exc, "err_code", None)
    if code == ERR_NO_PEERS:
        return True
    if code in (ERR_STREAM_INVALID_CONFIG, ERR_REPLICAS_NOT_SUPPORTED):
        return False
    nats = nats_module()
    if isinstance(exc, (nats.js.errors.ServiceUnavailableError, nats.js.errors.ServerError)):
        return True  # a bare 503 (no JSON body) comes without a code
    return (getattr(exc, "code", None) or 0) >= 500


def check_url(url: str) -> str:
    if not url.startswith(("nats://", "tls://")):
        raise ConfigError(f"not a NATS URL: {url!r}; write nats://HOST:4222")
    return url


def stream_name(topic: str) -> str:
    """The stream of ``topic``: ``ZL_`` + the topic with ``_`` → ``__`` and ``.`` → ``_d``
    (injective, so two topics never share a stream)."""
    return "ZL_" + topic.replace("_", "__").replace(".", "_d")


def nats_headers(m: Message) -> dict[str, str]:
    """The NATS headers of ``m`` (ValueError for a header NATS cannot carry)."""
    hdrs: dict[str, str] = {}
    for k, v in m.headers:
        if not k.isprintable() or any(c in k for c in ": \t") or k.lower() in (MSG_ID_HEADER.lower(), KEY_HEADER):
            raise ValueError(f"header name {k!r} cannot be carried by NATS")
        hdrs[k] = text_value(v)
    hdrs[ID_HEADER] = m.id
    # A replay (zeroloss dlq replay) must not be dropped as a copy of the original by the stream's
    # duplicate window; the consumer's inbox still knows it by zeroloss-id.
    replayed = m.header(REPLAY_HEADER)
    hdrs[MSG_ID_HEADER] = m.id if replayed is None else f"{m.id}/replay/{replayed.decode('ascii', 'replace')}"
    if m.key is not None:
        hdrs[KEY_HEADER] = "b64:" + base64.b64encode(m.key).decode()
    return hdrs


class NatsBroker:
    """Publishes batches to JetStream; see docs/design.md, "brokers/nats.py"."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 30.0,
        dedup_window_s: float = 300.0,
        replicas: int = 1,
    ) -> None:
        self._nats = nats_module()
        self.url = check_url(url)
        self.timeout_s = timeout_s
        self.dedup_window_s = dedup_window_s
        self.replicas = replicas
        self._loop = LoopThread("zeroloss-nats")
        self._nc: Any = None
        self._js: Any = None
        self._streams: dict[str, str] = {}  # topic → its stream, known to exist
        self._refused: dict[str, str] = {}  # topic → why no stream can be made for it
        self._broken = False  # a send failed broker-wide: replace the connection before the next batch
        self.connections_made = 0

    # -- the sync face ------------------------------------------------------------------------

    def publish(self, messages: Sequence[Message]) -> list[Outcome]:
        if not messages:
            return []
        try:
            # _publish keeps its own deadline of timeout_s; this one only backs it up.
            outcomes = self._loop.run(self._publish(messages), self.timeout_s + DEADLINE_GRACE_S)
        except TimeoutError:
            self._drop()
            raise BrokerError(f"NATS at {self.url} did not ack within {self.timeout_s}s") from None
        except BrokerWide as exc:
            self._drop()
            raise BrokerError(f"NATS at {self.url}: {exc}") from exc
        if self._broken:  # a send failed broker-wide after part was acknowledged: keep that, not the connection
            self._drop()
        return outcomes

    def _drop(self) -> None:
        with contextlib.suppress(TimeoutError, RuntimeError):
            self._loop.run(self._disconnect(), 10.0)

    def close(self) -> None:
        self._drop()
        self._loop.close()

    # -- on the loop --------------------------------------------------------------------------

    async def _connect(self) -> Any:
        if self._nc is not None and self._nc.is_connected and not self._broken:
            return self._js
        await self._disconnect()

        async def on_error(exc: Exception) -> None:
            log.debug("NATS client error: %s", exc)

        try:
            self._nc = await self._nats.connect(
                servers=[self.url],
                connect_timeout=min(self.timeout_s, 5.0),
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=0.2,
                error_cb=on_error,
                name="zeroloss-relay",
            )
        except (TimeoutError, self._nats.errors.Error, OSError) as exc:
            self._nc = None
            raise BrokerWide(f"cannot connect: {type(exc).__name__}: {exc}") from exc
        self._js = self._nc.jetstream(timeout=self.timeout_s)
        self.connections_made += 1
        return self._js

    async def _disconnect(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        self._broken = False
        self._streams.clear()
        self._refused.clear()
        if nc is not None and not nc.is_closed:
            try:
                await asyncio.wait_for(nc.close(), 5.0)
            except Exception:  # being thrown away
                log.debug("closing a NATS connection failed", exc_info=True)

    async def ensure_stream(self, topic: str, replicas: int | None = None) -> bool:
        """Create ``topic``'s stream unless it exists (several relays may race: that is fine);
        True when this call created it. ``replicas`` overrides the broker's for a new stream."""
        if topic in self._streams or topic in self._refused:
            return False
        nats, name = self._nats, stream_name(topic)
        created = False
        try:
            try:
                info = await self._js.stream_info(name)
            except nats.js.errors.NotFoundError:
                config = nats.js.api.StreamConfig(
                    name=name,
                    subjects=[topic],
                    storage=nats.js.api.StorageType.FILE,
                    duplicate_window=self.dedup_window_s,
                    num_replicas=replicas or self.replicas,
                )
                try:
                    info = await self._js.add_stream(config)
                    created = True
                except nats.js.errors.BadRequestError as exc:
                    if exc.err_code == ERR_STREAM_NAME_IN_USE:  # another relay made it just now
                        info = await self._js.stream_info(name)
                    elif exc.err_code == ERR_SUBJECTS_OVERLAP:
                        self._refused[topic] = f"subject {topic!r} already belongs to another stream: {exc}"
                        return False
                    else:
                        raise
        except nats.js.errors.APIError as exc:
            if replicas is not None and exc.err_code in ERR_TOO_MANY_REPLICAS:  # init asked for them by name
                self._refused[topic] = (
                    f"--replication-factor {replicas} is more than this NATS deployment can hold "
                    f"(at most its number of JetStream servers; 1 when not clustered): {exc}"
                )
                return False
            if broker_wide(exc):  # JetStream unavailable, not the topic's fault: no message is failed for it
                raise BrokerWide(f"stream {name!r}: {exc}") from exc
            self._refused[topic] = f"cannot create stream {name!r}: {exc}"
            return False
        except ValueError as exc:  # nats-py checks names before asking: e.g. a wildcard in the topic
            self._refused[topic] = f"topic {topic!r} cannot be a NATS subject and stream: {exc}"
            return False
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            raise BrokerWide(f"stream {name!r}: {type(exc).__name__}: {exc}") from exc
        window = info.config.duplicate_window or 0
        if window < self.dedup_window_s:
            log.warning(
                "stream %s keeps a duplicate window of %.0fs, shorter than dedup_window_s=%.0fs",
                name,
                window,
                self.dedup_window_s,
            )
        self._streams[topic] = name
        return created

    # -- declaring (TopicAdmin) ---------------------------------------------------------------

    def _admin_run(self, coro: Any, doing: str) -> Any:
        try:
            return self._loop.run(coro, self.timeout_s * 4)
        except TimeoutError:
            self._drop()
            raise BrokerError(f"NATS at {self.url} did not answer within {self.timeout_s}s while {doing}") from None
        except BrokerWide as exc:
            self._drop()
            raise BrokerError(f"NATS at {self.url}: {exc}") from exc

    def declare(self, topics: Sequence[str], spec: TopicSpec | None = None) -> list[Declared]:
        """Create each topic's stream and its dead-letter stream (``ZL_<topic>_ddlq``)."""
        spec = spec or TopicSpec()
        if spec.partitions is not None:
            raise ConfigError("NATS JetStream streams have no partitions; --partitions is for Kafka")
        out: list[Declared] = self._admin_run(self._declare_ahead(topics, spec.replication_factor), "declaring")
        if spec.group:
            out.append(
                Declared(
                    "consumer group",
                    spec.group,
                    "nothing needed",
                    "the consumer creates its durable consumer, delivering from the stream's start",
                )
            )
        return out

    async def _declare_ahead(self, topics: Sequence[str], replicas: int | None) -> list[Declared]:
        nats = self._nats
        await self._connect()
        out: list[Declared] = []
        for t in with_dead_letters(topics):
            self._refused.pop(t, None)  # asked explicitly: look again
            created = await self.ensure_stream(t, replicas)
            if t in self._refused:
                raise ConfigError(f"NATS at {self.url}: {self._refused[t]}")
            try:
                cfg = (await self._js.stream_info(stream_name(t))).config
            except (TimeoutError, nats.errors.Error, OSError) as exc:
                raise BrokerWide(f"stream {stream_name(t)!r}: {type(exc).__name__}: {exc}") from exc
            out.append(
                Declared(
                    "stream",
                    stream_name(t),
                    "created" if created else "exists",
                    f"subject {t}, {cfg.storage} storage, {cfg.num_replicas} replica(s), "
                    f"duplicate window {cfg.duplicate_window or 0:.0f}s",
                )
            )
        return out

    def delete(self, topics: Sequence[str]) -> None:
        self._admin_run(self._delete(topics), "deleting")

    async def _delete(self, topics: Sequence[str]) -> None:
        nats = self._nats
        await self._connect()
        for t in with_dead_letters(topics):
            self._streams.pop(t, None)
            try:
                await self._js.delete_stream(stream_name(t))
            except nats.js.errors.NotFoundError:
                pass
            except (TimeoutError, nats.errors.Error, OSError) as exc:
                raise BrokerWide(f"deleting stream {stream_name(t)!r}: {type(exc).__name__}: {exc}") from exc

    # -- reading without consuming (TopicReader) ------------------------------------------------

    READ_PAGE = 500  # messages fetched per round trip to the loop thread

    def read(self, topic: str) -> Iterator[Stored]:
        """Every message of ``topic``'s stream, by sequence number (``get_msg``: no consumer made)."""
        name = stream_name(topic)
        bounds = self._admin_run(self._bounds(name), "reading")
        if bounds is None:
            return
        first, last = bounds
        for start in range(first, last + 1, self.READ_PAGE):
            yield from self._admin_run(self._page(name, start, min(last, start + self.READ_PAGE - 1)), "reading")

    async def _bounds(self, name: str) -> tuple[int, int] | None:
        nats = self._nats
        await self._connect()
        try:
            state = (await self._js.stream_info(name)).state
        except nats.js.errors.NotFoundError:
            return None
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            raise BrokerWide(f"stream {name!r}: {type(exc).__name__}: {exc}") from exc
        return (state.first_seq, state.last_seq) if state.messages else None

    async def _page(self, name: str, first: int, last: int) -> list[Stored]:
        nats = self._nats
        out: list[Stored] = []
        for seq in range(first, last + 1):
            try:
                m = await self._js.get_msg(name, seq)
            except nats.js.errors.NotFoundError:  # deleted from the middle of the stream
                continue
            except (TimeoutError, nats.errors.Error, OSError) as exc:
                raise BrokerWide(f"stream {name!r} message {seq}: {type(exc).__name__}: {exc}") from exc
            raw = dict(m.headers or {})
            key = raw.pop(KEY_HEADER, None)
            mid = raw.pop(ID_HEADER, None) or raw.get(MSG_ID_HEADER)
            headers = tuple((k, value_bytes(v)) for k, v in raw.items() if not k.startswith("Nats-"))
            out.append(
                Stored(f"{name}/{seq}", seq, mid, None if key is None else value_bytes(key), m.data or b"", headers)
            )
        return out

    async def _publish(self, messages: Sequence[Message]) -> list[Outcome]:
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        async with asyncio.timeout_at(deadline):  # connecting counts against the batch's time
            await self._connect()
            self._refused.clear()  # looked at again every batch: an operator may have fixed it
            for topic in sorted({m.topic for m in messages}):
                await self.ensure_stream(topic)
        return await publish_in_waves(messages, self._send, deadline)

    async def _send(self, m: Message) -> Outcome:
        nats = self._nats
        if m.topic in self._refused:
            return Outcome(m, Status.REJECTED, error=self._refused[m.topic])
        if (dup := duplicate_header(m.headers)) is not None:
            return Outcome(m, Status.REJECTED, error=f"header {dup!r} appears twice; NATS headers hold one value")
        try:
            headers = nats_headers(m)
        except ValueError as exc:
            return Outcome(m, Status.REJECTED, error=str(exc))
        stream = self._streams.get(m.topic)
        if stream is None:  # found missing earlier in this batch
            raise BrokerWide(f"no stream answers on {m.topic!r}")
        try:
            ack = await self._js.publish(m.topic, m.value, timeout=self.timeout_s, stream=stream, headers=headers)
        except nats.errors.MaxPayloadError as exc:
            return Outcome(m, Status.REJECTED, error=f"larger than the server's max_payload: {exc}")
        except nats.js.errors.NoStreamResponseError as exc:
            # Deleted behind our back (made again next batch) or JetStream not answering: either
            # way not this message's fault, so no attempt is spent on it.
            self._streams.pop(m.topic, None)
            raise BrokerWide(f"no stream answers on {m.topic!r}") from exc
        except nats.js.errors.APIError as exc:
            if broker_wide(exc):
                raise BrokerWide(f"stream {stream}: {exc}") from exc
            return Outcome(m, Status.RETRY, error=f"stream {stream} refused it: {exc}")
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            self._broken = True
            raise BrokerWide(f"{type(exc).__name__}: {exc}") from exc
        return Outcome(m, Status.DELIVERED, location=f"{ack.stream}/{ack.seq}")
