"""``zeroloss doctor`` (settings that can lose messages) and ``zeroloss audit`` (reconcile the
outbox's delivered ledger with the broker and the consumer's inbox)."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

import click

from zeroloss.cli._base import (
    EXIT_PROBLEM,
    SOURCE_HELP,
    TABLE_HELP,
    deprecated_alias,
    errors_to_exit_codes,
    json_option,
    main,
    opened_store,
    option,
    prefer,
)

if TYPE_CHECKING:
    from zeroloss.audit import AuditReport


@main.command()
@option(
    "--target",
    envvar="ZEROLOSS_TARGET",
    metavar="URL",
    help="kafka://HOST:PORT, nats://HOST:PORT, amqp://USER:PASS@HOST/, redis://HOST:PORT/DB or "
    "rocketmq://HOST:PORT?namesrv=HOST:PORT",
)
@option(
    "--topic",
    metavar="T",
    help="Also check this topic's Kafka topic, NATS streams, RabbitMQ queues or RocketMQ topics.",
)
@option("--group", metavar="G", help="RocketMQ: also check this consumer group (max reconsume times, order).")
@option("--source", envvar="ZEROLOSS_SOURCE", metavar="URL", help="Also check the outbox and its database.")
@option("--table", envvar="ZEROLOSS_TABLE", default="zeroloss_outbox", show_default=True, help=TABLE_HELP)
@option(
    "--min-replication",
    default=3,
    show_default=True,
    type=click.IntRange(1),
    help="Replication factor a Kafka topic needs; replicas a NATS stream needs; copies a RocketMQ broker "
    "makes (master + synchronous slaves).",
)
@option(
    "--timeout-s",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0.5),
    help="Longest wait for each server's answer.",
)
@option(
    "--nats-monitor",
    metavar="URL",
    help="NATS: the server's monitoring endpoint, read for its sync interval [default: http://TARGET-HOST:8222].",
)
@option(
    "--lease-s",
    envvar="ZEROLOSS_LEASE_S",
    default=120.0,
    show_default=True,
    type=click.FloatRange(1),
    help="The relay's --lease-s (NATS: part of the retry horizon the duplicate window must cover).",
)
@option(
    "--max-backoff-s",
    envvar="ZEROLOSS_MAX_BACKOFF_S",
    default=60.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="The relay's --max-backoff-s (likewise).",
)
@option(
    "--relay-timeout-s",
    envvar="ZEROLOSS_TIMEOUT_S",
    default=30.0,
    show_default=True,
    type=click.FloatRange(1),
    help="The relay's --timeout-s (likewise).",
)
@json_option
@errors_to_exit_codes
def doctor(
    target: str | None,
    topic: str | None,
    group: str | None,
    source: str | None,
    table: str,
    min_replication: int,
    timeout_s: float,
    nats_monitor: str | None,
    lease_s: float,
    max_backoff_s: float,
    relay_timeout_s: float,
    as_json: bool,
) -> None:
    """Check the settings that decide whether messages can be lost; one line per check with its
    verdict (ok / warn / fail / skip) and the fix. Exit 1 if any check fails.

    The relay options (--lease-s, --max-backoff-s, --relay-timeout-s) read the relay's own
    environment variables, so doctor run beside the relay judges the settings it runs with."""
    from zeroloss.doctor import Verdict, overall, run_doctor
    from zeroloss.relay import RelaySettings

    relay = RelaySettings(lease_s=lease_s, max_backoff_s=max_backoff_s)
    checks = run_doctor(
        target,
        topic=topic,
        source=source,
        table=table,
        min_replication=min_replication,
        timeout_s=timeout_s,
        nats_monitor=nats_monitor,
        relay=relay,
        relay_timeout_s=relay_timeout_s,
        group=group,
    )
    verdict = overall(checks)
    if as_json:
        click.echo(json.dumps({"verdict": verdict.value, "checks": [c.as_dict() for c in checks]}, indent=2))
    else:
        for c in checks:
            fix = f"  -> fix: {c.fix}" if c.fix and c.verdict is not Verdict.OK else ""
            click.echo(f"{c.verdict.value:<5} {c.name}: {c.detail}{fix}")
        click.echo(f"verdict: {verdict.value}")
    if verdict is Verdict.FAIL:
        sys.exit(EXIT_PROBLEM)


@main.command()
@option("--source", envvar="ZEROLOSS_SOURCE", required=True, metavar="URL", help=SOURCE_HELP)
@option("--table", envvar="ZEROLOSS_TABLE", default="zeroloss_outbox", show_default=True, help=TABLE_HELP)
@option(
    "--target",
    envvar="ZEROLOSS_TARGET",
    metavar="URL",
    help="Broker to read delivered messages back from: kafka://HOST:PORT or rocketmq://HOST:8081?namesrv=HOST:9876",
)
@option("--inbox", "inbox_url", metavar="URL", help="The consumer's inbox (SQL URL or redis://).")
@option("--inbox-table", default="zeroloss_inbox", show_default=True, help="The SQL inbox's table name.")
@option("--group", metavar="G", help="Consumer group whose inbox to check (with --inbox).")
@option(
    "--since-s",
    "since_s",
    type=click.FloatRange(0),
    metavar="SECONDS",
    help="Only messages created in the last SECONDS (default: the whole success ledger).",
)
@deprecated_alias("--since", "--since-s", "since_old", type=click.FloatRange(0))
@option(
    "--grace-s",
    default=60.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Inbox check: messages younger than this are not judged yet.",
)
@option(
    "--timeout-s",
    default=30.0,
    show_default=True,
    type=click.FloatRange(1),
    help="Longest wait for the broker per page of the ledger.",
)
@option("--repair", is_flag=True, help="Send the missing messages again (success -> pending, same ids).")
@option(
    "--prom-file",
    type=click.Path(dir_okay=False),
    metavar="PATH",
    help="Write the result as Prometheus gauges for node_exporter's textfile collector.",
)
@json_option
@errors_to_exit_codes
def audit(
    source: str,
    table: str,
    target: str | None,
    inbox_url: str | None,
    inbox_table: str,
    group: str | None,
    since_s: float | None,
    since_old: float | None,
    grace_s: float,
    timeout_s: float,
    repair: bool,
    prom_file: str | None,
    as_json: bool,
) -> None:
    """Reconcile delivered (success) messages with the broker and/or a consumer group's inbox.
    Exit 1 while anything is missing (also right after --repair: audit again once the relay has
    sent them)."""
    from zeroloss import audit as au
    from zeroloss import metrics

    since_s = prefer(since_s, since_old)
    with opened_store(source, table) as store:
        inbox = au.open_inbox(inbox_url, inbox_table) if inbox_url else None
        try:
            report = au.audit(
                store,
                target=target,
                inbox=inbox,
                inbox_url=inbox_url or "",
                group=group,
                since_s=since_s,
                grace_s=grace_s,
                timeout_s=timeout_s,
            )
        finally:
            if inbox is not None:
                inbox.close()
        if repair and report.missing:
            report.repaired = au.repair(store, report.missing)
    if prom_file:
        from prometheus_client import write_to_textfile

        missing = {}
        if report.broker is not None:
            missing["broker"] = len(report.broker.missing)
        if report.inbox is not None:
            missing["inbox"] = len(report.inbox.missing)
        metrics.record_audit(report.checked, missing)
        write_to_textfile(prom_file, metrics.AUDIT_REGISTRY)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        _print(report, since_s)
    if report.missing:
        sys.exit(EXIT_PROBLEM)


def _print(report: AuditReport, since_s: float | None) -> None:
    scope = "" if since_s is None else f" created in the last {since_s:g}s"
    click.echo(f"audited {report.checked} delivered (success) message(s){scope}")
    rates = report.loss_rates()
    if report.broker is not None:
        b = report.broker
        click.echo(
            f"broker {b.target}: {report.checked} delivered, {b.confirmed} confirmed, {len(b.missing)} missing "
            f"(loss rate {rates['broker']:.2%})"
        )
        for mid, why in list(b.missing.items())[:50]:
            click.echo(f"  missing {mid}: {why}")
        if len(b.missing) > 50:
            click.echo(f"  ... and {len(b.missing) - 50} more (--json lists all)")
    if report.inbox is not None:
        i = report.inbox
        click.echo(
            f"inbox group {i.group}: {report.checked - i.too_recent} delivered, {i.consumed} consumed, "
            f"{len(i.missing)} missing (loss rate {rates['inbox']:.2%}), {i.too_recent} too recent to judge"
        )
        for mid in i.missing[:50]:
            click.echo(f"  not consumed {mid}")
        if len(i.missing) > 50:
            click.echo(f"  ... and {len(i.missing) - 50} more (--json lists all)")
    if report.repaired:
        click.echo(
            f"repair: {report.repaired} message(s) back to pending; the relay sends them again under the "
            "same ids. Audit again once it has."
        )
    elif report.missing:
        click.echo("run again with --repair to send the missing ones again")
    else:
        click.echo("nothing missing")
