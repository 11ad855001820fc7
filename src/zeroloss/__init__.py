"""zeroloss: lossless message delivery around brokers (outbox, relay, inbox consumer).

Everything an application uses is importable from here: ``from zeroloss import SqlOutbox, Relay,
Consumer, SqlInbox``. The classes load on first use (PEP 562), so ``import zeroloss`` stays cheap
and loads no broker or database client; each client loads when its adapter is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from zeroloss.errors import (
    BrokerError,
    ConfigError,
    MalformedMessageError,
    MessageError,
    MissingExtraError,
    SpoolFullError,
    StoreError,
    StoreSetupError,
    UnknownMessageError,
    ZerolossError,
)
from zeroloss.message import ID_HEADER, Message, new_message, uuid7
from zeroloss.outbox.base import Delivered, OutboxAdmin, OutboxStore, State, Stats

if TYPE_CHECKING:
    from zeroloss.brokers.base import Broker, Outcome, Status
    from zeroloss.brokers.kafka import KafkaBroker
    from zeroloss.brokers.nats import NatsBroker
    from zeroloss.brokers.rabbitmq import RabbitBroker
    from zeroloss.brokers.redis import RedisStreamBroker
    from zeroloss.consumer import Consumer, ConsumerSettings
    from zeroloss.inbox import Inbox, RedisInbox, SqlInbox
    from zeroloss.logs import logging_setup
    from zeroloss.outbox.spool import FileSpool
    from zeroloss.outbox.sql import SqlOutbox
    from zeroloss.received import PoisonMessage, Received
    from zeroloss.registry import open_broker, open_store
    from zeroloss.relay import Relay, RelaySettings

__version__ = "0.1.0"

# public name -> the module that defines it, imported when the name is first used
_LAZY = {
    "SqlOutbox": "zeroloss.outbox.sql",
    "FileSpool": "zeroloss.outbox.spool",
    "Relay": "zeroloss.relay",
    "RelaySettings": "zeroloss.relay",
    "Broker": "zeroloss.brokers.base",
    "Outcome": "zeroloss.brokers.base",
    "Status": "zeroloss.brokers.base",
    "KafkaBroker": "zeroloss.brokers.kafka",
    "RabbitBroker": "zeroloss.brokers.rabbitmq",
    "NatsBroker": "zeroloss.brokers.nats",
    "RedisStreamBroker": "zeroloss.brokers.redis",
    "Consumer": "zeroloss.consumer",
    "ConsumerSettings": "zeroloss.consumer",
    "Received": "zeroloss.received",
    "PoisonMessage": "zeroloss.received",
    "Inbox": "zeroloss.inbox",
    "SqlInbox": "zeroloss.inbox",
    "RedisInbox": "zeroloss.inbox",
    "open_store": "zeroloss.registry",
    "open_broker": "zeroloss.registry",
    "logging_setup": "zeroloss.logs",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'zeroloss' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # next time a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "ID_HEADER",
    "Broker",
    "BrokerError",
    "ConfigError",
    "Consumer",
    "ConsumerSettings",
    "Delivered",
    "FileSpool",
    "Inbox",
    "KafkaBroker",
    "MalformedMessageError",
    "Message",
    "MessageError",
    "MissingExtraError",
    "NatsBroker",
    "OutboxAdmin",
    "OutboxStore",
    "Outcome",
    "PoisonMessage",
    "RabbitBroker",
    "Received",
    "RedisInbox",
    "RedisStreamBroker",
    "Relay",
    "RelaySettings",
    "SpoolFullError",
    "SqlInbox",
    "SqlOutbox",
    "State",
    "Stats",
    "Status",
    "StoreError",
    "StoreSetupError",
    "UnknownMessageError",
    "ZerolossError",
    "logging_setup",
    "new_message",
    "open_broker",
    "open_store",
    "uuid7",
]
