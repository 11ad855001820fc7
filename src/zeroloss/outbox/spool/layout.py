"""The spool's layout on disk and what every side shares: the file names (``{id}[.{extra}].zlm``,
the UUIDv7 id first so name order is time order), atomic writes, reads and decoding,
quarantine, the directory fsyncs and the error translation. :class:`SpoolCore` holds the
state; the producer, relay and operator sides are its subclasses, and ``FileSpool`` is all three.
(Over 400 lines would be too many here: the helpers every side needs, and nothing else.)"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from urllib.parse import quote

from zeroloss.durable_dirs import make_durable_dirs
from zeroloss.errors import ConfigError, MalformedMessageError, SpoolFullError, StoreError
from zeroloss.message import Message, decode, encode
from zeroloss.outbox._fsync import GroupSync
from zeroloss.outbox._pending_index import PendingIndex
from zeroloss.outbox.base import State

log = logging.getLogger("zeroloss.outbox.spool")

ID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
TXID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
ID_LEN = 36
SUFFIX = ".zlm"
PART = ".part"
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
NAME_MAX = 255
BLOCKING = (State.FAILED, State.DOUBT, State.SENDING)
"""A message in one of these holds back the later messages of its key."""
RELAY_REMEDY = (
    "check the disk and the filesystem (dmesg), then restart the relay: this FileSpool makes no more "
    "moves until it is reopened; a move a crash undoes is redone by recover() (a message whose success/ "
    "rename is undone is sent again, a duplicate the consumers' inboxes drop), none is lost"
)
ADMIN_REMEDY = (
    "check the disk and the filesystem (dmesg); the moves show as done but a crash may undo them: once the "
    "disk is sound, see where the messages are (zeroloss show ID) and repeat the command for those that "
    "are back where they were"
)


class DirSyncError(OSError):
    """The fsync of a spool directory failed, or one did that may have been writing out the
    caller's changes there (another caller's fsync of the same descriptor was told of it)."""

    def __init__(self, directory: str, error: OSError) -> None:
        super().__init__(error.errno, os.strerror(error.errno) if error.errno else str(error))
        self.directory = directory


def split_name(name: str) -> tuple[str, str] | None:
    """(id, extra) of ``{id}.zlm`` or ``{id}.{extra}.zlm``; None for a name that is not ours."""
    if not name.endswith(SUFFIX) or not ID_RE.fullmatch(name[:ID_LEN]):
        return None
    rest = name[ID_LEN : -len(SUFFIX)]
    if not rest:
        return name[:ID_LEN], ""
    return (name[:ID_LEN], rest[1:]) if rest.startswith(".") else None


def read_whole(path: str) -> tuple[os.stat_result, bytes]:
    """A file's status and content in four system calls (``open()`` adds an ioctl and a buffer,
    per message on the relay's path); spool files are never changed in place, only replaced."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        data = os.read(fd, st.st_size + 1)  # a regular file reads whole: fewer bytes means its end
        if len(data) > st.st_size:  # grown since the fstat (not a spool file's way): read to the end
            chunks = [data]
            while chunks[-1]:
                chunks.append(os.read(fd, 1 << 16))
            data = b"".join(chunks)
        return st, data
    finally:
        os.close(fd)


def lease_ms(sending_name: str) -> int:
    """The lease expiry in a ``sending/`` name; 0 (expired) if it is unreadable."""
    lease = sending_name[ID_LEN + 1 : -len(SUFFIX)]
    return int(lease) if lease.isdigit() else 0


def lost_lease(mid: str, target: State) -> None:
    # Its lease ran out and recover() moved it on; it will be sent (again) from where it is now.
    log.warning("message %s is no longer in sending/ (lease expired?); not moved to %s", mid, target.value)


@dataclass(frozen=True, slots=True)
class FileInfo:
    """What claim needs to know about a file without reading it again: valid while sig holds."""

    sig: tuple[int, int, int]  # inode, size, mtime_ns: every rewrite is a new inode
    key: bytes | None
    not_before: float


