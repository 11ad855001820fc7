"""The relay's side of the spool: claim (``pending/`` → ``sending/`` under a lease in the file
name), extend, succeed, retry, fail, recover, purge_success; one relay per spool, held by an
exclusive lock on ``relay.lock``."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import math
import os
import socket
import time
import weakref
from collections.abc import Sequence

from zeroloss.errors import ConfigError
from zeroloss.message import Message
from zeroloss.outbox._pending_index import PendingIndex
from zeroloss.outbox.base import Delivered, RecoveryReport, Resolver, State
from zeroloss.outbox.spool.layout import (
    BLOCKING,
    PART,
    SUFFIX,
    TXID_RE,
    SpoolCore,
    lease_ms,
    lost_lease,
    split_name,
)

log = logging.getLogger("zeroloss.outbox.spool")

_DEDUP_ORDER = (State.FAILED, State.PENDING, State.SENDING, State.DOUBT)
_VALIDATE_AT_RECOVER = 1000
_RECOVER_SYNC_ORDER = (
    State.PENDING,  # where tmp/ leftovers and expired leases go
    State.DOUBT,  # where unresolved tmp/ leftovers go
    State.MALFORMED,
    State.FAILED,
    State.SUCCESS,
    State.SENDING,  # sources last: an entry leaves for good only once its new one is durable
    State.TMP,
)


class RelaySide(SpoolCore):
    """What the relay calls (the :class:`~zeroloss.outbox.base.OutboxStore` protocol)."""

    def _relay_lock(self) -> None:
        """Per-key order holds only with one relay per spool: the first claim or recover takes
        an exclusive lock on ``relay.lock`` for as long as this FileSpool is open (the kernel
        drops it when the process dies); a second relay gets ConfigError naming the holder."""
        with self._lock:  # threads of one relay share its lock: only the first takes it
            self._take_relay_lock()

    def _take_relay_lock(self) -> None:
        if self._relay_fd is not None:
            return
        path = os.path.join(self.root, "relay.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"another relay ({holder}) already serves the spool {self.root}: one relay per spool "
                "keeps per-key order; stop the other one first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._relay_fd = fd
        # A relay's spool dropped without close() must not hold the lock until the process exits.
        self._relay_release = weakref.finalize(self, os.close, fd)
        self._index = PendingIndex(self._dir[State.PENDING])

    def claim(self, limit: int, lease_s: float) -> list[Message]:
        if limit <= 0:
            return []
        self._relay_lock()
        with self._lock, self._moving("claim"):
            marks = self._marks(State.SENDING, State.PENDING)
            now = time.time()
            lease_ms = math.floor((now + lease_s) * 1000)  # lease_s=0: expired at once
            # key -> its earliest id in failed/, doubt/ or sending/: a later message of the key waits
            # (a doubt message may have committed; requeued later, it would arrive out of order)
            blockers: dict[bytes, str] = {}
            for state in BLOCKING:
                for mid, name in self._names(state, quarantine=True):
                    seen = self._info(state, name, mid)
                    if seen is not None and seen[0].key is not None and mid < blockers.get(seen[0].key, "~"):
                        blockers[seen[0].key] = mid
            for mid, key in self._unsettled_tmp(now):
                if key is not None and mid < blockers.get(key, "~"):
                    blockers[key] = mid
            held: set[bytes] = set()  # keys with an earlier pending message left behind in this scan
            out: list[Message] = []
            if self._index is None:  # made by _relay_lock(), unless a test bypasses the lock
                self._index = PendingIndex(self._dir[State.PENDING])
            index = self._index
            index.refresh()
            for name in index.names():
                if len(out) >= limit:
                    break
                parts = split_name(name)
                if parts is None:
                    index.discard(name)
                    if not name.endswith(PART):
                        self._quarantine(State.PENDING, name, "not a spool file name")
                    continue
                mid = parts[0]
                cached = self._cache.get(mid)
                if (
                    cached is not None
                    and cached.key is not None
                    and (cached.key in held or blockers.get(cached.key, mid) < mid)
                ):
                    held.add(cached.key)  # an id's key never changes: no need to look at the file
                    continue
                try:
                    got = self._info(State.PENDING, name, mid, missing_ok=False)
                except FileNotFoundError:
                    index.discard(name)
                    break  # gone from under us: stop, so later messages of its key wait
                if got is None:
                    continue
                info, msg = got
                key = info.key
                if key is not None and (key in held or blockers.get(key, mid) < mid):
                    held.add(key)
                    continue
                if info.not_before > now:
                    if key is not None:
                        held.add(key)
                    continue
                dst = self._path(State.SENDING, f"{mid}.{lease_ms}{SUFFIX}")
                try:
                    os.rename(self._path(State.PENDING, name), dst)
                except FileNotFoundError:
                    index.discard(name)
                    break
                index.discard(name)
                if msg is None:  # known from an earlier look (held back then): read it now
                    msg = self._read(State.SENDING, os.path.basename(dst), mid)
                if msg is not None:
                    out.append(msg)
            if out:
                self._sync(marks)
            self._prune()
            return out

    def now(self) -> float:
        return time.time()  # one machine: the spool's directory is local

    def extend(self, messages: Sequence[Message], lease_s: float) -> int:
        with self._lock, self._moving("renew leases"):
            marks = self._marks(State.SENDING)
            sending: dict[str, str] = dict(self._names(State.SENDING))
            lease_ms = math.floor((time.time() + lease_s) * 1000)
            held = 0
            for m in messages:
                if m.id not in sending:
                    continue  # expired and recovered: whoever holds it now decides
                with contextlib.suppress(FileNotFoundError):
                    os.rename(
                        self._path(State.SENDING, sending[m.id]),
                        self._path(State.SENDING, f"{m.id}.{lease_ms}{SUFFIX}"),
                    )
                    held += 1
            if held:
                self._sync(marks)
            return held

    def _unsettled_tmp(self, now: float) -> list[tuple[str, bytes | None]]:
        """(id, key) of the ``tmp`` files older than ``tmp_grace_s``: crash leftovers that recover
        could not settle yet (no answer from the resolver), which may have committed — so they
        block their keys like ``doubt``. Younger ones belong to transactions still running (and may
        be half written): they do not."""
        out = []
        cutoff = now - self.tmp_grace_s
        with os.scandir(self._dir[State.TMP]) as it:
            for entry in it:
                parts = split_name(entry.name)
                if parts is None:
                    continue
                try:
                    if entry.stat().st_mtime > cutoff:
                        continue
                except FileNotFoundError:
                    continue
                got = self._info(State.TMP, entry.name, parts[0], quarantine=False)
                if got is not None:
                    out.append((parts[0], got[0].key))
        return out

    def succeed(self, delivered: Sequence[Delivered]) -> None:
        with self._lock, self._moving("succeed"):
            marks = self._marks(State.SUCCESS, State.SENDING)
            sending: dict[str, str] = dict(self._names(State.SENDING))
            moved = 0
            for d in delivered:
                mid = d.message.id
                src = self._path(State.SENDING, sending.get(mid, mid))  # not listed: FileNotFoundError below
                try:
                    os.utime(src)  # mtime becomes the success time that purge_success() ages by
                    os.rename(src, self._path(State.SUCCESS, self._success_name(mid, d.location)))
                except FileNotFoundError:
                    lost_lease(mid, State.SUCCESS)
                    continue
                self._cache.pop(mid, None)  # delivered: it blocks no key any more
                moved += 1
            if moved:
                self._sync(marks)

    def retry(self, messages: Sequence[Message]) -> None:
        self._finish(messages, State.PENDING)

    def fail(self, messages: Sequence[Message]) -> None:
        self._finish(messages, State.FAILED)

    def _finish(self, messages: Sequence[Message], target: State) -> None:
        with self._lock, self._moving(f"moving messages to {target.value}"):
            marks = self._marks(target, State.SENDING)
            sending: dict[str, str] = dict(self._names(State.SENDING))
            moved = 0
            for m in messages:
                if m.id not in sending:
                    lost_lease(m.id, target)
                    continue
                src = self._path(State.SENDING, sending[m.id])
                self._rewrite(src, m)  # a crash from here on leaves the one copy, old or new content
                self._cache.pop(m.id, None)
                try:
                    os.rename(src, self._path(target, f"{m.id}{SUFFIX}"))
                except FileNotFoundError:
                    lost_lease(m.id, target)
                    continue
                moved += 1
                if target is State.FAILED:
                    log.warning("message %s failed after %d attempt(s): %s", m.id, m.attempts, m.last_error)
            if moved:
                self._sync(marks)

    def recover(self, resolver: Resolver | None = None) -> RecoveryReport:
        self._relay_lock()
        with self._lock, self._moving("recover"):
            # Destinations (pending/, doubt/) before sources (sending/, tmp/), as every other move.
            marks = self._marks(*_RECOVER_SYNC_ORDER)
            report = RecoveryReport()
            quarantined = self._quarantined
            self._recover_tmp(resolver, report)
            listed: dict[State, dict[str, str]] = {
                s: dict(self._pending_names(True) if s is State.PENDING else self._names(s, quarantine=True))
                for s in _DEDUP_ORDER
            }
            seen: dict[str, str] = {}  # id → path of the copy kept
            dropped = 0
            for state in _DEDUP_ORDER:
                for mid, name in list(listed[state].items()):
                    path = self._path(state, name)
                    if mid in seen and self._second_copy(seen[mid], path):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(path)
                        if state is State.PENDING and self._index is not None:
                            self._index.discard(name)
                        del listed[state][mid]
                        dropped += 1
                        log.warning("message %s: removed a duplicate copy from %s/", mid, state.value)
                    seen.setdefault(mid, path)
            now_ms = time.time() * 1000
            for mid, name in listed[State.SENDING].items():
                if lease_ms(name) > now_ms:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.rename(self._path(State.SENDING, name), self._pending(mid))
                    report.lease_expired += 1
                    log.info("message %s: lease expired, back to pending", mid)
            # Quarantine what does not decode among the oldest pending files not decoded yet (only
            # this relay rewrites a pending file, and it forgets it then); a claim decodes the
            # rest as it reaches them, so a backlog is read once per send, not here as well.
            unseen = (item for item in listed[State.PENDING].items() if item[0] not in self._cache)
            for mid, name in itertools.islice(unseen, _VALIDATE_AT_RECOVER):
                self._info(State.PENDING, name, mid)
            report.malformed = self._quarantined - quarantined
            if dropped or report != RecoveryReport():
                self._sync(marks)
            self._prune()
            return report

    @staticmethod
    def _second_copy(kept: str, other: str) -> bool:
        """Whether ``other`` is really a second copy of the message at ``kept`` — the leftover of
        a rewrite a crash interrupted — and not the same file seen twice because another relay
        on this spool renamed it (claim, release) between our directory listings: a rename keeps
        the inode and leaves the old name empty, a rewrite makes a second inode."""
        try:
            a, b = os.stat(kept), os.stat(other)
        except FileNotFoundError:
            return False
        return (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino)

    def _recover_tmp(self, resolver: Resolver | None, report: RecoveryReport) -> None:
        answers: dict[str, bool | Exception | None] = {}
        failed: Exception | None = None
        cutoff = time.time() - self.tmp_grace_s
        with os.scandir(self._dir[State.TMP]) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            try:
                if entry.stat().st_mtime > cutoff:
                    continue  # may belong to a transaction still in progress
                if entry.name.endswith(PART):  # a relay's unfinished rewrite: the original is intact
                    os.unlink(entry.path)
                    continue
            except FileNotFoundError:
                continue
            parts = split_name(entry.name)
            if parts is None or not TXID_RE.fullmatch(parts[1]):
                log.warning("leaving foreign file tmp/%s alone", entry.name)
                continue
            mid, txid = parts
            if txid not in answers:
                if failed is not None:  # the resolver failed this time: do not wait on it for each txid
                    continue
                answers[txid] = None if resolver is None else self._ask(resolver, txid)
            answer = answers[txid]
            if isinstance(answer, Exception):
                failed = answer
                continue  # could not ask: not "unknown" (doubt needs a person); ask again next time
            if answer is False:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    report.discarded += 1
                    log.warning(
                        "message %s: the resolver says transaction %s rolled back; tmp file discarded", mid, txid
                    )
                continue
            if self._read(State.TMP, entry.name, mid) is None:
                continue
            dst = self._pending(mid) if answer else self._path(State.DOUBT, entry.name)
            with contextlib.suppress(FileNotFoundError):
                os.rename(entry.path, dst)
                if answer:
                    report.promoted += 1
                    log.info("message %s: transaction %s committed, promoted to pending", mid, txid)
                else:
                    report.doubt += 1
                    log.warning("message %s: outcome of transaction %s unknown, moved to doubt/", mid, txid)

    @staticmethod
    def _ask(resolver: Resolver, txid: str) -> bool | Exception | None:
        try:
            return resolver(txid)
        except Exception as exc:  # a resolver's outage must not stop recover() from expiring leases
            log.warning(
                "transaction %s: the resolver failed (%s); its files stay in tmp/ until the next recover",
                txid,
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            )
            return exc

    def purge_success(self, older_than_s: float) -> int:
        with self._lock, self._moving("purge_success"):
            marks = self._marks(State.SUCCESS)
            cutoff = time.time() - older_than_s
            purged = 0
            with os.scandir(self._dir[State.SUCCESS]) as it:
                for entry in it:
                    with contextlib.suppress(FileNotFoundError):
                        if entry.name.endswith(SUFFIX) and entry.stat().st_mtime <= cutoff:
                            os.unlink(entry.path)
                            purged += 1
            if purged:
                self._sync(marks)
            return purged
