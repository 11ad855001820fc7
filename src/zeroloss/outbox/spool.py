"""The file spool: an :class:`~zeroloss.outbox.base.OutboxStore` in a local directory.
(Over 400 lines: every transition of a crash-safe directory store — their rename and fsync
order is the design, best read in one place; the fsync batching is _fsync.py.)

Layout under the root; directory names are the State values, and every file name starts with
the 36-character message id (UUIDv7), so name order is time order::

    tmp/{id}.{txid}.zlm                  written and fsynced inside the app's transaction
    tmp/{id}.~{pid}-{rand}.part          the relay's rewrite of a message, not yet renamed in place
    pending/{id}.zlm
    sending/{id}.{lease_until_ms}.zlm    the lease expiry (Unix ms) is in the name: a listing shows it
    success/{id}.{location}.zlm          location percent-encoded ("orders/2/7" -> orders%2F2%2F7);
                                         mtime = when it succeeded (for purge_success)
    failed/{id}.zlm
    doubt/{id}.{txid}.zlm                the txid is kept so an operator can check the app's database
    malformed/{original name}

Crash safety: every state change is one ``os.rename`` of the message's only directory entry,
followed by an fsync of the directories involved (shared between threads, see ``_fsync``).
A change that also rewrites the content (retry, fail, requeue) first writes and fsyncs the new
content under ``tmp/*.part`` and renames it *over the current entry* (atomic replace, same name),
then renames that entry to its new state, so a crash at any point leaves exactly one copy, either
old or new. Two copies can only come from several processes doing relay work on one spool at
once (unsupported: one relay per spool) or a filesystem whose renames are not atomic across a
crash; ``recover()`` then keeps one copy, by the precedence failed > pending > sending > doubt
(failed is a decision taken after the other copy existed; pending will be delivered anyway; a
sending copy is a stale claim; doubt is known committed elsewhere).

Producer usage — the spool block outside the database transaction, so the database commits first
and the spool promotes after; a crash in between leaves ``tmp`` files that ``recover(resolver)``
settles::

    with spool.transaction() as tx:
        with db.begin():
            tx.add(topic="orders", value=b"...", key=b"order-17")
            ...  # nothing that can fail after the database commit belongs inside the spool block
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from urllib.parse import quote, unquote

from zeroloss import metrics
from zeroloss.errors import ConfigError, MalformedMessageError, SpoolFullError, StoreError, UnknownMessageError
from zeroloss.message import Message, decode, encode, id_time, new_message, uuid7
from zeroloss.outbox._fsync import GroupSync
from zeroloss.outbox._pending_index import PendingIndex
from zeroloss.outbox.base import (
    Delivered,
    RecoveryReport,
    Resolver,
    State,
    Stats,
    check_purgeable,
    id_floor,
)

log = logging.getLogger(__name__)

_ID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_TXID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_ID_LEN = 36
_SUFFIX = ".zlm"
_PART = ".part"
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
_NAME_MAX = 255
_RESENT = "resent: the broker no longer had it (audit --repair)"
_DEDUP_ORDER = (State.FAILED, State.PENDING, State.SENDING, State.DOUBT)
_BLOCKING = (State.FAILED, State.DOUBT, State.SENDING)


def _split(name: str) -> tuple[str, str] | None:
    """(id, extra) of ``{id}.zlm`` or ``{id}.{extra}.zlm``; None for a name that is not ours."""
    if not name.endswith(_SUFFIX) or not _ID_RE.fullmatch(name[:_ID_LEN]):
        return None
    rest = name[_ID_LEN : -len(_SUFFIX)]
    if not rest:
        return name[:_ID_LEN], ""
    return (name[:_ID_LEN], rest[1:]) if rest.startswith(".") else None


def _lease_ms(sending_name: str) -> int:
    """The lease expiry in a ``sending/`` name; 0 (expired) if it is unreadable."""
    lease = sending_name[_ID_LEN + 1 : -len(_SUFFIX)]
    return int(lease) if lease.isdigit() else 0


def _lost_lease(mid: str, target: State) -> None:
    # Its lease ran out and recover() moved it on; it will be sent (again) from where it is now.
    log.warning("message %s is no longer in sending/ (lease expired?); not moved to %s", mid, target.value)


@dataclass(frozen=True, slots=True)
class _Info:
    """What claim needs to know about a file without reading it again: valid while sig holds."""

    sig: tuple[int, int, int]  # inode, size, mtime_ns: every rewrite is a new inode
    key: bytes | None
    not_before: float


class SpoolTransaction:
    """The spool's side of one application transaction; see :meth:`FileSpool.transaction`."""

    def __init__(self, spool: FileSpool, txid: str) -> None:
        self.id = txid
        self._spool = spool
        self._names: list[str] = []
        self._open = False

    def __enter__(self) -> SpoolTransaction:
        self._spool._active_delta(+1)
        self._open = True
        return self

    def add(
        self,
        topic: str,
        value: object,
        key: bytes | str | None = None,
        headers: Mapping[str, bytes] | Iterable[tuple[str, bytes]] | None = None,
    ) -> str:
        """Validate, write and fsync one message into ``tmp/``; return its id. Raises
        MessageError for a bad message and SpoolFullError when the disk is full."""
        if not self._open:
            raise StoreError(f"transaction {self.id}: add() outside its with-block")
        msg = new_message(topic, value, key, headers, max_bytes=self._spool.max_message_bytes)
        name = f"{msg.id}.{self.id}{_SUFFIX}"
        self._names.append(name)  # before writing, so an abort removes a half-written file too
        self._spool._write_tmp(name, encode(msg))
        return msg.id

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._open = False
        try:
            if exc_type is None:
                self._spool._promote(self.id, self._names)
            else:
                self._spool._abort(self.id, self._names)
        finally:
            self._spool._active_delta(-1)


