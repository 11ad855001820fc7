"""The file spool: an :class:`~zeroloss.outbox.base.OutboxStore` in a local directory, one file
per message in ``tmp/ pending/ sending/ success/ failed/ doubt/ malformed/``, every state change
one atomic rename; the layout, the crash-safety argument and the batching are in docs/design.md
("The file spool"). ``layout.py`` names and writes the files, ``writer.py`` is the producer's
side, ``relay_side.py`` the relay's, ``admin.py`` the operators'.

Producer usage — the spool block outside the database transaction, so the database commits first
and the spool promotes after; a crash in between leaves ``tmp`` files that ``recover(resolver)``
settles::

    with spool.transaction() as tx:
        with db.begin():
            tx.add(topic="orders", value=b"...", key=b"order-17")
            ...  # nothing that can fail after the database commit belongs inside the spool block
"""

from __future__ import annotations

from zeroloss.outbox.base import State
from zeroloss.outbox.spool.admin import SpoolAdmin
from zeroloss.outbox.spool.relay_side import RelaySide
from zeroloss.outbox.spool.writer import SpoolTransaction, SpoolWriter

__all__ = ["FileSpool", "SpoolTransaction"]


class FileSpool(SpoolWriter, RelaySide, SpoolAdmin):
    """Crash-safe outbox in a directory; one relay per spool, any number of producer threads
    and processes. ``tmp_grace_s``: ``recover()`` leaves younger ``tmp`` files alone, as they may
    belong to a live transaction; it must exceed the longest application transaction."""

    states = frozenset(State)
