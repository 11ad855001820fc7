"""``zeroloss dlq list|show|replay``: read a topic's dead letters and send chosen ones back.

TOPIC may be the original topic (``orders``) or its dead-letter topic (``orders.dlq``). Kafka, NATS
JetStream, Redis Streams and RocketMQ; RabbitMQ is refused with the reason (see :mod:`zeroloss.dlq`).
"""

from __future__ import annotations

import datetime as dt
import json

import click

from zeroloss.brokers.base import DLQ_SUFFIX
from zeroloss.cli._base import errors_to_exit_codes, main, option, target_option


def _original(topic: str) -> str:
    return topic[: -len(DLQ_SUFFIX)] if topic.endswith(DLQ_SUFFIX) else topic


@main.group()
def dlq() -> None:
    """Dead letters of a topic (Kafka, NATS JetStream, Redis Streams, RocketMQ): list, show, replay."""


@dlq.command("list")
@target_option
@click.argument("topic")
@option("--limit", default=100, show_default=True, type=click.IntRange(1))
@option("--json", "as_json", is_flag=True)
@errors_to_exit_codes
def list_cmd(target: str, topic: str, limit: int, as_json: bool) -> None:
    """List dead letters: id, origin, attempts, error."""
    from zeroloss.dlq import list_dead_letters

    letters = list_dead_letters(target, _original(topic), limit)
    if as_json:
        click.echo(json.dumps([d.to_dict() for d in letters], indent=2))
        return
    for d in letters:
        when = dt.datetime.fromtimestamp(d.first_failure, dt.UTC).isoformat(timespec="seconds")
        click.echo(f"{d.id}  {d.original_topic}/{d.original_partition}/{d.original_offset}  "
                   f"attempts={d.attempts}  first-failure={when}  {d.error_type}: {d.error_message[:120]}")
    click.echo(f"{len(letters)} dead letter(s) in {_original(topic)}{DLQ_SUFFIX}")


@dlq.command()
@target_option
@click.argument("topic")
@click.argument("message_id")
@option("--json", "as_json", is_flag=True)
@errors_to_exit_codes
def show(target: str, topic: str, message_id: str, as_json: bool) -> None:
    """Every field of one dead letter."""
    from zeroloss.dlq import show as show_one

    d = show_one(target, _original(topic), message_id).to_dict()
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    for k, v in d.items():
        click.echo(f"{k:<20} {v}")


@dlq.command()
@target_option
@click.argument("topic")
@click.argument("ids", nargs=-1)
@option("--all", "everything", is_flag=True, help="Replay every dead letter of the topic.")
@option("--to-topic", default=None, help="Send to this topic instead of the original one.")
@errors_to_exit_codes
def replay(target: str, topic: str, ids: tuple[str, ...], everything: bool, to_topic: str | None) -> None:
    """Republish dead letters with their original id (the consumer's inbox runs each at most once)."""
    from zeroloss.dlq import list_dead_letters
    from zeroloss.dlq import replay as replay_ids

    if bool(ids) == everything:
        raise click.UsageError("name the ids to replay, or pass --all (not both)")
    chosen = list(ids) or [d.id for d in list_dead_letters(target, _original(topic), 10**9)]
    if not chosen:
        click.echo("no dead letters to replay")
        return
    n = replay_ids(target, _original(topic), chosen, to_topic=to_topic)
    click.echo(f"replayed {n} dead letter(s)")
