"""Group commit for directory fsyncs: concurrent committers share one ``fsync(dirfd)``.

A caller of :meth:`GroupSync.sync` needs an fsync that *starts after* its call (its renames are
done by then). Fsyncs are numbered by generation in the order they start; a caller notes the
generation of the next fsync to start and waits until that one has finished. Whoever finds no
fsync under way leads: it optionally lingers a moment so more callers can join, then takes the
generation and runs the fsync without holding the lock; everyone who arrived before it started
is covered by it. Callers that arrive while it runs wait for the next generation.

One helper may own several descriptors (a promotion's ``pending/`` and ``tmp/``): its leader
fsyncs them one after the other, so a caller waits for one generation instead of one per
directory, and a failure of either fails the generation.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence


class GroupSync:
    """Coalesces fsyncs of one directory (or any file descriptors, in order) across threads."""

    def __init__(self, fd: int | Sequence[int], *, window_s: float = 0.0, enabled: bool = True) -> None:
        self._fds = (fd,) if isinstance(fd, int) else tuple(fd)
        self._window_s = window_s
        self._enabled = enabled
        self._cond = threading.Condition()
        self._next = 1  # generation the next fsync to start will get
        self._done = 0  # latest generation that finished (well or badly)
        self._ok = 0  # latest generation that finished well
        self._error = OSError("no fsync has failed")
        self._leading = False
        self.requests = 0
        """How many times :meth:`sync` was called (with fsync enabled)."""
        self.fsyncs = 0
        """How many generations ran (each an fsync of every descriptor); lower than ``requests``
        when callers shared them."""

    def sync(self, linger: bool = False) -> None:
        """Return once an fsync that started after this call has completed; raise its OSError
        if it failed. ``linger``: a leader waits ``window_s`` first so other committers can join
        (worth it only when others are active)."""
        if not self._enabled:
            return
        with self._cond:
            self.requests += 1
            need = self._next
            while self._done < need:
                if self._leading:
                    self._cond.wait()
                    continue
                self._lead(linger)
            if self._ok < need:  # the fsync that covered this call failed: its renames may be lost
                raise OSError(self._error.errno, f"directory fsync failed: {self._error.strerror}")

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
            self._cond.release()
            try:
                for fd in self._fds:
                    os.fsync(fd)
            except OSError as exc:
                self._error = exc
            else:
                self._ok = gen
            finally:
                self._cond.acquire()
            self.fsyncs += 1
            self._done = gen
        finally:
            self._leading = False
            self._cond.notify_all()
