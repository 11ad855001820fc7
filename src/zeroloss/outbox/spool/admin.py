"""The operators' side of the spool (the :class:`~zeroloss.outbox.base.OutboxAdmin` protocol):
get, list, location, requeue, purge, list_success, resend, stats; safe beside a running relay."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from urllib.parse import unquote

from zeroloss.errors import MalformedMessageError, UnknownMessageError
from zeroloss.message import Message, decode, id_time
from zeroloss.outbox.base import Delivered, State, Stats, check_purgeable, id_floor
from zeroloss.outbox.spool.layout import ADMIN_REMEDY, ID_LEN, SUFFIX, SpoolCore, lease_ms, split_name

log = logging.getLogger("zeroloss.outbox.spool")

_RESENT = "resent: the broker no longer had it (audit --repair)"


class SpoolAdmin(SpoolCore):
    """What operators' commands call; each takes the spool's lock, so it is safe beside the relay."""

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

    def location(self, message_id: str) -> str:
        """Where the broker put a ``success`` message (e.g. ``orders/2/1543``)."""
        for mid, extra in (p for p in map(split_name, self._listdir(State.SUCCESS)) if p):
            if mid == message_id:
                return unquote(extra)
        raise UnknownMessageError(f"message {message_id} is not in success/ of spool {self.root}")

    def malformed_paths(self) -> list[str]:
        """The quarantined files, for an operator to inspect and delete."""
        return [self._path(State.MALFORMED, n) for n in sorted(self._listdir(State.MALFORMED))]

    def requeue(self, message_ids: Sequence[str]) -> int:
        with self._lock, self._moving("requeue", ADMIN_REMEDY):
            marks = self._marks(State.PENDING, State.FAILED, State.DOUBT)
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
            self._sync(marks)
            return moved

    def purge(self, state: State, message_ids: Sequence[str] | None = None) -> int:
        check_purgeable(state)
        with self._lock, self._moving(f"purge {state.value}/", ADMIN_REMEDY):
            marks = self._marks(state)
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
                    self._cache.pop(name[:ID_LEN], None)
                    purged += 1
                    log.debug("purged %s/%s", state.value, name)
            if purged:
                self._sync(marks)
            return purged

    def transaction_ids(self, state: State = State.DOUBT) -> dict[str, str]:
        """Message id → the application transaction id kept in the ``doubt/`` (or ``tmp/``) file
        names, so an operator can look the transaction up in the app's database."""
        if state not in (State.DOUBT, State.TMP):
            return {}
        with self._translate("transaction_ids"):
            return {mid: name[ID_LEN + 1 : -len(SUFFIX)] for mid, name in self._names(state)}

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
                    out.append(Delivered(msg, unquote(name[ID_LEN + 1 : -len(SUFFIX)])))
        return out

    def resend(self, message_ids: Sequence[str]) -> int:
        with self._lock, self._moving("resend", ADMIN_REMEDY):
            marks = self._marks(State.PENDING, State.SUCCESS)
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
                self._sync(marks)
            return moved

    def stats(self, *, delivered: bool = True) -> Stats:
        with self._lock, self._translate("stats"):
            names = {
                s: self._pending_names() if s is State.PENDING else self._names(s)
                for s in State
                if delivered or s is not State.SUCCESS
            }
            names.setdefault(State.SUCCESS, [])
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
            groups = [*self.dir_syncs.values(), self.promote_sync]
            return Stats(
                counts=counts,
                oldest_pending_age_s=oldest.get(State.PENDING),
                oldest_age_s=oldest,
                expired_leases=sum(1 for _, n in names[State.SENDING] if lease_ms(n) <= now * 1000),
                parked=parked,
                oldest_pending_error=(first.last_error or None) if first else None,
                disk_free_bytes=vfs.f_bavail * vfs.f_frsize,
                disk_total_bytes=(vfs.f_blocks - vfs.f_bfree + vfs.f_bavail) * vfs.f_frsize,  # used + available, as df
                extra={
                    # Every directory fsync, the promotions' too (one group, two directories).
                    "dir_fsyncs": sum(g.fsyncs * g.descriptors for g in groups),
                    "dir_fsync_requests": sum(g.requests * g.descriptors for g in groups),
                    "pending_listings": self._index.listings if self._index is not None else None,
                },
            )

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
