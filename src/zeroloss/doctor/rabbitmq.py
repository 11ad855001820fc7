"""``zeroloss doctor`` for RabbitMQ (``amqp://``): publisher confirms, and per topic a quorum queue,
at-least-once dead-lettering, a delivery limit and the ``.dlq`` queue, read over AMQP alone.
The details: docs/design.md, "doctor/rabbitmq.py"."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from zeroloss.doctor.base import Check, Verdict

POLICY_NOTE = (
    "(read from the queue's arguments; a policy may set it instead, which AMQP cannot show: "
    "rabbitmqctl list_queues name effective_policy_definition)"
)
_INEQUIVALENT = re.compile(
    r"inequivalent arg '([^']+)' for queue .*?: received .*? but current is "
    r"(?:(none)|the value '(.*)' of type '(\w+)'|'(.*)')\s*$"
)
_NUMBER_TYPES = {
    "byte",
    "short",
    "long",
    "signedint",
    "longlong",
    "unsignedbyte",
    "unsignedshort",
    "unsignedint",
    "timestamp",
}


def rabbitmq_checks(url: str, *, topic: str | None = None, timeout_s: float = 10.0) -> list[Check]:
    return asyncio.run(_checks(url, topic, timeout_s))


async def _checks(url: str, topic: str | None, timeout_s: float) -> list[Check]:
    from zeroloss.brokers.rabbitmq import DLQ_SUFFIX, aio_pika_module, check_url

    ap = aio_pika_module()
    import aiormq

    check_url(url)
    where = url.rpartition("@")[2]
    try:
        conn = await ap.connect(url, timeout=timeout_s, client_properties={"connection_name": "zeroloss-doctor"})
    except aiormq.exceptions.ProbableAuthenticationError as exc:
        return [
            Check(
                "rabbitmq reachable",
                Verdict.FAIL,
                f"{where}: the login in the URL was refused: {exc}",
                "fix the user and password in --target",
            )
        ]
    except (aiormq.exceptions.AMQPError, ConnectionError, OSError, TimeoutError) as exc:
        return [
            Check(
                "rabbitmq reachable",
                Verdict.FAIL,
                f"{where}: {type(exc).__name__}: {exc}",
                "start RabbitMQ or fix --target",
            )
        ]
    try:
        props: dict[str, Any] = dict(conn.transport.connection.server_properties or {})
        version = _text(props.get("version", "?"))
        checks = [Check("rabbitmq reachable", Verdict.OK, f"{where}: RabbitMQ {version}")]
        confirms = bool((props.get("capabilities") or {}).get("publisher_confirms"))
        checks.append(
            Check(
                "rabbitmq publisher confirms",
                Verdict.OK if confirms else Verdict.FAIL,
                "the relay publishes on a confirm channel (mandatory, persistent) and marks a message success only "
                "on the broker's ack; a quorum queue acks once a majority of its replicas stored it"
                if confirms
                else "the server does not offer publisher confirms: the relay cannot know a message was stored",
                "" if confirms else "use a RabbitMQ server (3.8 or later) that offers publisher confirms",
            )
        )
        if topic is None:
            return [*checks, Check("queue", Verdict.SKIP, "no --topic given", "pass --topic T to check its queues")]
        dead = topic if topic.endswith(DLQ_SUFFIX) else topic + DLQ_SUFFIX
        for name in dict.fromkeys((topic, dead)):
            try:
                read = await _queue_arguments(conn, name, aiormq)
            except (aiormq.exceptions.AMQPError, ConnectionError, OSError, TimeoutError) as exc:
                # e.g. RESOURCE_LOCKED: an exclusive queue of another connection; access refused
                checks.append(
                    Check(
                        f"queue {name}",
                        Verdict.WARN,
                        f"cannot read it: {type(exc).__name__}: {exc}",
                        "give this user configure permission on the queue, or check it by hand",
                    )
                )
                continue
            if read is None:
                checks.append(_missing(name))
            elif name == dead:
                checks.append(_type_check(name, *read))
            else:
                flags, args = read
                checks += [
                    _type_check(name, flags, args),
                    _dead_letter_check(name, dead, args),
                    _delivery_limit_check(name, args, version),
                ]
        return checks
    finally:
        await conn.close()


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, (bytes, bytearray)) else str(v)


def _missing(name: str) -> Check:
    topic = name.removesuffix(".dlq")
    return Check(
        f"queue {name}",
        Verdict.FAIL,
        "does not exist: messages published to its exchange are returned "
        "(the relay retries) or dropped (broker dead-lettering)",
        f"zeroloss init --target URL --topic {topic}",
    )


async def _queue_arguments(conn: Any, name: str, aiormq: Any) -> tuple[dict[str, bool], dict[str, Any]] | None:
    """(durable/auto_delete flags, arguments) of queue ``name``, None when it does not exist."""
    flags = {"durable": True, "auto_delete": False}
    args: dict[str, Any] = {}
    for _ in range(32):  # one round per argument that differs; a queue has far fewer
        try:
            async with conn.channel(publisher_confirms=False) as ch:  # a refusal closes this channel only
                await ch.declare_queue(name, passive=True)
                await ch.declare_queue(name, arguments=args, **flags)
            return flags, args
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            m = _INEQUIVALENT.search(str(exc))
            if m is None:
                raise
            key, none, value, kind, bare = m.groups()
            if key in flags:
                flags[key] = (bare or value or "").lower() == "true"
                continue
            if none:
                new: Any = None
            elif kind in _NUMBER_TYPES or (kind is None and (bare or "").lstrip("-").isdigit()):
                new = int(value if value is not None else bare)
            elif kind == "bool":
                new = value == "true"
            else:
                new = value if value is not None else bare
            if args.get(key) == new:  # same value, other AMQP type: the value is all we need
                return flags, args
            if new is None:
                args.pop(key, None)
            else:
                args[key] = new
    return flags, args


def _type_check(name: str, flags: dict[str, bool], args: dict[str, Any]) -> Check:
    kind = str(args.get("x-queue-type", "classic"))
    check = f"queue {name} type"
    if not flags["durable"] or flags["auto_delete"]:
        return Check(
            check,
            Verdict.FAIL,
            f"{kind}, {'not durable' if not flags['durable'] else 'auto-delete'}: "
            "the queue and its messages disappear on a restart (or when its last consumer leaves)",
            f"recreate {name} as a durable quorum queue: drain it, delete it, zeroloss init",
        )
    if kind == "quorum":
        return Check(check, Verdict.OK, "quorum: a message is confirmed once a majority of the replicas stored it")
    return Check(
        check,
        Verdict.FAIL,
        f"{kind}: a confirmed message lives on one node; losing that node's disk loses "
        "it (and at-least-once dead-lettering needs a quorum queue)",
        f"a queue's type cannot change: drain {name}, delete it and run zeroloss init (quorum)",
    )


def _dead_letter_check(name: str, dead: str, args: dict[str, Any]) -> Check:
    check = f"queue {name} dead-lettering"
    dlx, strategy, overflow = (args.get(k) for k in ("x-dead-letter-exchange", "x-dead-letter-strategy", "x-overflow"))
    fix = (
        f"declare {name} with x-dead-letter-exchange={dead}, x-dead-letter-strategy=at-least-once, "
        "x-overflow=reject-publish (zeroloss init does), or set them by policy"
    )
    if not dlx:
        return Check(
            check,
            Verdict.FAIL,
            f"no x-dead-letter-exchange: a message past the delivery limit is dropped {POLICY_NOTE}",
            fix,
        )
    if strategy != "at-least-once":
        return Check(
            check,
            Verdict.FAIL,
            f"to {dlx}, x-dead-letter-strategy={strategy or 'at-most-once (default)'}: "
            "a message the broker dead-letters is removed before the dead-letter queue has it, and lost if "
            f"that fails {POLICY_NOTE}",
            fix,
        )
    if overflow != "reject-publish":
        return Check(
            check,
            Verdict.FAIL,
            f"to {dlx}, at-least-once but x-overflow={overflow or 'drop-head (default)'}"
            ": RabbitMQ uses at-least-once dead-lettering only with x-overflow=reject-publish and falls back "
            f"to at-most-once {POLICY_NOTE}",
            fix,
        )
    return Check(check, Verdict.OK, f"to {dlx}, at-least-once, x-overflow=reject-publish")


def _delivery_limit_check(name: str, args: dict[str, Any], version: str) -> Check:
    check = f"queue {name} delivery limit"
    limit = args.get("x-delivery-limit")
    if isinstance(limit, int) and limit >= 0:
        return Check(
            check,
            Verdict.OK,
            f"{limit}: a message returned more often is dead-lettered by the broker "
            "(the consumer dead-letters a failing message itself before that)",
        )
    major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 0
    if major >= 4:
        return Check(check, Verdict.OK, f"not set: RabbitMQ {version} applies its default of 20 {POLICY_NOTE}")
    return Check(
        check,
        Verdict.WARN,
        f"not set: RabbitMQ {version} has no default limit, so a message that kills "
        f"its consumer is redelivered forever and holds its key back {POLICY_NOTE}",
        f"declare {name} with x-delivery-limit (zeroloss init sets 20) or set a delivery-limit policy",
    )
