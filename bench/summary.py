"""Every row `make bench` measured, in one table, with how many targets were met.

Usage: python -m bench.summary ROWS.jsonl (the file the scripts appended to via ZEROLOSS_BENCH_ROWS)
"""

from __future__ import annotations

import argparse

from bench.common import load_rows, table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("rows", help="the JSON-lines file the benchmark scripts wrote")
    args = ap.parse_args()
    rows = load_rows(args.rows)
    checked = [r for r in rows if r.met is not None]
    met = sum(1 for r in checked if r.met)
    skipped = sum(1 for r in rows if r.skipped is not None)
    print()
    print("## Every row of this run")
    print()
    print(table(rows))
    print()
    print(
        f"targets met: {met} of {len(checked)}; skipped: {skipped}; report only: {len(rows) - len(checked) - skipped}"
    )


if __name__ == "__main__":
    main()