class FileSpool:
    """Crash-safe outbox in a directory; one relay per spool, any number of producer threads
    and processes. ``tmp_grace_s``: ``recover()`` leaves younger ``tmp`` files alone, as they may
    belong to a live transaction; it must exceed the longest application transaction."""

    states = frozenset(State)

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        fsync: bool = True,
        max_message_bytes: int = 1_000_000,
        group_commit_window_s: float = 0.002,
        tmp_grace_s: float = 60.0,
        create: bool = True,
    ) -> None:
        self.root = os.fspath(root)
        self.max_message_bytes = max_message_bytes
        self.tmp_grace_s = tmp_grace_s
        self._fsync = fsync
        self._dir = {s: os.path.join(self.root, s.value) for s in State}
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise ConfigError(f"spool path {self.root} is a file, not a directory: give the spool a directory of "
                              "its own")
        missing = [p for p in self._dir.values() if not os.path.isdir(p)]
        if missing and not create:
            # Operators' commands (status, relay) must not make an empty spool where a typo points.
            raise ConfigError(f"no spool at {self.root} ({len(missing)} of its {len(self._dir)} directories are "
                              f"missing): create it with zeroloss init --source spool://{self.root}")
        for path in missing:
            try:
                os.makedirs(path, exist_ok=True)
            except (NotADirectoryError, FileExistsError) as exc:
                raise ConfigError(f"cannot make the spool directory {path}: {exc.strerror}") from exc
        self._fds = {s: os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) for s, p in self._dir.items()}
        self.dir_syncs = {
            s: GroupSync(fd, window_s=group_commit_window_s, enabled=fsync) for s, fd in self._fds.items()
        }
        """One group-commit helper per state directory; its counters show how fsyncs were shared."""
        self._lock = threading.RLock()  # relay and operator calls; producers never take it
        self._active = 0
        self._active_lock = threading.Lock()
        self._cache: dict[str, _Info] = {}
        self._prune_at = 4096
        self._quarantined = 0
        self._closed = False
        self._relay_fd: int | None = None  # relay.lock, held from the first claim or recover
        self._index: PendingIndex | None = None  # pending/ as the relay sees it, from then on

    # ---- producer side -------------------------------------------------------------------

    def transaction(self, txid: str | None = None) -> SpoolTransaction:
        """A context manager for one application transaction; ``txid`` (default: a new UUIDv7)
        is what ``recover()`` passes to the resolver, so the app should store it in its own
        transaction."""
        txid = uuid7() if txid is None else txid
        if not _TXID_RE.fullmatch(txid):
            raise StoreError(f"transaction id {txid!r} must be 1-128 characters from A-Z a-z 0-9 _ -")
        if self._closed:
            raise StoreError(f"spool {self.root} is closed")
        return SpoolTransaction(self, txid)

    def _active_delta(self, delta: int) -> None:
        with self._active_lock:
            self._active += delta

    def _sync(self, *states: State) -> None:
        linger = self._active > 1  # waiting for company only pays when others are committing
        for state in states:
            self.dir_syncs[state].sync(linger=linger)

    def _write_file(self, path: str, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self._fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # never leave a partial file behind
            raise
        os.close(fd)

    def _write_tmp(self, name: str, data: bytes) -> None:
        with self._translate(f"writing tmp/{name}"):
            self._write_file(os.path.join(self._dir[State.TMP], name), data)
            self._sync(State.TMP)  # the new name must be durable before the app commits

    def _promote(self, txid: str, names: Sequence[str]) -> None:
        missing: list[str] = []
        try:
            for name in names:
                mid = name[:_ID_LEN]
                try:
                    os.rename(self._path(State.TMP, name), self._pending(mid))
                except FileNotFoundError:
                    missing.append(mid)
            self._sync(State.PENDING, State.TMP)
            if missing:
                self._reclaim(txid, missing)
        except OSError as exc:
            raise StoreError(
                f"spool {self.root}: transaction {txid} committed but promoting its messages failed "
                f"({exc}); what was not promoted stays in tmp/ for recover(resolver) to promote",
                retriable=False,
            ) from exc
        metrics.outbox_added(len(names))
        log.debug("transaction %s: %d message(s) pending", txid, len(names))

    def _reclaim(self, txid: str, mids: Sequence[str]) -> None:
        """A recover() took tmp files of this (slow) transaction; take back what it parked."""
        lost = []
        for mid in mids:
            try:
                os.rename(self._path(State.DOUBT, f"{mid}.{txid}{_SUFFIX}"), self._pending(mid))
                log.warning("message %s: moved back from doubt/ after its transaction %s committed", mid, txid)
            except FileNotFoundError:
                if self._locate(mid) is None:
                    lost.append(mid)
        self._sync(State.PENDING, State.DOUBT)
        if lost:
            log.error("transaction %s committed but recover() discarded messages %s", txid, lost)
            raise StoreError(
                f"transaction {txid} committed, but recover() had already discarded its messages "
                f"{', '.join(lost)} because its resolver said it had not committed: tmp_grace_s="
                f"{self.tmp_grace_s} is shorter than this transaction took",
                retriable=False,
            )

    def _abort(self, txid: str, names: Sequence[str]) -> None:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(State.TMP, name))
        log.debug("transaction %s rolled back: %d tmp file(s) removed", txid, len(names))

    # ---- relay side ----------------------------------------------------------------------

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
            raise ConfigError(f"another relay ({holder}) already serves the spool {self.root}: one relay per spool "
                              "keeps per-key order; stop the other one first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._relay_fd = fd
        self._index = PendingIndex(self._dir[State.PENDING])

    def claim(self, limit: int, lease_s: float) -> list[Message]:
        if limit <= 0:
            return []
        self._relay_lock()
        with self._lock, self._translate("claim"):
            now = time.time()
            lease_ms = math.floor((now + lease_s) * 1000)  # lease_s=0: expired at once
            # key -> its earliest id in failed/, doubt/ or sending/: a later message of the key waits
            # (a doubt message may have committed; requeued later, it would arrive out of order)
            blockers: dict[bytes, str] = {}
            for state in _BLOCKING:
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
                parts = _split(name)
                if parts is None:
                    index.discard(name)
                    if not name.endswith(_PART):
                        self._quarantine(State.PENDING, name, "not a spool file name")
                    continue
                mid = parts[0]
                cached = self._cache.get(mid)
                if cached is not None and cached.key is not None and (
                    cached.key in held or blockers.get(cached.key, mid) < mid
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
                dst = self._path(State.SENDING, f"{mid}.{lease_ms}{_SUFFIX}")
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
                self._sync(State.SENDING, State.PENDING)
            self._prune()
            return out

    def now(self) -> float:
        return time.time()  # one machine: the spool's directory is local

    def extend(self, messages: Sequence[Message], lease_s: float) -> int:
        with self._lock, self._translate("renew leases"):
            sending: dict[str, str] = dict(self._names(State.SENDING))
            lease_ms = math.floor((time.time() + lease_s) * 1000)
            held = 0
            for m in messages:
                if m.id not in sending:
                    continue  # expired and recovered: whoever holds it now decides
                with contextlib.suppress(FileNotFoundError):
                    os.rename(self._path(State.SENDING, sending[m.id]),
                              self._path(State.SENDING, f"{m.id}.{lease_ms}{_SUFFIX}"))
                    held += 1
            if held:
                self._sync(State.SENDING)
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
                parts = _split(entry.name)
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
        with self._lock, self._translate("succeed"):
            sending: dict[str, str] = dict(self._names(State.SENDING))
            moved = 0
            for d in delivered:
                mid = d.message.id
                src = self._path(State.SENDING, sending.get(mid, mid))  # not listed: FileNotFoundError below
                try:
                    os.utime(src)  # mtime becomes the success time that purge_success() ages by
                    os.rename(src, self._path(State.SUCCESS, self._success_name(mid, d.location)))
                except FileNotFoundError:
                    _lost_lease(mid, State.SUCCESS)
                    continue
                moved += 1
            if moved:
                self._sync(State.SUCCESS, State.SENDING)

    def retry(self, messages: Sequence[Message]) -> None:
        self._finish(messages, State.PENDING)

    def fail(self, messages: Sequence[Message]) -> None:
        self._finish(messages, State.FAILED)

    def _finish(self, messages: Sequence[Message], target: State) -> None:
        with self._lock, self._translate(f"moving messages to {target.value}"):
            sending: dict[str, str] = dict(self._names(State.SENDING))
            moved = 0
            for m in messages:
                if m.id not in sending:
                    _lost_lease(m.id, target)
                    continue
                src = self._path(State.SENDING, sending[m.id])
                self._rewrite(src, m)  # a crash from here on leaves the one copy, old or new content
                self._cache.pop(m.id, None)
                try:
                    os.rename(src, self._path(target, f"{m.id}{_SUFFIX}"))
                except FileNotFoundError:
                    _lost_lease(m.id, target)
                    continue
                moved += 1
                if target is State.FAILED:
                    log.warning("message %s failed after %d attempt(s): %s", m.id, m.attempts, m.last_error)
            if moved:
                self._sync(target, State.SENDING)

    def _rewrite(self, path: str, msg: Message) -> None:
        """Atomically replace the file at ``path`` with ``msg`` (same name, new content)."""
        part = self._path(State.TMP, f"{msg.id}.~{os.getpid()}-{secrets.token_hex(4)}{_PART}")
        self._write_file(part, encode(msg))
        try:
            os.rename(part, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part)
            raise

    def recover(self, resolver: Resolver | None = None) -> RecoveryReport:
        self._relay_lock()
        with self._lock, self._translate("recover"):
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
                if _lease_ms(name) > now_ms:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.rename(self._path(State.SENDING, name), self._pending(mid))
                    report.lease_expired += 1
                    log.info("message %s: lease expired, back to pending", mid)
            for mid, name in listed[State.PENDING].items():
                if mid not in self._cache:  # decoded once already: only this relay rewrites it (and forgets it)
                    self._info(State.PENDING, name, mid)  # quarantines what does not decode
            report.malformed = self._quarantined - quarantined
            if dropped or report != RecoveryReport():
                self._sync(*State)
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
                if entry.name.endswith(_PART):  # a relay's unfinished rewrite: the original is intact
                    os.unlink(entry.path)
                    continue
            except FileNotFoundError:
                continue
            parts = _split(entry.name)
            if parts is None or not _TXID_RE.fullmatch(parts[1]):
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
                    log.warning("message %s: the resolver says transaction %s rolled back; tmp file discarded",
                                mid, txid)
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
            log.warning("transaction %s: the resolver failed (%s); its files stay in tmp/ until the next recover",
                        txid, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return exc

    # ---- reading and operators -----------------------------------------------------------

    def get(self, message_id: str) -> tuple[State, Message]:
        with self._translate("get"):
            found = self._locate(message_id)
            if found is None:
                raise UnknownMessageError(f"no message {message_id} in spool {self.root}")
            state, name = found
            path = self._path(state, name)
            if state is not State.MALFORMED:
                with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
                    return state, decode(f.read())
                return self.get(message_id)  # it moved meanwhile: look again
            raise MalformedMessageError(f"message {message_id} is quarantined as unreadable: {path}")

    def _locate(self, mid: str) -> tuple[State, str] | None:
        if not _ID_RE.fullmatch(mid):
            return None
        for _ in range(2):  # a second pass catches a message that moved between directories
            for state in (State.PENDING, State.SENDING, State.FAILED, State.DOUBT, State.TMP, State.SUCCESS):
                if state in (State.PENDING, State.FAILED):  # the name is known: no listing needed
                    if os.path.exists(self._path(state, f"{mid}{_SUFFIX}")):
                        return state, f"{mid}{_SUFFIX}"
                    continue
                for name in self._listdir(state):
                    if name.startswith(mid) and name.endswith(_SUFFIX):
                        return state, name
        for name in self._listdir(State.MALFORMED):
            if name.startswith(mid):
                return State.MALFORMED, name
        return None

    def location(self, message_id: str) -> str:
        """Where the broker put a ``success`` message (e.g. ``orders/2/1543``)."""
        for mid, extra in (p for p in map(_split, self._listdir(State.SUCCESS)) if p):
            if mid == message_id:
                return unquote(extra)
        raise UnknownMessageError(f"message {message_id} is not in success/ of spool {self.root}")

    def malformed_paths(self) -> list[str]:
        """The quarantined files, for an operator to inspect and delete."""
        return [self._path(State.MALFORMED, n) for n in sorted(self._listdir(State.MALFORMED))]

    def requeue(self, message_ids: Sequence[str]) -> int:
        with self._lock, self._translate("requeue"):
            where = {s: dict(self._names(s)) for s in (State.FAILED, State.DOUBT)}
            found: dict[str, tuple[State, str]] = {}
            for mid in message_ids:
                state = next((s for s in where if mid in where[s]), None)
                if state is not None:
                    found[mid] = (state, where[state][mid])
            unknown = [mid for mid in message_ids if mid not in found]
            if unknown:
                raise UnknownMessageError(
                    f"not in failed/ or doubt/ of spool {self.root}, so nothing was requeued: {', '.join(unknown)}"
                )
            moved = 0
            for mid, (state, name) in found.items():
                src = self._path(state, name)
                msg = self._read(state, name, mid)
                if msg is None:  # quarantined as malformed: nothing left to requeue
                    continue
                self._rewrite(src, replace(msg, attempts=0, not_before=0.0))
                self._cache.pop(mid, None)
                os.rename(src, self._pending(mid))
                moved += 1
                log.debug("message %s: requeued from %s/", mid, state.value)
            self._sync(State.PENDING, State.FAILED, State.DOUBT)
            return moved

    def purge_success(self, older_than_s: float) -> int:
        with self._lock, self._translate("purge_success"):
            cutoff = time.time() - older_than_s
            purged = 0
            with os.scandir(self._dir[State.SUCCESS]) as it:
                for entry in it:
                    with contextlib.suppress(FileNotFoundError):
                        if entry.name.endswith(_SUFFIX) and entry.stat().st_mtime <= cutoff:
                            os.unlink(entry.path)
                            purged += 1
            if purged:
                self._sync(State.SUCCESS)
            return purged

    def purge(self, state: State, message_ids: Sequence[str] | None = None) -> int:
        check_purgeable(state)
        with self._lock, self._translate(f"purge {state.value}/"):
            if state is State.MALFORMED:  # quarantined files are named by their file name
                where = {n: n for n in self._listdir(State.MALFORMED)}
            else:
                where = dict(self._names(state))
            if message_ids is None:
                chosen = sorted(where.values())
            else:
                unknown = [mid for mid in message_ids if mid not in where]
                if unknown:
                    raise UnknownMessageError(
                        f"not in {state.value}/ of spool {self.root}, so nothing was purged: {', '.join(unknown)}"
                    )
                chosen = [where[mid] for mid in dict.fromkeys(message_ids)]
            purged = 0
            for name in chosen:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path(state, name))
                    self._cache.pop(name[:_ID_LEN], None)
                    purged += 1
                    log.debug("purged %s/%s", state.value, name)
            if purged:
                self._sync(state)
            return purged

    def transaction_ids(self, state: State = State.DOUBT) -> dict[str, str]:
        """Message id → the application transaction id kept in the ``doubt/`` (or ``tmp/``) file
        names, so an operator can look the transaction up in the app's database."""
        if state not in (State.DOUBT, State.TMP):
            return {}
        with self._translate("transaction_ids"):
            return {mid: name[_ID_LEN + 1 : -len(_SUFFIX)] for mid, name in self._names(state)}

    def list_success(
        self, since_s: float | None = None, *, after_id: str | None = None, limit: int = 1000
    ) -> list[Delivered]:
        floor = "" if since_s is None else id_floor(time.time() - since_s)
        out: list[Delivered] = []
        with self._translate("list_success"):
            for mid, name in self._names(State.SUCCESS):
                if len(out) >= limit:
                    break
                if mid < floor or (after_id is not None and mid <= after_id):
                    continue
                msg = self._read(State.SUCCESS, name, mid, quarantine=False)
                if msg is not None:
                    out.append(Delivered(msg, unquote(name[_ID_LEN + 1 : -len(_SUFFIX)])))
        return out

    def resend(self, message_ids: Sequence[str]) -> int:
        with self._lock, self._translate("resend"):
            where = dict(self._names(State.SUCCESS))
            unknown = [mid for mid in message_ids if mid not in where]
            if unknown:
                raise UnknownMessageError(
                    f"not in success/ of spool {self.root}, so nothing was resent: {', '.join(unknown)}"
                )
            moved = 0
            for mid in dict.fromkeys(message_ids):
                src = self._path(State.SUCCESS, where[mid])
                msg = self._read(State.SUCCESS, where[mid], mid)
                if msg is None:  # quarantined as malformed
                    continue
                self._rewrite(src, replace(msg, attempts=0, not_before=0.0, last_error=_RESENT))
                self._cache.pop(mid, None)
                os.rename(src, self._pending(mid))
                moved += 1
                log.debug("message %s: back to pending to be sent again (%s)", mid, _RESENT)
            if moved:
                self._sync(State.PENDING, State.SUCCESS)
            return moved

    def stats(self) -> Stats:
        with self._lock, self._translate("stats"):
            names = {s: self._pending_names() if s is State.PENDING else self._names(s) for s in State}
            counts = {s: len(n) for s, n in names.items()}
            counts[State.MALFORMED] = len(self._listdir(State.MALFORMED))
            now = time.time()
            pending = names[State.PENDING]
            failed_first: dict[bytes, str] = {}
            for state, mid, name in [(s, m, n) for s in (State.FAILED, State.DOUBT) for m, n in names[s]]:
                got = self._info(state, name, mid, quarantine=False)
                if got and got[0].key is not None and mid < failed_first.get(got[0].key, "~"):
                    failed_first[got[0].key] = mid
            parked = 0
            for mid, name in pending if failed_first else ():
                got = self._info(State.PENDING, name, mid, quarantine=False)
                if got and got[0].key is not None and failed_first.get(got[0].key, mid) < mid:
                    parked += 1
            first = self._read(State.PENDING, pending[0][1], pending[0][0], quarantine=False) if pending else None
            vfs = os.statvfs(self.root)
            oldest = {s: max(0.0, now - id_time(n[0][0])) for s, n in names.items() if n}
            mtimes = []
            for name in self._listdir(State.MALFORMED):
                with contextlib.suppress(FileNotFoundError):
                    mtimes.append(os.stat(self._path(State.MALFORMED, name)).st_mtime)
            if mtimes:
                oldest[State.MALFORMED] = max(0.0, now - min(mtimes))
            return Stats(
                counts=counts,
                oldest_pending_age_s=oldest.get(State.PENDING),
                oldest_age_s=oldest,
                expired_leases=sum(1 for _, n in names[State.SENDING] if _lease_ms(n) <= now * 1000),
                parked=parked,
                oldest_pending_error=(first.last_error or None) if first else None,
                disk_free_bytes=vfs.f_bavail * vfs.f_frsize,
                disk_total_bytes=(vfs.f_blocks - vfs.f_bfree + vfs.f_bavail) * vfs.f_frsize,  # used + available, as df
                extra={
                    "dir_fsyncs": sum(g.fsyncs for g in self.dir_syncs.values()),
                    "dir_fsync_requests": sum(g.requests for g in self.dir_syncs.values()),
                    "pending_listings": self._index.listings if self._index is not None else None,
                },
            )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for fd in self._fds.values():
                os.close(fd)
            if self._index is not None:
                self._index.close()
                self._index = None
            if self._relay_fd is not None:
                os.close(self._relay_fd)  # releases the relay lock
                self._relay_fd = None

    # ---- helpers -------------------------------------------------------------------------

    def _path(self, state: State, name: str) -> str:
        return os.path.join(self._dir[state], name)

    def _pending(self, mid: str) -> str:
        return os.path.join(self._dir[State.PENDING], f"{mid}{_SUFFIX}")

    def _listdir(self, state: State) -> list[str]:
        return os.listdir(self._dir[state])

    def _names(self, state: State, quarantine: bool = False) -> list[tuple[str, str]]:
        """Sorted (id, name) of the messages in ``state``; foreign names go to malformed/ if asked."""
        out = []
        for name in self._listdir(state):
            parts = _split(name)
            if parts is not None:
                out.append((parts[0], name))
            elif quarantine and not name.endswith(_PART):
                self._quarantine(state, name, "not a spool file name")
        out.sort()
        return out

    def _pending_names(self, quarantine: bool = False) -> list[tuple[str, str]]:
        """Sorted (id, name) in pending/: from the relay's index in the relay's process (no listing)."""
        if self._index is None:
            return self._names(State.PENDING, quarantine)
        self._index.refresh()
        out = []
        odd = []
        plain = _ID_LEN + len(_SUFFIX)
        for name in self._index.names():
            if len(name) == plain and name.endswith(_SUFFIX):  # the usual {id}.zlm, no regex needed
                out.append((name[:_ID_LEN], name))
            else:
                odd.append(name)
        for name in odd:
            parts = _split(name)
            if parts is not None:
                out.append((parts[0], name))
            elif quarantine and not name.endswith(_PART):
                self._quarantine(State.PENDING, name, "not a spool file name")
        if odd:
            out.sort()
        return out

    def _info(
        self, state: State, name: str, mid: str, *, quarantine: bool = True, missing_ok: bool = True
    ) -> tuple[_Info, Message | None] | None:
        """Key and not_before of a file, from the cache when the file is unchanged (the message
        too when it had to be read); None if it vanished or does not decode."""
        path = self._path(state, name)
        try:
            cached = self._cache.get(mid)
            if cached is not None:
                st = os.stat(path)
                if cached.sig == (st.st_ino, st.st_size, st.st_mtime_ns):
                    return cached, None
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            if missing_ok:
                return None
            raise
        msg = self._decode(state, name, mid, data, quarantine)
        if msg is None:
            return None
        info = _Info((st.st_ino, st.st_size, st.st_mtime_ns), msg.key, msg.not_before)
        self._cache[mid] = info
        return info, msg

    def _read(self, state: State, name: str, mid: str, *, quarantine: bool = True) -> Message | None:
        try:
            with open(self._path(state, name), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return self._decode(state, name, mid, data, quarantine)

    def _decode(self, state: State, name: str, mid: str, data: bytes, quarantine: bool) -> Message | None:
        try:
            msg = decode(data)
            if msg.id != mid:
                raise MalformedMessageError(f"file name says {mid} but the content is message {msg.id}")
        except MalformedMessageError as exc:
            if quarantine:
                self._quarantine(state, name, str(exc))
            else:
                log.warning("message %s: %s/%s does not decode: %s", mid, state.value, name, exc)
            return None
        return msg

    def _quarantine(self, state: State, name: str, reason: str) -> None:
        dst = self._path(State.MALFORMED, name)
        if os.path.lexists(dst):
            dst = f"{dst}.{time.time_ns()}"
        try:
            os.rename(self._path(state, name), dst)
        except FileNotFoundError:
            return
        self._cache.pop(name[:_ID_LEN], None)
        if state is State.PENDING and self._index is not None:
            self._index.discard(name)
        self._quarantined += 1
        log.error("quarantined %s/%s as malformed: %s", state.value, name, reason)
        self._sync(State.MALFORMED, state)

    def _prune(self) -> None:
        # The cache only needs ids still in pending/ or a blocking state; drop the rest now and then.
        if len(self._cache) > self._prune_at:
            live = {mid for mid, _ in self._pending_names()}
            live.update(mid for s in _BLOCKING for mid, _ in self._names(s))
            self._cache = {k: v for k, v in self._cache.items() if k in live}
            self._prune_at = 2 * len(self._cache) + 4096

    def _success_name(self, mid: str, location: str) -> str:
        loc = quote(location, safe="")
        room = _NAME_MAX - _ID_LEN - 1 - len(_SUFFIX)
        if len(loc) > room:  # a file name holds 255 bytes; keep the start, say so in the log
            log.warning("message %s: location %r too long for the file name, recording a prefix", mid, location)
            loc = loc[:room]
            if "%" in loc[-2:]:
                loc = loc[: loc.rindex("%")]
        return f"{mid}.{loc}{_SUFFIX}"

    def list(self, state: State, limit: int = 100) -> list[Message]:  # last: shadows builtins.list
        """Oldest first. ``malformed`` files do not decode, so this returns [] for that state;
        see :meth:`malformed_paths`."""
        out: list[Message] = []
        with self._translate("list"):
            for mid, name in self._names(state):
                if len(out) >= limit:
                    break
                if state is not State.MALFORMED and (msg := self._read(state, name, mid, quarantine=False)):
                    out.append(msg)
        return out

    @contextlib.contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        if self._closed:
            raise StoreError(f"spool {self.root} is closed")
        try:
            yield
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise SpoolFullError(
                    f"spool {self.root} is out of disk space ({exc.strerror}) while {what}; nothing "
                    f"partial was kept — roll back the application's transaction and retry when "
                    f"space is freed"
                ) from exc
            raise StoreError(f"spool {self.root}: {what} failed: {exc}", retriable=False) from exc
