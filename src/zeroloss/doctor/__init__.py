"""``zeroloss doctor``: the settings that decide whether a message can be lost, checked and
explained. ``checks`` runs them (Kafka, Redis, the outbox's database); ``nats``, ``rabbitmq`` and
``rocketmq`` hold those brokers' checks; ``base`` the shape of a result."""

from zeroloss.doctor.base import Check, Verdict, overall
from zeroloss.doctor.checks import run_doctor

__all__ = ["Check", "Verdict", "overall", "run_doctor"]
