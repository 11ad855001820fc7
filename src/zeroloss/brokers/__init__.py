"""How messages leave for, and arrive from, a broker: one file per technology behind `Broker`."""

from zeroloss.brokers.base import Broker, Outcome, Status

__all__ = ["Broker", "Outcome", "Status"]
