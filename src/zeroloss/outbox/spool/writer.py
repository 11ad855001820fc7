"""The producer side of the spool: a transaction's messages written and fsynced into ``tmp/``
inside the application's transaction, promoted to ``pending/`` after it commits, removed if it
rolls back."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType

from zeroloss import metrics
from zeroloss.errors import StoreError
from zeroloss.message import encode, new_message, uuid7
from zeroloss.outbox.base import State
from zeroloss.outbox.spool.layout import ID_LEN, SUFFIX, TXID_RE, DirSyncError, SpoolCore

log = logging.getLogger("zeroloss.outbox.spool")


class SpoolTransaction:
    """The spool's side of one application transaction; see :meth:`FileSpool.transaction`."""

    def __init__(self, spool: SpoolWriter, txid: str) -> None:
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
        name = f"{msg.id}.{self.id}{SUFFIX}"
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


class SpoolWriter(SpoolCore):
    """What producers call: :meth:`transaction`; any number of threads and processes at once."""

    def transaction(self, txid: str | None = None) -> SpoolTransaction:
        """A context manager for one application transaction; ``txid`` (default: a new UUIDv7)
        is what ``recover()`` passes to the resolver, so the app should store it in its own
        transaction."""
        txid = uuid7() if txid is None else txid
        if not TXID_RE.fullmatch(txid):
            raise StoreError(f"transaction id {txid!r} must be 1-128 characters from A-Z a-z 0-9 _ -")
        if self._closed:
            raise StoreError(f"spool {self.root} is closed")
        return SpoolTransaction(self, txid)

    def _active_delta(self, delta: int) -> None:
        with self._active_lock:
            self._active += delta

    def _write_tmp(self, name: str, data: bytes) -> None:
        with self._translate(f"writing tmp/{name}"):
            tmp_sync = self.dir_syncs[State.TMP]
            mark = tmp_sync.mark()
            self._write_file(os.path.join(self._dir[State.TMP], name), data)
            tmp_sync.sync(linger=self._active > 1, since=mark)  # the name is durable before the app commits

    def _promote(self, txid: str, names: Sequence[str]) -> None:
        missing: list[str] = []
        try:
            mark = self.promote_sync.mark()
            for name in names:
                mid = name[:ID_LEN]
                try:
                    os.rename(self._path(State.TMP, name), self._pending(mid))
                except FileNotFoundError:
                    missing.append(mid)
            self.promote_sync.sync(linger=self._active > 1, since=mark)
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
        back = []
        marks = self._marks(State.PENDING, State.DOUBT)
        for mid in mids:
            try:
                os.rename(self._path(State.DOUBT, f"{mid}.{txid}{SUFFIX}"), self._pending(mid))
                back.append(mid)
                log.warning("message %s: moved back from doubt/ after its transaction %s committed", mid, txid)
            except FileNotFoundError:
                if self._locate(mid) is None:
                    lost.append(mid)
        discarded = (
            f"transaction {txid} committed, but recover() had already discarded its messages "
            f"{', '.join(lost)} because its resolver said it had not committed: tmp_grace_s="
            f"{self.tmp_grace_s} is shorter than this transaction took"
        )
        if lost:
            log.error("transaction %s committed but recover() discarded messages %s", txid, lost)
        try:
            self._sync(marks)
        except DirSyncError as exc:
            # Said with the discarded ones, if any: a failed fsync must not hide messages gone for good.
            raise StoreError(
                (f"{discarded}; also, " if lost else "")
                + f"spool {self.root}: transaction {txid} committed and its messages {', '.join(back) or 'none'} "
                f"were moved back from doubt/ (a recover() had parked them), but the fsync of {exc.directory} "
                f"failed ({exc.strerror}): a crash may put them back in doubt/; check the disk, then requeue "
                f"what is in doubt/ again (zeroloss doubt retry ID)",
                retriable=False,
            ) from exc
        if lost:
            raise StoreError(discarded, retriable=False)

    def _abort(self, txid: str, names: Sequence[str]) -> None:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(State.TMP, name))
        log.debug("transaction %s rolled back: %d tmp file(s) removed", txid, len(names))
