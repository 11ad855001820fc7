"""Broker doubles for the relay's decision logic (the real adapters have their own tests against
real brokers): scripted outcomes, and a publish held until the test releases it."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from zeroloss.brokers.base import Outcome, Status
from zeroloss.errors import BrokerError
from zeroloss.message import Message


@dataclass
class ScriptedBroker:
    """A broker double for the relay's decision logic only (the real adapter has its own tests
    against a real broker). ``script`` is consumed one step per publish call: a BrokerError is
    raised, or a dict maps a message value to its reaction ("retry", "reject"); the rest of the
    batch, and every call after the script, is delivered."""

    script: list[object]
    calls: list[list[bytes]] = field(default_factory=list)
    delivered: list[Message] = field(default_factory=list)  # across calls, in the order delivered

    def publish(self, messages: Sequence[Message]) -> list[Outcome]:
        self.calls.append([m.value for m in messages])
        step = self.script.pop(0) if self.script else {}
        if isinstance(step, BrokerError):
            raise step
        assert isinstance(step, dict)
        out, failed_keys = [], set()
        for m in messages:
            status = {"retry": Status.RETRY, "reject": Status.REJECTED}.get(step.get(m.value, ""), Status.DELIVERED)
            if m.key in failed_keys:
                status = Status.HELD  # the Broker contract: nothing passes a failed message of its key
            elif status is not Status.DELIVERED:
                failed_keys.add(m.key)
            location = "x/0/0" if status is Status.DELIVERED else None
            if location:
                self.delivered.append(m)
            out.append(Outcome(m, status, location=location, error=None if location else "e"))
        return out

    def close(self) -> None:
        pass


@dataclass
class GatedBroker(ScriptedBroker):
    """A ScriptedBroker whose publish calls wait for ``release`` (at most ``hold_s``); ``entered``
    is set when one arrives. ``first_only``: only the first call waits."""

    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    first_only: bool = False
    hold_s: float = 10.0

    def publish(self, messages: Sequence[Message]) -> list[Outcome]:
        if not (self.first_only and self.entered.is_set()):
            self.entered.set()
            self.release.wait(self.hold_s)
        return super().publish(messages)
