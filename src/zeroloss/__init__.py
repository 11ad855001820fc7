"""zeroloss: lossless message delivery around brokers (outbox, relay, inbox consumer)."""

from zeroloss.errors import (
    BrokerError,
    ConfigError,
    MalformedMessageError,
    MessageError,
    MissingExtraError,
    SpoolFullError,
    StoreError,
    UnknownMessageError,
    ZerolossError,
)
from zeroloss.message import ID_HEADER, Message, new_message, uuid7
from zeroloss.outbox.base import Delivered, OutboxStore, State, Stats

__version__ = "0.1.0"

__all__ = [
    "ID_HEADER",
    "BrokerError",
    "ConfigError",
    "Delivered",
    "MalformedMessageError",
    "Message",
    "MessageError",
    "MissingExtraError",
    "OutboxStore",
    "SpoolFullError",
    "State",
    "Stats",
    "StoreError",
    "UnknownMessageError",
    "ZerolossError",
    "new_message",
    "uuid7",
]
