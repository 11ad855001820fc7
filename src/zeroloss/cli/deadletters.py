"""``zeroloss dlq list|show|replay``: read a topic's dead letters and send chosen ones back.

``--topic`` may be the original topic (``orders``) or its dead-letter topic (``orders.dlq``); the
older form with TOPIC as the first argument still works and prints a deprecation note. Kafka, NATS
JetStream, Redis Streams and RocketMQ; RabbitMQ is refused with the reason (see :mod:`zeroloss.dlq`).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from typing import Any, TypeVar

import click

from zeroloss.brokers.base import DLQ_SUFFIX
from zeroloss.cli._base import errors_to_exit_codes, json_option, main, option, target_options
from zeroloss.logs import one_line

F = TypeVar("F", bound=Callable[..., Any])

# RabbitMQ is not offered: dlq would refuse it (see the module docstring).
dlq_target = target_options(
    help="Broker: kafka://HOST:PORT, nats://HOST:4222, redis://HOST:6379/0 or "
    "rocketmq://HOST:8081 (RabbitMQ's queues cannot be read without consuming them)."
)


def _original(topic: str) -> str:
    return topic[: -len(DLQ_SUFFIX)] if topic.endswith(DLQ_SUFFIX) else topic


def topic_option(fn: F) -> F:
    return option(
        "--topic", metavar="TOPIC", help=f"The topic whose dead letters these are: orders or orders{DLQ_SUFFIX}."
    )(fn)


def _topic_and_rest(topic: str | None, args: tuple[str, ...], rest: str) -> tuple[str, list[str]]:
    """--topic TOPIC, or the older form with TOPIC as the first argument (kept for scripts)."""
    if topic is not None:
        return _original(topic), list(args)
    if not args:
        raise click.UsageError(f"give --topic TOPIC{rest}")
    click.echo(f"note: TOPIC as an argument is deprecated; write --topic {args[0]}", err=True)
    return _original(args[0]), list(args[1:])


@main.group()
def dlq() -> None:
    """Dead letters of a topic (Kafka, NATS JetStream, Redis Streams, RocketMQ): list, show, replay."""


@dlq.command("list")
@dlq_target
@topic_option
@click.argument("old_topic", nargs=-1, metavar="")
@option("--limit", default=100, show_default=True, type=click.IntRange(1), help="Show at most this many.")
@json_option
@errors_to_exit_codes
def list_cmd(target: str, topic: str | None, old_topic: tuple[str, ...], limit: int, as_json: bool) -> None:
    """List dead letters, one line each: id, origin, attempts, first failure, error."""
    from zeroloss.dlq import list_dead_letters

    name, extra = _topic_and_rest(topic, old_topic, "")
    if extra:
        raise click.UsageError(f"unexpected arguments: {' '.join(extra)}")
    letters = list_dead_letters(target, name, limit)
    if as_json:
        click.echo(json.dumps([d.to_dict() for d in letters], indent=2))
        return
    for d in letters:
        when = dt.datetime.fromtimestamp(d.first_failure, dt.UTC).isoformat(timespec="seconds")
        click.echo(
            f"{d.id}  {d.original_topic}/{d.original_partition}/{d.original_offset}  "
            f"attempts={d.attempts}  first-failure={when}  {d.error_type}: {one_line(d.error_message)[:120]}"
        )
    click.echo(f"{len(letters)} dead letter(s) in {name}{DLQ_SUFFIX}")


@dlq.command()
@dlq_target
@topic_option
@click.argument("args", nargs=-1, metavar="ID")
@json_option
@errors_to_exit_codes
def show(target: str, topic: str | None, args: tuple[str, ...], as_json: bool) -> None:
    """Every field of one dead letter."""
    from zeroloss.dlq import show as show_one

    name, rest = _topic_and_rest(topic, args, " and the dead letter's ID")
    if len(rest) != 1:
        raise click.UsageError("give the id of one dead letter")
    d = show_one(target, name, rest[0]).to_dict()
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    for k, v in d.items():
        if k == "first_failure" and isinstance(v, (int, float)):  # as `dlq list` shows it, not epoch seconds
            v = dt.datetime.fromtimestamp(v, dt.UTC).isoformat(timespec="milliseconds")
        click.echo(f"{k:<20} {v}")


@dlq.command()
@dlq_target
@topic_option
@click.argument("args", nargs=-1, metavar="[ID]...")
@option("--all", "everything", is_flag=True, help="Replay every dead letter of the topic.")
@option("--to-topic", default=None, metavar="TOPIC", help="Send to this topic instead of the original one.")
@errors_to_exit_codes
def replay(target: str, topic: str | None, args: tuple[str, ...], everything: bool, to_topic: str | None) -> None:
    """Republish dead letters with their original id (the consumer's inbox runs each at most once)."""
    from zeroloss.dlq import list_dead_letters
    from zeroloss.dlq import replay as replay_ids

    name, ids = _topic_and_rest(topic, args, " and the ids to replay (or --all)")
    if bool(ids) == everything:
        raise click.UsageError("name the ids to replay, or pass --all (not both)")
    chosen = ids or [d.id for d in list_dead_letters(target, name, 10**9)]
    if not chosen:
        click.echo("no dead letters to replay")
        return
    n = replay_ids(target, name, chosen, to_topic=to_topic)
    click.echo(f"replayed {n} dead letter(s)")
