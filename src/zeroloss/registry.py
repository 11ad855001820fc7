"""From URLs to parts: the one place that knows which scheme is which store or broker.

Adding a broker or store is one new module and one line here. Imports happen only when a URL
of that scheme is opened, so a missing optional dependency names its extra and nothing else.
"""

from __future__ import annotations

import hashlib
import os
import socket
import urllib.parse
from collections.abc import Sequence
from typing import Any

from zeroloss.brokers.base import Broker
from zeroloss.brokers.subscription import Subscription
from zeroloss.errors import ConfigError, StoreSetupError
from zeroloss.outbox.base import OutboxAdmin
from zeroloss.urls import safe_url as safe_url  # re-exported: the CLI and the demo print URLs
from zeroloss.urls import scheme_of as scheme_of

SQL_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb")
SOURCE_SCHEMES = ("spool", *SQL_SCHEMES)
TARGET_SCHEMES = ("kafka", "amqp", "amqps", "nats", "redis", "rediss", "rocketmq")


def spool_path(url: str) -> str:
    """``spool:///var/lib/app/spool`` or ``spool://relative/dir`` → the directory path."""
    path = url[len("spool://") :]
    if not path:
        raise ConfigError(f"spool URL {url!r} names no directory; write spool:///ABSOLUTE/PATH")
    return path


def open_store(
    url: str, *, table: str | None = None, create: bool = False, tmp_grace_s: float | None = None
) -> OutboxAdmin:
    """The outbox store behind a source URL (``table``: the SQL outbox table's name). A spool or
    a SQLite file must exist unless ``create`` (``zeroloss init``): a typo must not become an empty
    spool or database file. ``tmp_grace_s``: a spool's, when not the default."""
    scheme = scheme_of(url)
    if scheme == "spool":
        from zeroloss.outbox.spool import FileSpool

        if tmp_grace_s is None:
            return FileSpool(spool_path(url), create=create)
        return FileSpool(spool_path(url), create=create, tmp_grace_s=tmp_grace_s)
    if scheme in SQL_SCHEMES:
        from zeroloss.outbox.sql import SqlOutbox
        from zeroloss.outbox.sql.core import table_option

        if scheme == "sqlite" and not create:
            _sqlite_file_must_exist(url, table_option(table))
        return SqlOutbox(url, table=table or "zeroloss_outbox")
    raise ConfigError(f"unknown source scheme {scheme!r} in {url!r}; use one of: {', '.join(SOURCE_SCHEMES)}")


def _sqlite_file_must_exist(url: str, table_option: str) -> None:
    # sqlite3 creates a missing file on connect: status or show on a mistyped path would leave an
    # empty database behind and then report a missing table, not the path.
    import sqlalchemy as sa

    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        return  # SqlOutbox names what is wrong with the URL
    path = parsed.database
    if path and path.startswith("file:") and parsed.query.get("uri") in ("true", "1"):
        # a URI filename (?uri=true): sqlite3 creates its file too unless mode=ro/rw/memory says not
        if parsed.query.get("mode") == "memory":
            return
        path = urllib.parse.unquote(urllib.parse.urlsplit(path).path)
    if not path or path == ":memory:":
        return
    if not os.path.exists(path):
        raise StoreSetupError(
            f"no SQLite database at {os.path.abspath(path)}: check --source; if the outbox belongs "
            f"there, create it with: zeroloss init --source {url}{table_option}"
        )


def default_relay_id(source: str = "", table: str | None = None) -> str:
    """Stable across restarts: the host and a digest of the outbox it serves. A relay restarted
    with the same id fences its dead predecessor (Kafka aborts that one's open transaction,
    which would otherwise hold read_committed consumers back). Several relays on one host and
    one outbox need distinct ``--relay-id`` values."""
    digest = hashlib.sha256(f"{source}|{table or ''}".encode()).hexdigest()[:10]
    return f"{socket.gethostname()}-{digest}"


def open_broker(url: str, *, relay_id: str | None = None, timeout_s: float = 30.0, **options: Any) -> Broker:
    # relay_id=None: an id for this process only, for callers that are not a long-lived relay.
    """The broker adapter behind a target URL; ``relay_id`` makes the Kafka transactional.id."""
    scheme = scheme_of(url)
    if scheme == "kafka":
        from zeroloss.brokers.kafka import KafkaBroker

        rid = relay_id or f"{socket.gethostname()}-{os.getpid()}"
        return KafkaBroker(url, transactional_id=f"zeroloss-relay-{rid}", timeout_s=timeout_s, **options)
    if scheme in ("amqp", "amqps"):
        from zeroloss.brokers.rabbitmq import RabbitBroker

        return RabbitBroker(url, timeout_s=timeout_s, **options)
    if scheme == "nats":
        from zeroloss.brokers.nats import NatsBroker

        return NatsBroker(url, timeout_s=timeout_s, **options)
    if scheme in ("redis", "rediss"):
        from zeroloss.brokers.redis import RedisStreamBroker

        return RedisStreamBroker(url, timeout_s=timeout_s, **options)
    if scheme == "rocketmq":
        from zeroloss.brokers.rocketmq import RocketMQBroker

        return RocketMQBroker(url, timeout_s=timeout_s, **options)
    raise ConfigError(f"unknown target scheme {scheme!r} in {url!r}; use one of: {', '.join(TARGET_SCHEMES)}")


SUBSCRIPTION_SCHEMES = ("amqp", "amqps", "nats", "redis", "rediss", "rocketmq")


def open_subscription(url: str, group: str, topics: Sequence[str], **options: Any) -> Subscription:
    """The subscription behind a source URL (not Kafka: the consumer has its own loop for it)."""
    scheme = scheme_of(url)
    if scheme in ("amqp", "amqps"):
        from zeroloss.brokers.rabbitmq_subscription import RabbitSubscription

        return RabbitSubscription(url, group, topics, **options)
    if scheme == "nats":
        from zeroloss.brokers.nats_subscription import NatsSubscription

        return NatsSubscription(url, group, topics, **options)
    if scheme in ("redis", "rediss"):
        from zeroloss.brokers.redis_subscription import RedisSubscription

        return RedisSubscription(url, group, topics, **options)
    if scheme == "rocketmq":
        from zeroloss.brokers.rocketmq_subscription import RocketMQSubscription

        return RocketMQSubscription(url, group, topics, **options)
    raise ConfigError(
        f"no subscription for scheme {scheme!r} in {url!r}; use kafka:// or one of {', '.join(SUBSCRIPTION_SCHEMES)}"
    )
