"""``make chaos``: run every scenario at full size, print one table, update bench/results/chaos.md,
exit 1 if any scenario lost a message, doubled an effect or broke a key's order.

usage: python -m tests.chaos [--short] [SCENARIO ...]

The Tansu scenarios run against an embedded broker; the ``cluster-*`` ones against the three-node
Apache Kafka cluster of tests/kafka_cluster.py (settings from ``ZEROLOSS_KAFKA_*``), started here
when it is not up and stopped at the end if this run started it.

bench/results/chaos.md holds one row per scenario, each from the last full-size run of that
scenario: a run of some scenarios replaces their rows and keeps the others (the ``id`` column is
the name to run a row again with). ``--short`` runs print the table and write nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.chaos.broker_faults import CLUSTER_SCENARIOS
from tests.chaos.pipeline import Ledger
from tests.chaos.scenarios import SCENARIOS, full_size, short_size
from tests.kafka_cluster import KafkaCluster
from zeroloss.embedded_broker import EmbeddedBroker

RESULTS = Path("bench/results/chaos.md")
HEADER = (
    "| id | scenario | messages | faults | lost | duplicates on broker | double effects | keys out of order "
    "| drain after fault | took | verdict |"
)


def row(name: str, r: Ledger) -> str:
    def cell(n: int | None) -> str:
        return "n/a" if n is None else str(n)

    verdict = "ok" if r.ok else "FAIL"
    return (
        f"| {name} | {r.scenario} | {r.messages} | {r.faults} | {r.lost} | {cell(r.broker_duplicates)} "
        f"| {cell(r.double_effects)} | {cell(r.out_of_order_keys)} "
        f"| {'n/a' if r.drain_s is None else f'{r.drain_s:.1f}s'} "
        f"| {'' if r.wall_s is None else f'{r.wall_s:.0f}s'} "
        f"| {verdict}{' ' + r.notes if r.notes else ''} |"
    )


def table(lines: list[str]) -> list[str]:
    return [HEADER, "|" + " --- |" * HEADER.count(" | ") + " --- |", *lines]


def render(rows: list[tuple[str, Ledger]], elapsed_s: float) -> str:
    most = max((r.messages for _, r in rows), default=0)
    head = f"chaos run: {len(rows)} scenarios, up to {most} messages each, {elapsed_s:.0f}s on {os.cpu_count()} cores"
    return "\n".join([head, "", *table([row(name, r) for name, r in rows])])


def merged(previous: str, rows: list[tuple[str, Ledger]], elapsed_s: float) -> str:
    """bench/results/chaos.md: the rows of ``previous`` (by id) with those just run replaced, in
    SCENARIOS order; rows of scenarios that no longer exist are dropped."""
    kept: dict[str, str] = {}
    for line in previous.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 2 and cells[1] in SCENARIOS:
            kept[cells[1]] = line
    kept.update({name: row(name, r) for name, r in rows})
    lines = [kept[name] for name in SCENARIOS if name in kept]
    ran = ", ".join(name for name, _ in rows) if len(rows) < len(SCENARIOS) else "all"
    head = (
        f"chaos: {len(lines)} of {len(SCENARIOS)} scenarios, each row from its last full-size run on "
        f"{os.cpu_count()} cores (`python -m tests.chaos ID` runs one again). Last run "
        f"{time.strftime('%Y-%m-%d')}: {ran}, {elapsed_s:.0f}s."
    )
    return "\n".join([head, "", *table(lines)]) + "\n"


@contextlib.contextmanager
def kafka_cluster() -> Iterator[KafkaCluster]:
    """The cluster of tests/kafka_cluster.py, up; stopped at the end if it was not running before."""
    cluster = KafkaCluster()
    was_running = any(cluster.running().values())
    started = time.monotonic()
    cluster.start()
    print(
        f"Kafka cluster at {cluster.bootstrap} ({cluster.dir}), "
        f"{'reused' if was_running else f'started in {time.monotonic() - started:.0f}s'}",
        file=sys.stderr,
        flush=True,
    )
    try:
        yield cluster
    finally:
        if not was_running:
            cluster.stop()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--short", action="store_true", help="small counts (what make test runs)")
    ap.add_argument("scenarios", nargs="*", choices=[*SCENARIOS, []], metavar="SCENARIO")
    args = ap.parse_args(argv)

    def size_of(name: str) -> Any:
        return short_size(name) if args.short else full_size(name)

    names = args.scenarios or list(SCENARIOS)
    rows: list[tuple[str, Ledger]] = []
    start = time.monotonic()
    keep = os.environ.get("ZEROLOSS_CHAOS_KEEP")  # a directory to keep logs in, for post-mortems
    workdir: contextlib.AbstractContextManager[str] = (
        contextlib.nullcontext(tempfile.mkdtemp(prefix="zeroloss-chaos-", dir=keep))
        if keep
        else tempfile.TemporaryDirectory(prefix="zeroloss-chaos-")
    )
    with workdir as tmp, contextlib.ExitStack() as services:
        if keep:
            print(f"logs kept in {tmp}", file=sys.stderr, flush=True)
        broker = cluster = None
        if any(name not in CLUSTER_SCENARIOS for name in names):
            broker = services.enter_context(EmbeddedBroker())
        cluster_error = None
        if any(name in CLUSTER_SCENARIOS for name in names):
            try:
                cluster = services.enter_context(kafka_cluster())
            except Exception as exc:  # no java, ports taken...: the cluster rows fail with the reason
                traceback.print_exc()
                cluster_error = f"error: no Kafka cluster: {str(exc).splitlines()[0]}"
        for name in names:
            print(f"-- {name}", file=sys.stderr, flush=True)
            work = Path(tmp) / name
            work.mkdir()
            began = time.monotonic()
            target = cluster if name in CLUSTER_SCENARIOS else broker
            try:
                if target is None:
                    raise RuntimeError(cluster_error or "no broker")
                ledger = SCENARIOS[name](target, work, size_of(name))
            except Exception as exc:  # a scenario that cannot finish is a failure with its reason
                traceback.print_exc()
                why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:1000]  # one table cell
                ledger = Ledger(name, size_of(name).messages, 0, -1, -1, -1, -1, 0.0, f"error: {why}")
            ledger.wall_s = time.monotonic() - began
            rows.append((name, ledger))
            print(row(name, ledger), file=sys.stderr, flush=True)
    elapsed = time.monotonic() - start
    print(render(rows, elapsed))
    if not args.short:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(merged(RESULTS.read_text() if RESULTS.exists() else "", rows, elapsed))
    return 0 if all(r.ok for _, r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
