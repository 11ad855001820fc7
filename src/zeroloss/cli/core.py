"""The core commands: ``init``, ``status``, ``broker``, ``demo`` (``relay`` is :mod:`.relay`)."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time

import click

from zeroloss.cli._base import (
    deprecated_alias,
    errors_to_exit_codes,
    json_option,
    main,
    opened_store,
    option,
    prefer,
    source_option,
    source_options,
    target_options,
)
from zeroloss.errors import ConfigError, StoreSetupError, ZerolossError
from zeroloss.outbox.base import Stats


@main.command()
@source_options(required=False)
@target_options(required=False)
@option(
    "--topic",
    "topics",
    multiple=True,
    metavar="NAME",
    help="A topic to declare on --target, with its dead-letter topic NAME.dlq (repeatable).",
)
@option(
    "--partitions",
    type=click.IntRange(1),
    default=None,
    help="Kafka: partitions of a topic created now [default: the broker's default]; RocketMQ: queues per "
    "broker [default: 4].",
)
@option(
    "--replication-factor",
    type=click.IntRange(1),
    default=None,
    help="Copies of what is created now: Kafka topic replication factor [default: the broker's "
    "default.replication.factor]; NATS stream replicas [default: 1: one server's disk]. More than "
    "the cluster can hold is an error. RabbitMQ: not taken (a quorum queue is on every node).",
)
@option(
    "--group",
    default=None,
    metavar="NAME",
    help="Also create this consumer group where the broker has one to create (Redis: XGROUP CREATE "
    "... MKSTREAM; RocketMQ: an orderly subscription group on every master).",
)
@option(
    "--timeout-s",
    default=30.0,
    show_default=True,
    type=click.FloatRange(1),
    help="How long to wait for the broker's answers.",
)
@option(
    "--notify",
    is_flag=True,
    help="PostgreSQL outbox: add the trigger whose NOTIFY wakes an idle relay at each commit (lower "
    "latency; NOTIFY serialises the commits of the transactions that add messages).",
)
@errors_to_exit_codes
def init(
    source: str | None,
    table: str,
    target: str | None,
    topics: tuple[str, ...],
    partitions: int | None,
    replication_factor: int | None,
    group: str | None,
    timeout_s: float,
    notify: bool,
) -> None:
    """Create the outbox (SQL table and indexes, or spool directories) and/or declare on the broker
    what the relay and the consumers of each --topic need. Both are idempotent: run it again at
    every deploy. A topic that exists is left as it is."""
    from zeroloss.brokers.base import TopicAdmin, TopicSpec
    from zeroloss.registry import open_broker, open_store, safe_url

    if not source and not target:
        raise click.UsageError("give --source URL (the outbox), --target URL (the broker), or both")
    if target and not topics:
        raise click.UsageError("--target needs at least one --topic NAME to declare")
    if not target and (topics or partitions or replication_factor or group):
        raise click.UsageError("--topic, --partitions, --replication-factor and --group need --target URL")
    if notify and not source:
        raise click.UsageError("--notify needs --source URL (a PostgreSQL outbox)")
    broker = open_broker(target, timeout_s=timeout_s) if target else None  # a bad URL stops us before any work
    try:
        if source:
            store = open_store(source, table=table, create=True)
            try:
                create = getattr(store, "create_schema", None)
                if create is not None:
                    # init waits out old transactions an index build must outlast (an app's create_schema gives up)
                    for change in create(notify=notify, upgrade_wait_s=None) or ():
                        click.echo(change)
                elif notify:
                    raise ConfigError("--notify needs a PostgreSQL outbox; a spool has no NOTIFY (the relay polls)")
            finally:
                store.close()
            click.echo(f"outbox ready at {safe_url(source)}")
        if broker is not None:
            if not isinstance(broker, TopicAdmin):
                raise ConfigError(f"the broker adapter for {target!r} cannot declare topics")
            spec = TopicSpec(partitions=partitions, replication_factor=replication_factor, group=group)
            for declared in broker.declare(list(dict.fromkeys(topics)), spec):
                click.echo(str(declared))
            click.echo(f"broker ready at {safe_url(target or '')}")
    finally:
        if broker is not None:
            broker.close()


@main.command()
@source_option
@json_option
@option(
    "--watch-s",
    type=click.FloatRange(0.1),
    is_flag=False,
    flag_value=2.0,
    default=None,
    metavar="[SECONDS]",
    help="Refresh every SECONDS (default 2) until Ctrl-C; with --json, one JSON line per refresh.",
)
@deprecated_alias("--watch", "--watch-s", "watch_old", type=click.FloatRange(0.1), is_flag=False, flag_value=2.0)
@option(
    "--max-pending-age-s",
    envvar="ZEROLOSS_MAX_PENDING_AGE_S",
    default=300.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Oldest pending older than this: warn; 4x: critical.",
)
@errors_to_exit_codes
def status(
    source: str, table: str, as_json: bool, watch_s: float | None, watch_old: float | None, max_pending_age_s: float
) -> None:
    """Count messages in every state, with the oldest age per state, expired leases, parked and
    spool disk space, and a verdict with its reasons.

    Exit code = verdict: 0 ok, 1 warn, 2 critical (failed, doubt or malformed messages; disk over
    90%; oldest pending over 4x --max-pending-age-s; the store cannot be read). Note that 2 also
    means bad usage (a wrong URL or option), as for every zeroloss command: the message on stderr
    says which. With --watch-s, the exit code after Ctrl-C is that of the last verdict.
    """
    from zeroloss import status as st

    watch: float | None = prefer(watch_s, watch_old)
    thresholds = st.Thresholds(max_pending_age_s=max_pending_age_s)
    with contextlib.ExitStack() as opened:
        try:
            store = opened.enter_context(opened_store(source, table))
        except StoreSetupError as exc:  # a SQLite file that is not there: unreadable, as a missing table is
            verdict = st.unreadable(exc)
            click.echo(json.dumps(st.as_dict(None, verdict), indent=2) if as_json else st.render(None, verdict))
            sys.exit(int(verdict.level))

        def frame() -> tuple[st.Level, str]:
            stats: Stats | None = None
            try:
                stats = store.stats()
                verdict = st.assess(stats, thresholds)
            except ConfigError:
                raise
            except ZerolossError as exc:
                verdict = st.unreadable(exc)
            if as_json:
                return verdict.level, json.dumps(st.as_dict(stats, verdict), indent=None if watch else 2)
            return verdict.level, st.render(stats, verdict, store.states)

        if watch is None:
            level, text = frame()
            click.echo(text)
            sys.exit(int(level))
        level = st.Level.OK
        try:
            while True:
                level, text = frame()
                if not as_json:
                    click.clear()
                    click.echo(
                        f"zeroloss status {source} at {time.strftime('%H:%M:%S')}, every {watch:g}s (Ctrl-C to stop)\n"
                    )
                click.echo(text)
                time.sleep(watch)
        except KeyboardInterrupt:
            pass
        sys.exit(int(level))


@main.command()
@option(
    "--port", default=9092, show_default=True, type=click.IntRange(1, 65535), help="Port on 127.0.0.1 to listen on."
)
@option(
    "--storage",
    default="memory://tansu/",
    show_default=True,
    help="memory://tansu/ (lost on restart) or s3://BUCKET/ (needs AWS_* env).",
)
@errors_to_exit_codes
def broker(port: int, storage: str) -> None:
    """Run the embedded Kafka-compatible broker (Tansu) on 127.0.0.1 until Ctrl-C."""
    from zeroloss.embedded_broker import EmbeddedBroker

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    b = EmbeddedBroker(port, storage=storage).start()
    click.echo(f"broker listening at {b.url} (Ctrl-C to stop)")
    try:
        while b.alive() and not stop.wait(0.5):
            pass
        if not stop.is_set():
            click.echo("error: the broker exited", err=True)
            sys.exit(1)
    finally:
        b.stop()


@main.command()
@option(
    "--orders",
    default=3000,
    show_default=True,
    type=click.IntRange(10),
    help="How many orders the demo shop writes (each with its message).",
)
@option(
    "--target",
    default=None,
    metavar="URL",
    help="Run against this broker (kafka://, amqp://, nats://, redis://, rocketmq://) on a topic of its own, "
    "removed afterwards, instead of an embedded Kafka-compatible broker. Not read from "
    "ZEROLOSS_TARGET, so that the demo never writes to a production broker by accident.",
)
@errors_to_exit_codes
def demo(orders: int, target: str | None) -> None:
    """Shop → outbox → relay (SIGKILLed once) → broker → consumer, then a ledger. Exit 1 on loss."""
    from zeroloss.demo import run_demo

    sys.exit(run_demo(orders=orders, echo=click.echo, target=target))


if __name__ == "__main__":  # pragma: no cover
    main()
