"""The relay: recover → claim → give up on the exhausted → publish → mark, in a loop, from an
outbox store to a broker; the whole design is in docs/design.md ("The relay"). ``loop.py`` is
the loop (:class:`Relay`), ``settings.py`` its settings and counters, ``reporting.py`` what it
says (start line, progress, outages, summary) and its readiness."""

from __future__ import annotations

from zeroloss.relay.loop import Relay
from zeroloss.relay.reporting import RelayProgress
from zeroloss.relay.settings import KAFKA_BATCH_SIZE, NOT_STARTED, RelayCounters, RelaySettings

__all__ = ["KAFKA_BATCH_SIZE", "NOT_STARTED", "Relay", "RelayCounters", "RelayProgress", "RelaySettings"]
