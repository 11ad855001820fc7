"""bench.common's rows: the met? column from each kind of target, and the rows file bench.summary reads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from bench.common import HEADER, ROWS_ENV, Row, load_rows, report, table

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("row", "met"),
    [
        (Row("floor", 31_000, "bare", 100_000, min_value=30_000), True),
        (Row("floor", 29_000, "bare", 100_000, min_value=30_000), False),
        (Row("both", 31_000, "bare", 200_000, min_value=30_000, min_ratio=0.25), False),  # 0.155x
        (Row("both", 31_000, "bare", 100_000, min_value=30_000, min_ratio=0.25), True),
        (Row("p99", 49.0, "bare p99", 10.0, unit="ms", max_value=50), True),
        (Row("p99", 51.0, "bare p99", 10.0, unit="ms", max_value=50), False),
        (Row("ceiling", 2.0, "x", 1.0, max_ratio=1.5), False),
        (Row("no baseline", 5.0, "x", 0.0, min_ratio=0.5), False),  # ratio NaN never meets a ratio target
        (Row("scale", 10.0, "1 relay", 10.0, min_ratio=1.0, ok=False), False),  # a duplicate misses it
        (Row("scale", 10.0, "1 relay", 10.0, min_ratio=1.0, ok=True), True),
        (Row("report", 10.0, "x", 5.0), None),
        (Row("cluster", 0.0, "bare", 0.0, min_ratio=0.25, skipped="cluster not running"), None),
    ],
)
def test_met(row: Row, met: bool | None) -> None:
    assert row.met is met


def test_table_has_a_met_column_and_spells_the_target() -> None:
    rows = [
        Row("a", 31_000, "bare", 100_000, min_value=30_000, min_ratio=0.25),
        Row("b", 120.0, "bare", 10.0, unit="ms", max_value=100),
        Row("c", 1.0, "x", 1.0),
        Row("d", 0.0, "bare", 0.0, min_ratio=0.25, skipped="cluster not running (make cluster)"),
    ]
    lines = table(rows).splitlines()
    assert lines[:2] == HEADER
    assert all(line.count("|") == HEADER[0].count("|") for line in lines)
    assert lines[2].endswith("| ≥ 30,000 msg/s and ≥ 0.25x | yes |")
    assert lines[3].endswith("| < 100 ms | **no** |")
    assert lines[4].endswith("| (report) | report |")
    assert "skipped: cluster not running (make cluster)" in lines[5] and lines[5].endswith("| skipped |")


def test_report_appends_rows_the_summary_prints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "rows.jsonl"
    monkeypatch.setenv(ROWS_ENV, str(path))
    first = [Row("a", 31_000, "bare", 100_000, min_value=30_000), Row("b", 1.0, "x", 2.0)]
    second = [Row("c", 0.0, "bare", 0.0, min_ratio=0.25, skipped="down"), Row("d", 1.0, "x", 1.0, min_ratio=2)]
    report(first)
    report(second)
    assert load_rows(str(path)) == first + second
    out = subprocess.run(
        [sys.executable, "-m", "bench.summary", str(path)], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert table(first + second) in out
    assert "targets met: 1 of 2; skipped: 1; report only: 1" in out


def test_make_bench_and_bench_quick_run_every_script() -> None:
    """A new bench script that neither target runs would rot unseen (or be missing from the table)."""
    makefile = (REPO / "Makefile").read_text()
    scripts = {p.stem for p in (REPO / "bench").glob("*.py")} - {"__init__", "common", "summary"}
    listed = makefile.split("BENCH_SCRIPTS :=", 1)[1].splitlines()[0].split()
    bench = makefile.split("\nbench:", 1)[1].split("\n\n", 1)[0]  # bench.cluster runs last, on its own line
    assert sorted(listed + [s for s in scripts if f"-m bench.{s} " in bench]) == sorted(scripts)
    quick = makefile.split("\nbench-quick:", 1)[1].split("\n\n", 1)[0]
    assert {s for s in scripts if f"-m bench.{s} " not in quick} == set()
    assert "-m bench.summary" in quick
