"""The relay's sorted view of a spool's ``pending/``, so that a claim costs its batch, not the backlog.

Listing and sorting ``pending/`` at every claim made a drain quadratic (100k pending: 25-60 ms a
listing, ten more in Python, a hundred claims). The index lists the directory once and then
learns of new names from inotify (Linux); where inotify is not available, or lost events (its
queue overflowed, the directory was replaced), it lists the directory again.

Why a name is never missed in a way that breaks per-key order: the watch is set up before the
listing; queued events are discarded just before a listing starts (the listing covers them) and
the rest are read at every :meth:`PendingIndex.refresh`. The kernel queues the events of one
directory in the order the renames happened, so once the event of a producer's second message
has been read, the event of its first has been read too, and a claim never sees a later message
of a key without an earlier one that was already in ``pending/``.

Removals are not watched: only the relay (which holds ``relay.lock``) takes names out of
``pending/``, and it tells the index (:meth:`PendingIndex.discard`).
"""

from __future__ import annotations

import bisect
import ctypes
import logging
import os
import struct
import sys
import weakref
from collections.abc import Iterator

log = logging.getLogger(__name__)

_IN_CREATE = 0x100
_IN_MOVED_TO = 0x80
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_IN_UNMOUNT = 0x2000
_IN_Q_OVERFLOW = 0x4000
_IN_IGNORED = 0x8000
_IN_ONLYDIR = 0x01000000
_LOST = _IN_Q_OVERFLOW | _IN_IGNORED | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_UNMOUNT
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name


class _Watch:
    """An inotify watch on one directory for names that appear in it (created or renamed in)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.broken = False  # the directory went away or was replaced: events will not come
        # A spool dropped without close() must not keep its instance: they are few per user
        # (fs.inotify.max_user_instances, 128 by default) and shared by every process of the user.
        self._closer = weakref.finalize(self, os.close, fd)

    @classmethod
    def open(cls, path: str) -> _Watch | None:
        """A watch on ``path``, or None where inotify is not available (not Linux, no instances
        left: fs.inotify.max_user_instances); the index then lists the directory each time."""
        if not sys.platform.startswith("linux"):
            return None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            init, add = libc.inotify_init1, libc.inotify_add_watch
        except (OSError, AttributeError):
            return None
        fd = init(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            log.info(
                "no inotify instance for %s (%s): the relay lists pending/ at every claim",
                path,
                os.strerror(ctypes.get_errno()),
            )
            return None
        if add(fd, os.fsencode(path), _IN_CREATE | _IN_MOVED_TO | _IN_ONLYDIR) < 0:
            log.info(
                "cannot watch %s (%s): the relay lists pending/ at every claim", path, os.strerror(ctypes.get_errno())
            )
            os.close(fd)
            return None
        return cls(fd)

    def read(self) -> list[str] | None:
        """The names that appeared since the last read, in order; None if events were lost."""
        added: list[str] = []
        lost = False
        while True:
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            off = 0
            while off < len(buf):
                _, mask, _, size = _EVENT.unpack_from(buf, off)
                off += _EVENT.size
                if mask & _LOST:
                    lost = True
                    self.broken = self.broken or not mask & _IN_Q_OVERFLOW
                elif size:
                    added.append(os.fsdecode(buf[off : off + size].rstrip(b"\0")))
                off += size
        return None if lost else added

    def close(self) -> None:
        self._closer()  # closes once, however often called


class PendingIndex:
    """The names in one directory, oldest first (names start with a UUIDv7); only the process
    holding the spool's relay lock keeps one."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._live: set[str] = set()
        self._order: list[str] = []  # sorted; may still hold discarded names, and a name twice
        self._watch = _Watch.open(path)
        self._listed = False
        self.listings = 0
        """How many times the whole directory was listed (once, with inotify and no lost events)."""

    @property
    def watched(self) -> bool:
        return self._watch is not None

    def refresh(self) -> None:
        """Take in the names that appeared since the last refresh."""
        if self._watch is not None and self._listed:
            added = self._watch.read()
            if added is not None:
                for name in added:
                    self._add(name)
                return
            log.info("inotify lost events for %s: listing it again", self._path)
            if self._watch.broken:
                self._watch.close()
                self._watch = None
        if self._watch is not None:
            self._watch.read()  # what happened so far, the listing below sees
        names = os.listdir(self._path)
        self.listings += 1
        self._listed = True
        live = set(names)
        if live != self._live:
            new = sorted(live - self._live)
            self._live = live
            if not new:
                pass
            elif not self._order or new[0] > self._order[-1]:
                self._order.extend(new)  # the usual case: newer ids than any seen
            elif len(new) <= 64:
                for name in new:
                    self._add_ordered(name)
            else:
                self._order = sorted(live)

    def _add(self, name: str) -> None:
        if name not in self._live:
            self._live.add(name)
            self._add_ordered(name)

    def _add_ordered(self, name: str) -> None:
        if self._order and name <= self._order[-1]:  # an older id came back (retry, requeue, recover)
            bisect.insort(self._order, name)  # a memmove, not a sort of the backlog
        else:
            self._order.append(name)

    def discard(self, name: str) -> None:
        """``name`` left the directory (this process moved or removed it)."""
        self._live.discard(name)

    def __contains__(self, name: str) -> bool:
        return name in self._live

    def __len__(self) -> int:
        return len(self._live)

    def names(self) -> Iterator[str]:
        """The names, oldest first; discarding names while iterating is allowed."""
        if len(self._order) > 2 * len(self._live) + 4096:  # mostly names taken since: drop them
            self._order = sorted(self._live)
        else:
            head = 0  # what earlier claims took: drop it once instead of skipping it every time
            while head < len(self._order) and self._order[head] not in self._live:
                head += 1
            del self._order[:head]
        order = self._order
        last = ""
        for i in range(len(order)):  # not `for name in order`: _add may append meanwhile
            name = order[i]
            if name in self._live and name != last:  # a name that left and came back is in twice
                last = name
                yield name

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None
