"""The inbox in Redis, for effects outside a database (see :class:`RedisInbox` for the window in
which an effect can happen twice)."""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

from zeroloss.errors import ConfigError, MissingExtraError, StoreError
from zeroloss.inbox.base import check_ids
from zeroloss.logs import brief

_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
_DONE = b"done "
_PENDING = b"pending "


class RedisTx:
    """What a RedisInbox transaction hands the handler.

    ``client`` is the redis-py client. Commands queued on ``pipeline`` run in one MULTI/EXEC
    together with the claim's final mark, so Redis effects queued there are exactly-once; anything
    else the handler does (HTTP calls, other stores) is at-least-once with dedup.
    """

    def __init__(self, inbox: RedisInbox) -> None:
        self.client: Any = inbox.client
        self.token = secrets.token_hex(8).encode()
        self._pipe: Any = inbox.client.pipeline(transaction=True)
        self.keys: list[str] = []

    @property
    def pipeline(self) -> Any:
        if not self._pipe.explicit_transaction:
            self._pipe.multi()
        return self._pipe


class RedisInbox:
    """The inbox as Redis keys ``{prefix}{group}:{message id}`` with a TTL of ``ttl_s``.

    A claim is ``SET key "pending <token>" NX PX lease_s``: atomic, so of concurrent claims
    exactly one wins; the others wait until the winner commits (→ False) or rolls back (→ they
    retry the SET). On commit the key becomes ``"done <time>"`` with ``EX ttl_s`` in a
    MULTI/EXEC guarded by WATCH; on rollback (handler raised) the reservation is deleted, so a
    retry can claim again.

    **Not atomic with the effect.** The effect and the mark live in different systems, so this is
    at-least-once with dedup. The window is exactly: *after the handler's outside effect happened
    and before the commit's EXEC reached Redis* (a crash, a lost connection, or a handler that ran
    longer than ``lease_s`` so its reservation expired and another consumer claimed the message).
    A message redelivered after such a failure runs its effect again — once the reservation has
    expired, i.e. up to ``lease_s`` after the crash, during which a redelivery waits. Effects
    queued on ``tx.pipeline`` are outside that window: they commit in the same EXEC as the mark.
    """

    def __init__(
        self,
        url: str,
        *,
        ttl_s: float = 7 * 86400.0,
        prefix: str = "zeroloss:inbox:",
        lease_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        try:
            import redis
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise MissingExtraError("redis", "redis", "the Redis inbox") from exc
        self._redis = redis
        self.client: Any = redis.Redis.from_url(url)
        self.ttl_s = ttl_s
        self.prefix = prefix
        if lease_s < 1.0:
            raise ConfigError(f"lease_s must be at least 1 second, got {lease_s}")
        self.lease_s = lease_s
        self.clock = clock
        self._release = self.client.register_script(_RELEASE)
        self._tx = threading.local()

    def key(self, group: str, message_id: str) -> str:
        return f"{self.prefix}{quote(group, safe='')}:{message_id}"

    def _errors(self) -> tuple[type[BaseException], ...]:
        return (self._redis.ConnectionError, self._redis.TimeoutError)

    @contextmanager
    def transaction(self) -> Iterator[RedisTx]:
        tx = RedisTx(self)
        try:
            try:
                yield tx
            except BaseException:
                tx._pipe.reset()
                for key in tx.keys:
                    try:
                        self._release(keys=[key], args=[_PENDING + tx.token])
                    except self._errors():  # the reservation expires after lease_s anyway
                        pass
                raise
            self._commit(tx)
        finally:
            tx._pipe.reset()

    def _commit(self, tx: RedisTx) -> None:
        if not tx.keys and not tx._pipe.command_stack:
            return
        pipe = tx.pipeline
        done = _DONE + repr(self.clock()).encode()
        for key in tx.keys:
            pipe.set(key, done, ex=max(1, int(self.ttl_s)))
        try:
            pipe.execute()
        except self._redis.WatchError as exc:
            raise StoreError(
                f"inbox reservation lost before commit (the handler took longer than lease_s={self.lease_s}s "
                f"or Redis lost the key); keys {tx.keys}: the message will be retried and deduplicated",
                retriable=True,
            ) from exc
        except self._errors() as exc:
            raise StoreError(f"inbox commit to Redis failed: {brief(exc)}", retriable=True) from exc

    def claim(self, tx: RedisTx, group: str, message_id: str) -> bool:
        check_ids(group, message_id)
        if tx._pipe.explicit_transaction:
            raise StoreError("claim before using tx.pipeline: Redis cannot WATCH inside MULTI", retriable=False)
        key = self.key(group, message_id)
        if key in tx.keys:
            return False
        mine = _PENDING + tx.token
        deadline = time.monotonic() + self.lease_s + 5.0
        try:
            while True:
                if self.client.set(key, mine, nx=True, px=max(1, int(self.lease_s * 1000))):
                    tx._pipe.watch(key)  # EXEC fails if the reservation expires (or is taken) from here on
                    tx.keys.append(key)
                    return True
                value = self.client.get(key)
                if value is not None and value.startswith(_DONE):
                    return False
                if time.monotonic() > deadline:
                    raise StoreError(f"inbox key {key} stayed reserved past its lease", retriable=True)
                time.sleep(0.005)  # another transaction holds it: wait for its commit or rollback
        except self._errors() as exc:
            raise StoreError(f"inbox claim on Redis failed: {brief(exc)}", retriable=True) from exc

    def seen(self, group: str, message_id: str) -> bool:
        value = self.client.get(self.key(group, message_id))
        return value is not None and value.startswith(_DONE)

    def purge(self, older_than_s: float) -> int:
        """Keys expire by themselves after ``ttl_s``; this removes marks older than
        ``older_than_s`` now (a SCAN over the prefix; nothing to do when that is ``ttl_s`` or more)."""
        if older_than_s >= self.ttl_s:
            return 0
        cutoff = self.clock() - older_than_s
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix) + "*"
        removed = 0
        batch: list[bytes] = []

        def flush() -> int:
            if not batch:
                return 0
            values = self.client.mget(batch)
            old = [
                k
                for k, v in zip(batch, values, strict=True)
                if v is not None and v.startswith(_DONE) and float(v[len(_DONE) :]) < cutoff
            ]
            batch.clear()
            return int(self.client.delete(*old)) if old else 0

        for key in self.client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                removed += flush()
        return removed + flush()

    def close(self) -> None:
        self.client.close()
