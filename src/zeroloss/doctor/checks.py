"""``zeroloss doctor``: check the settings that decide whether a message can be lost, and say how to
fix each one. Every check ends in a verdict — ``ok``, ``warn``, ``fail`` or ``skip`` — with
the fix. :func:`run_doctor` picks the checks for the URLs given: Kafka (:mod:`.kafka`), Redis
(:mod:`.redis`), NATS, RabbitMQ, RocketMQ (a module each) and the outbox (:mod:`.outbox`).
What each check means: docs/design.md, "doctor/checks.py"."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from zeroloss.doctor.base import Check
from zeroloss.doctor.kafka import kafka_checks
from zeroloss.doctor.outbox import source_checks
from zeroloss.doctor.redis import redis_checks
from zeroloss.errors import ConfigError

if TYPE_CHECKING:
    from zeroloss.relay import RelaySettings

log = logging.getLogger(__name__)


def run_doctor(
    target: str | None = None,
    *,
    topic: str | None = None,
    source: str | None = None,
    table: str = "zeroloss_outbox",
    min_replication: int = 3,
    timeout_s: float = 10.0,
    nats_monitor: str | None = None,
    relay: RelaySettings | None = None,
    relay_timeout_s: float = 30.0,
    group: str | None = None,
) -> list[Check]:
    """All checks that apply to the given URLs, in order (``relay*``: the relay's settings;
    ``group``: a RocketMQ consumer group)."""
    from zeroloss.registry import scheme_of

    checks: list[Check] = []
    if source is not None:
        checks += source_checks(source, table)
    if target is not None:
        scheme = scheme_of(target)
        if scheme == "kafka":
            checks += kafka_checks(target, topic=topic, min_replication=min_replication, timeout_s=timeout_s)
        elif scheme in ("redis", "rediss"):
            checks += redis_checks(target, timeout_s=timeout_s)
        elif scheme == "nats":  # NATS and RabbitMQ: a module each, to keep this one readable
            from zeroloss.doctor.nats import nats_checks

            checks += nats_checks(
                target,
                topic=topic,
                min_replication=min_replication,
                monitor=nats_monitor,
                relay=relay,
                relay_timeout_s=relay_timeout_s,
                timeout_s=timeout_s,
            )
        elif scheme in ("amqp", "amqps"):
            from zeroloss.doctor.rabbitmq import rabbitmq_checks

            checks += rabbitmq_checks(target, topic=topic, timeout_s=timeout_s)
        elif scheme == "rocketmq":
            from zeroloss.doctor.rocketmq import rocketmq_checks

            checks += rocketmq_checks(
                target,
                topic=topic,
                group=group,
                min_replication=min_replication,
                relay_timeout_s=relay_timeout_s,
                timeout_s=timeout_s,
            )
        else:
            raise ConfigError(
                f"doctor knows kafka://, nats://, amqp://, redis:// and rocketmq:// targets, not {scheme!r}"
            )
    if not checks:
        raise ConfigError("nothing to check: give --target URL and/or --source URL")
    return checks