class SpoolCore:
    """A spool directory opened: its state directories, their fsyncs, the shared helpers."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        fsync: bool = True,
        max_message_bytes: int = 1_000_000,
        group_commit_window_s: float = 0.0,
        tmp_grace_s: float = 60.0,
        create: bool = True,
    ) -> None:
        self.root = os.fspath(root)
        self.max_message_bytes = max_message_bytes
        self.tmp_grace_s = tmp_grace_s
        self._fsync = fsync
        self._dir = {s: os.path.join(self.root, s.value) for s in State}
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise ConfigError(
                f"spool path {self.root} is a file, not a directory: give the spool a directory of its own"
            )
        missing = [p for p in self._dir.values() if not os.path.isdir(p)]
        if missing and not create:
            # Operators' commands (status, relay) must not make an empty spool where a typo points.
            raise ConfigError(
                f"no spool at {self.root} ({len(missing)} of its {len(self._dir)} directories are "
                f"missing): create it with zeroloss init --source spool://{self.root}"
            )
        for path in missing:
            try:
                # its name durable too: a crash soon after init could otherwise take the directory
                # and the messages the app was told were committed in it
                if fsync:
                    make_durable_dirs(path)
                else:
                    os.makedirs(path, exist_ok=True)
            except OSError as exc:  # a file in the way, no such parent (/proc), no permission, read-only
                raise ConfigError(
                    f"cannot make the spool directory {path}: {exc.strerror}; give a directory this user can create"
                ) from exc
        self._fds = {s: os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) for s, p in self._dir.items()}
        self.dir_syncs = {
            s: GroupSync(fd, window_s=group_commit_window_s, enabled=fsync) for s, fd in self._fds.items()
        }
        """One group-commit helper per state directory; its counters show how fsyncs were shared."""
        # Descriptors of its own: Linux reports a writeback error once per open file description,
        # so on the ones the adds' and the relay's groups fsync, their fsync could take the error
        # of writing out this group's renames (or this group theirs) and the other be told all is
        # well; GroupSync only passes an error on to the callers of its own group.
        self._promote_fds = tuple(
            os.open(self._dir[s], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) for s in (State.PENDING, State.TMP)
        )
        self.promote_sync = GroupSync(self._promote_fds, window_s=group_commit_window_s, enabled=fsync)
        """A promotion's fsyncs, ``pending/`` then ``tmp/``, as one group: a producer waits once."""
        self._lock = threading.RLock()  # relay and operator calls; producers never take it
        self._active = 0
        self._active_lock = threading.Lock()
        self._cache: dict[str, FileInfo] = {}
        self._prune_at = 4096
        self._quarantined = 0
        self._closed = False
        self._relay_fd: int | None = None  # relay.lock, held from the first claim or recover (relay side)
        self._relay_release: Callable[[], object] | None = None  # closes it, also if never close()d
        self._index: PendingIndex | None = None  # pending/ as the relay sees it, from then on
        self._lost: tuple[str, DirSyncError] | None = None  # a relay's or operator's fsync failed: (what, error)

    def _marks(self, *states: State) -> dict[State, int]:
        """Take before changing ``states``' directories; :meth:`_sync` then fsyncs them in this
        order (a destination before its source)."""
        return {state: self.dir_syncs[state].mark() for state in states}

    def _sync(self, marks: Mapping[State, int]) -> None:
        """Make the changes made since ``marks`` durable; DirSyncError if any fsync that may have
        been writing them out failed: this caller's, or another's of the same directory (Linux
        reports a writeback error to one fsync per open file; GroupSync passes it on)."""
        linger = self._active > 1  # waiting for company only pays when others are committing
        for state, mark in marks.items():
            try:
                self.dir_syncs[state].sync(linger=linger, since=mark)
            except OSError as exc:
                raise DirSyncError(self._dir[state], exc) from exc

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

    def _rewrite(self, path: str, msg: Message) -> None:
        """Atomically replace the file at ``path`` with ``msg`` (same name, new content)."""
        part = self._path(State.TMP, f"{msg.id}.~{os.getpid()}-{secrets.token_hex(4)}{PART}")
        self._write_file(part, encode(msg))
        try:
            os.rename(part, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part)
            raise

    def _locate(self, mid: str) -> tuple[State, str] | None:
        if not ID_RE.fullmatch(mid):
            return None
        for _ in range(2):  # a second pass catches a message that moved between directories
            for state in (State.PENDING, State.SENDING, State.FAILED, State.DOUBT, State.TMP, State.SUCCESS):
                if state in (State.PENDING, State.FAILED):  # the name is known: no listing needed
                    if os.path.exists(self._path(state, f"{mid}{SUFFIX}")):
                        return state, f"{mid}{SUFFIX}"
                    continue
                for name in self._listdir(state):
                    if name.startswith(mid) and name.endswith(SUFFIX):
                        return state, name
        for name in self._listdir(State.MALFORMED):
            if name.startswith(mid):
                return State.MALFORMED, name
        return None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for fd in (*self._fds.values(), *self._promote_fds):
                os.close(fd)
            if self._index is not None:
                self._index.close()
                self._index = None
            if self._relay_release is not None:
                self._relay_release()  # closing relay.lock releases the lock
                self._relay_fd = self._relay_release = None

    # ---- helpers -------------------------------------------------------------------------

    def _path(self, state: State, name: str) -> str:
        return f"{self._dir[state]}/{name}"  # not os.path.join: called several times per message

    def _pending(self, mid: str) -> str:
        return f"{self._dir[State.PENDING]}/{mid}{SUFFIX}"

    def _listdir(self, state: State) -> list[str]:
        return os.listdir(self._dir[state])

    def _names(self, state: State, quarantine: bool = False) -> list[tuple[str, str]]:
        """Sorted (id, name) of the messages in ``state``; foreign names go to malformed/ if asked."""
        out = []
        for name in self._listdir(state):
            parts = split_name(name)
            if parts is not None:
                out.append((parts[0], name))
            elif quarantine and not name.endswith(PART):
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
        plain = ID_LEN + len(SUFFIX)
        for name in self._index.names():
            if len(name) == plain and name.endswith(SUFFIX):  # the usual {id}.zlm, no regex needed
                out.append((name[:ID_LEN], name))
            else:
                odd.append(name)
        for name in odd:
            parts = split_name(name)
            if parts is not None:
                out.append((parts[0], name))
            elif quarantine and not name.endswith(PART):
                self._quarantine(State.PENDING, name, "not a spool file name")
        if odd:
            out.sort()
        return out

    def _info(
        self, state: State, name: str, mid: str, *, quarantine: bool = True, missing_ok: bool = True
    ) -> tuple[FileInfo, Message | None] | None:
        """Key and not_before of a file, from the cache when the file is unchanged (the message
        too when it had to be read); None if it vanished or does not decode."""
        path = self._path(state, name)
        try:
            cached = self._cache.get(mid)
            if cached is not None:
                st = os.stat(path)
                if cached.sig == (st.st_ino, st.st_size, st.st_mtime_ns):
                    return cached, None
            st, data = read_whole(path)
        except FileNotFoundError:
            if missing_ok:
                return None
            raise
        msg = self._decode(state, name, mid, data, quarantine)
        if msg is None:
            return None
        info = FileInfo((st.st_ino, st.st_size, st.st_mtime_ns), msg.key, msg.not_before)
        self._cache[mid] = info
        return info, msg

    def _read(self, state: State, name: str, mid: str, *, quarantine: bool = True) -> Message | None:
        try:
            _, data = read_whole(self._path(state, name))
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
        marks = self._marks(State.MALFORMED, state)
        try:
            os.rename(self._path(state, name), dst)
        except FileNotFoundError:
            return
        self._cache.pop(name[:ID_LEN], None)
        if state is State.PENDING and self._index is not None:
            self._index.discard(name)
        self._quarantined += 1
        log.error("quarantined %s/%s as malformed: %s", state.value, name, reason)
        self._sync(marks)

    def _prune(self) -> None:
        # The cache only needs ids still in pending/ or a blocking state; drop the rest now and then.
        if len(self._cache) > self._prune_at:
            live = {mid for s in BLOCKING for mid, _ in self._names(s)}
            if self._index is None:
                live.update(mid for mid, _ in self._names(State.PENDING))
            else:  # no list of the whole backlog: ask the index about each cached id
                self._index.refresh()
                live.update(mid for mid in self._cache if f"{mid}{SUFFIX}" in self._index)
            self._cache = {k: v for k, v in self._cache.items() if k in live}
            self._prune_at = 2 * len(self._cache) + 4096

    def _success_name(self, mid: str, location: str) -> str:
        loc = quote(location, safe="")
        room = NAME_MAX - ID_LEN - 1 - len(SUFFIX)
        if len(loc) > room:  # a file name holds 255 bytes; keep the start, say so in the log
            log.warning("message %s: location %r too long for the file name, recording a prefix", mid, location)
            loc = loc[:room]
            if "%" in loc[-2:]:
                loc = loc[: loc.rindex("%")]
        return f"{mid}.{loc}{SUFFIX}"

    @contextlib.contextmanager
    def _moving(self, what: str, remedy: str = RELAY_REMEDY) -> Iterator[None]:
        """A relay's or an operator's moves (under the lock). Once a directory fsync of theirs
        failed, this FileSpool refuses every later one: the failed writes cannot be made durable
        by another fsync (the kernel reports a lost write once and forgets the data), and a call
        that finds its work done in memory — the relay's succeed() of the same batch again —
        would report it durable."""
        with self._translate(what, remedy):
            if self._lost is not None:
                earlier, exc = self._lost
                refused = self._lost_writes(f"{what} refused: an earlier {earlier}", exc, remedy)
                raise StoreError(refused, retriable=False)
            try:
                yield
            except DirSyncError as exc:
                self._lost = (what, exc)
                raise

    def _lost_writes(self, what: str, exc: DirSyncError, remedy: str) -> str:
        return (
            f"spool {self.root}: {what}: the fsync of {exc.directory} failed ({exc.strerror}), so the "
            f"moves made there may not be on disk; {remedy}"
        )

    @contextlib.contextmanager
    def _translate(self, what: str, remedy: str = RELAY_REMEDY) -> Iterator[None]:
        if self._closed:
            raise StoreError(f"spool {self.root} is closed")
        try:
            yield
        except DirSyncError as exc:
            raise StoreError(self._lost_writes(what, exc, remedy), retriable=False) from exc
        except OSError as exc:
            if exc.errno in NO_SPACE:
                raise SpoolFullError(
                    f"spool {self.root} is out of disk space ({exc.strerror}) while {what}; nothing "
                    f"partial was kept — roll back the application's transaction and retry when "
                    f"space is freed"
                ) from exc
            raise StoreError(f"spool {self.root}: {what} failed: {exc}", retriable=False) from exc
