"""Where messages wait between the app's commit and the broker's acknowledgement."""

from zeroloss.outbox.base import Delivered, OutboxAdmin, OutboxStore, RecoveryReport, Resolver, State, Stats

__all__ = ["Delivered", "OutboxAdmin", "OutboxStore", "RecoveryReport", "Resolver", "State", "Stats"]
