"""``zeroloss relay``: the relay as a command: options → :class:`zeroloss.relay.Relay`, signals,
the metrics endpoint, and on a terminal the drain's progress bar."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Any

import click

from zeroloss.cli._base import errors_to_exit_codes, main, option, source_option, target_option
from zeroloss.outbox.base import Resolver


@main.command()
@source_option
@target_option
@option(
    "--batch-size",
    envvar="ZEROLOSS_BATCH_SIZE",
    default=None,
    type=click.IntRange(1),
    help="Messages claimed and published per broker transaction.  [default: 2000 for Kafka, 500 for the other brokers]",
)
@option(
    "--max-attempts",
    envvar="ZEROLOSS_MAX_ATTEMPTS",
    default=10,
    show_default=True,
    type=click.IntRange(1),
    help="Attempts per message before it goes to failed (broker outages spend none).",
)
@option(
    "--lease-s",
    envvar="ZEROLOSS_LEASE_S",
    default=120.0,
    show_default=True,
    type=click.FloatRange(1),
    help="How long a claim lasts unrenewed (renewed every third of it while publishing); above --timeout-s.",
)
@option(
    "--backoff-base-s",
    envvar="ZEROLOSS_BACKOFF_BASE_S",
    default=0.5,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="First retry delay; doubles per attempt.",
)
@option(
    "--max-backoff-s",
    envvar="ZEROLOSS_MAX_BACKOFF_S",
    default=60.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Longest retry delay; at least --backoff-base-s.",
)
@option(
    "--timeout-s",
    envvar="ZEROLOSS_TIMEOUT_S",
    default=30.0,
    show_default=True,
    type=click.FloatRange(1),
    help="Broker acknowledgement timeout; a producer with no progress for this long is recreated.",
)
@option(
    "--relay-id",
    envvar="ZEROLOSS_RELAY_ID",
    default=None,
    help="Stable id of this relay (Kafka transactional.id suffix); default HOST-DIGEST of the outbox. "
    "Relays sharing one host and outbox need distinct ids.",
)
@option("--drain", is_flag=True, help="Exit 0 once nothing is left to send, instead of running forever.")
@option(
    "--progress-s",
    envvar="ZEROLOSS_PROGRESS_S",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Log a progress line this often (delivered, rate, backlog, oldest pending age); 0: never. "
    "With --drain on a terminal, a progress bar instead.",
)
@option(
    "--metrics-port",
    envvar="ZEROLOSS_METRICS_PORT",
    default=None,
    type=click.IntRange(0, 65535),
    help="Serve /metrics, /healthz and /readyz on this port (0: any free port, printed at start).",
)
@option(
    "--metrics-host",
    envvar="ZEROLOSS_METRICS_HOST",
    default="0.0.0.0",
    show_default=True,
    help="Address for --metrics-port.",
)
@option(
    "--resolver-sql",
    envvar="ZEROLOSS_RESOLVER_SQL",
    default=None,
    metavar="QUERY",
    help="Spool: settle tmp/ files a crash left by running QUERY with :txid on --resolver-db; a row means "
    "the app's transaction committed, none that it rolled back.",
)
@option(
    "--resolver-db",
    envvar="ZEROLOSS_RESOLVER_DB",
    default=None,
    metavar="URL",
    help="The app's database for --resolver-sql.",
)
@option(
    "--resolver-command",
    envvar="ZEROLOSS_RESOLVER_COMMAND",
    default=None,
    metavar="CMD",
    help="Spool: settle tmp/ files by running CMD TXID, which prints committed, rolled-back or unknown "
    "(doubt/) and exits 0; anything else: asked again at the next recover.",
)
@option(
    "--tmp-grace-s",
    envvar="ZEROLOSS_TMP_GRACE_S",
    default=60.0,
    show_default=True,
    type=click.FloatRange(1),
    help="Spool: tmp/ files younger than this belong to running transactions and are left alone; longer "
    "than the app's longest transaction, or a resolver answers 'rolled back' for one still running.",
)
@errors_to_exit_codes
def relay(
    source: str,
    table: str,
    target: str,
    batch_size: int | None,
    max_attempts: int,
    lease_s: float,
    backoff_base_s: float,
    max_backoff_s: float,
    timeout_s: float,
    relay_id: str | None,
    drain: bool,
    metrics_port: int | None,
    metrics_host: str,
    resolver_sql: str | None,
    resolver_db: str | None,
    resolver_command: str | None,
    tmp_grace_s: float,
    progress_s: float,
) -> None:
    """Publish committed messages from the outbox to the broker until SIGTERM."""
    # Signals first: a SIGTERM that arrives while the relay is still starting up means "stop", not death.
    stopping = threading.Event()
    relays: list[Any] = []

    def on_signal(signum: int, frame: object) -> None:
        logging.getLogger("zeroloss.relay").info("signal %d: stopping after the batch in flight", signum)
        stopping.set()
        for r in relays:
            r.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    if max_backoff_s < backoff_base_s:
        raise click.BadParameter(
            f"{max_backoff_s} is below --backoff-base-s {backoff_base_s}",
            param_hint="'--max-backoff-s' / ZEROLOSS_MAX_BACKOFF_S",
        )
    if lease_s <= timeout_s:
        # A claim that expires while its publish may still succeed lets a second relay send it too.
        raise click.BadParameter(
            f"{lease_s} must exceed --timeout-s {timeout_s} (a claim must outlive its publish)",
            param_hint="'--lease-s' / ZEROLOSS_LEASE_S",
        )

    resolver = _resolver(source, resolver_sql, resolver_db, resolver_command)

    from zeroloss.cli import drain_bar
    from zeroloss.http import HealthServer
    from zeroloss.registry import default_relay_id, open_broker, open_store
    from zeroloss.relay import KAFKA_BATCH_SIZE, Relay, RelaySettings
    from zeroloss.urls import scheme_of

    bar_wanted = drain_bar.wanted(drain, progress_s, sys.stderr)
    if batch_size is None:  # Kafka: one transaction per batch, its fixed cost spread over more (issue 14)
        batch_size = KAFKA_BATCH_SIZE if scheme_of(target) == "kafka" else RelaySettings().batch_size
    settings = RelaySettings(
        batch_size=batch_size,
        max_attempts=max_attempts,
        lease_s=lease_s,
        backoff_base_s=backoff_base_s,
        max_backoff_s=max_backoff_s,
        stats_every_s=None if metrics_port is None else 5.0,
        # on a terminal, a drain's bar is redrawn often; elsewhere a progress line every progress_s
        progress_every_s=drain_bar.EVERY_S if bar_wanted else progress_s or None,
    )
    # the broker first: a bad target URL is named before a missing SQLite file or spool
    broker = open_broker(target, relay_id=relay_id or default_relay_id(source, table), timeout_s=timeout_s)
    try:
        store = open_store(source, table=table, tmp_grace_s=tmp_grace_s if source.startswith("spool:") else None)
    except BaseException:
        broker.close()
        raise
    r = Relay(store, broker, settings, resolver=resolver)
    relays.append(r)
    if stopping.is_set():
        r.stop()
    server = None
    if metrics_port is not None:
        server = HealthServer(metrics_port, host=metrics_host, ready=r.readiness).start()
        click.echo(f"metrics at http://{metrics_host}:{server.port}/metrics", err=True)
    try:
        if bar_wanted:
            with drain_bar.drain_bar() as bar:
                r.on_progress = bar.show
                r.drain(timeout_s=86400)
        elif drain:
            r.drain(timeout_s=86400)
        else:
            r.run()
    finally:
        if server is not None:
            server.close()
        broker.close()
        store.close()


def _resolver(source: str, sql: str | None, db: str | None, command: str | None) -> Resolver | None:
    """The resolver the relay options ask for; usage errors name the option at fault."""
    if sql is None and db is None and command is None:
        return None
    if not source.startswith("spool:"):
        raise click.UsageError(
            "--resolver-* options are for a spool source: a SQL outbox commits with the "
            "app's transaction and has nothing to resolve"
        )
    if command is not None and (sql is not None or db is not None):
        raise click.UsageError("give --resolver-command or --resolver-sql with --resolver-db, not both")
    from zeroloss.outbox.resolvers import command_resolver, sql_resolver

    if command is not None:
        return command_resolver(command)
    if sql is None or db is None:
        raise click.UsageError("--resolver-sql and --resolver-db go together")
    return sql_resolver(db, sql)
