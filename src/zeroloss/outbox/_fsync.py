"""Group commit for directory fsyncs: concurrent committers share one ``fsync(dirfd)``.

A caller of :meth:`GroupSync.sync` needs an fsync that *starts after* its call (its renames are
done by then). Fsyncs are numbered by generation in the order they start; a caller notes the
generation of the next fsync to start and waits until that one has finished. Whoever finds no
fsync under way leads: it optionally lingers a moment so more callers can join, then takes the
generation and runs the fsync without holding the lock; everyone who arrived before it started
is covered by it. Callers that arrive while it runs wait for the next generation.

A failed fsync is reported to every caller whose changes it may have been writing out, not only
to those it covered: Linux reports a writeback error once per open file, so the next fsync of the
same descriptor succeeds although the changes may be lost. A caller that took :meth:`mark` before
its changes hears of any generation that failed after the mark; one that did not, of a generation
that was running when it called — not of one that ran between its changes and its call, so every
caller in the spool takes a mark.

One helper may own several descriptors (a promotion's ``pending/`` and ``tmp/``): its leader
fsyncs them one after the other, so a caller waits for one generation instead of one per
directory, and a failure of either fails the generation.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence

_KEEP_FAILED = 1000


class GroupSync:
    """Coalesces fsyncs of one directory (or any file descriptors, in order) across threads."""

    def __init__(self, fd: int | Sequence[int], *, window_s: float = 0.0, enabled: bool = True) -> None:
        self._fds = (fd,) if isinstance(fd, int) else tuple(fd)
        self._window_s = window_s
        self._enabled = enabled
        self._cond = threading.Condition()
        self._next = 1  # generation the next fsync to start will get
        self._done = 0  # latest generation that finished (well or badly)
        self._failed: dict[int, OSError] = {}  # generation → its error; the latest few
        self._leading = False
        self.requests = 0
        """How many times :meth:`sync` was called (with fsync enabled)."""
        self.fsyncs = 0
        """How many generations ran (each an fsync of every descriptor); lower than ``requests``
        when callers shared them."""
        self.descriptors = len(self._fds)
        """How many descriptors each generation fsyncs (a promotion's: two)."""

    def mark(self) -> int:
        """Take before making the changes a later :meth:`sync` must cover (``since``)."""
        return self._done  # no lock: generations finish in order, and a stale value only widens the check

    def sync(self, linger: bool = False, since: int | None = None) -> None:
        """Return once an fsync that started after this call has completed; raise an OSError if
        it failed, or if one that finished after ``since`` (a :meth:`mark`; without it, one that
        was running at this call) failed: it may have lost this caller's changes. ``linger``: a
        leader waits ``window_s`` first so other committers can join (worth it only when others
        are active)."""
        if not self._enabled:
            return
        with self._cond:
            self.requests += 1
            need = self._next
            first = since + 1 if since is not None else need - 1 if self._leading else need
            while self._done < need:
                if self._leading:
                    self._cond.wait()
                    continue
                self._lead(linger)
            lost = [gen for gen in self._failed if first <= gen <= need]  # usually none failed
            if lost:  # a failed fsync may have been writing out this caller's changes
                error = self._failed[max(lost)]
                raise OSError(error.errno, f"directory fsync failed: {error.strerror}")

    def _lead(self, linger: bool) -> None:
        """Run one fsync for everyone waiting; called and returns with the lock held."""
        self._leading = True
        try:
            if linger and self._window_s > 0:
                deadline = time.monotonic() + self._window_s
                while (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)  # releases the lock: arrivals join this generation
            gen = self._next
            self._next += 1
            error: OSError | None = None
            self._cond.release()
            try:
                for fd in self._fds:
                    os.fsync(fd)
            except OSError as exc:
                error = exc
            finally:
                self._cond.acquire()
            if error is not None:  # recorded under the lock: callers read _failed under it
                self._failed[gen] = error
                if len(self._failed) > _KEEP_FAILED:  # a disk failing that often: forget the oldest
                    del self._failed[min(self._failed)]
            self.fsyncs += 1
            self._done = gen
        finally:
            self._leading = False
            self._cond.notify_all()
