"""The relay on the three-broker Kafka cluster (tests/kafka_cluster.py: RF 3, min ISR 2, acks=all):
``zeroloss relay --drain`` from a PostgreSQL outbox with N pending (as ``bench.cli_relay``) against a
bare idempotent producer (acks=all) sending the same messages to the same cluster in the same run.

With ``--start`` (``make bench`` passes it, and runs this script last so the other rows are measured
without three idle JVMs on the 2 cores) a cluster that is down is started here and stopped after
the rows; one that was up is left up. Without it (``make bench-quick``) the cluster is not started:
when it is not answering, the rows say so and the script exits 0.

One run per key count by default (``--reps 1``): each drains N through three JVMs that share the
2 cores with PostgreSQL and the relay, several minutes at 100k; more repetitions are for a quiet
machine.

Usage: python -m bench.cluster [--messages N] [--keys 100,10000,0] [--reps R] [--start]
"""

from __future__ import annotations

import argparse
import statistics

from tests.kafka_cluster import ClusterError, KafkaCluster

from bench.cli_relay import cli_relay, keys_name
from bench.common import Row, machine, median_rate, report, say
from bench.relay_throughput import bare_producer

BASELINE = "bare idempotent producer, same cluster"
TARGET_RATIO = 0.25


def row_name(keys: int) -> str:
    return f"`zeroloss relay`, PostgreSQL → 3-broker Kafka cluster (RF 3, min ISR 2), {keys_name(keys)}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--keys", default="100,10000,0", help="comma-separated key counts (0: unkeyed)")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--start", action="store_true", help="start the cluster if it is down, and stop it after")
    args = ap.parse_args()
    n, reps = args.messages, args.reps
    key_counts = [int(k) for k in args.keys.split(",")]
    cluster = KafkaCluster()
    print(f"machine: {machine(f'Apache Kafka {cluster.version}, three KRaft nodes on {cluster.bootstrap}')}")
    print(
        f"messages: {n} x 200-byte values pending in PostgreSQL, `zeroloss relay --drain` as a process, "
        f"median of {reps}; cluster: RF 3, min.insync.replicas 2, producers acks=all and idempotent"
    )
    started, why_not = False, "cluster not running (make cluster)"
    if args.start and not cluster.answering():
        say("starting the three-broker cluster (stopped again after the rows) ...")
        try:
            started = cluster.start()
        except ClusterError as e:  # no Java, no jars: the rows say why, the other rows stand
            why_not = f"cluster did not start: {e}"
    try:
        measure(cluster, n, reps, key_counts, why_not)
    finally:
        if started:
            cluster.stop()


def measure(cluster: KafkaCluster, n: int, reps: int, key_counts: list[int], why_not: str) -> None:
    if not cluster.answering():
        say(f"the three-broker cluster is not answering: rows skipped ({why_not})")
        report(
            [
                Row(
                    row_name(k),
                    0.0,
                    BASELINE,
                    0.0,
                    min_ratio=TARGET_RATIO,
                    skipped=why_not,
                )
                for k in key_counts
            ]
        )
        return
    say("bare producer on the cluster ...")
    bare = median_rate(lambda: bare_producer(cluster.bootstrap, n), reps)
    rows = []
    for keys in key_counts:
        say(f"{keys_name(keys)} ...")
        ours = statistics.median(cli_relay(cluster.url, n, keys, None, None, True) for _ in range(reps))
        rows.append(Row(row_name(keys), ours, BASELINE, bare, min_ratio=TARGET_RATIO))
    report(rows)


if __name__ == "__main__":
    main()
