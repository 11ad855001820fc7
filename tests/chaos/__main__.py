"""``make chaos``: run every scenario at full size, print one table, write bench/results/chaos.md,
exit 1 if any scenario lost a message, doubled an effect or broke a key's order.

usage: python -m tests.chaos [--short] [SCENARIO ...]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from tests.chaos.pipeline import Ledger, Size
from tests.chaos.scenarios import SCENARIOS, full_size
from zeroloss.embedded_broker import EmbeddedBroker


def render(rows: list[Ledger], size: Size, elapsed_s: float) -> str:
    lines = [
        f"chaos run: {len(rows)} scenarios, up to {size.messages} messages each, {elapsed_s:.0f}s on "
        f"{os.cpu_count()} cores",
        "",
        "| scenario | messages | faults | lost | duplicates on broker | double effects | keys out of order "
        "| drain after fault | took | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    def cell(n: int | None) -> str:
        return "n/a" if n is None else str(n)

    for r in rows:
        verdict = "ok" if r.ok else "FAIL"
        lines.append(
            f"| {r.scenario} | {r.messages} | {r.faults} | {r.lost} | {cell(r.broker_duplicates)} "
            f"| {cell(r.double_effects)} | {cell(r.out_of_order_keys)} "
            f"| {'n/a' if r.drain_s is None else f'{r.drain_s:.1f}s'} "
            f"| {'' if r.wall_s is None else f'{r.wall_s:.0f}s'} "
            f"| {verdict}{' ' + r.notes if r.notes else ''} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--short", action="store_true", help="small counts (what make test runs)")
    ap.add_argument("scenarios", nargs="*", choices=[*SCENARIOS, []], metavar="SCENARIO")
    args = ap.parse_args(argv)
    size = Size.short() if args.short else Size.full()

    def size_of(name: str) -> Size:
        return Size.short() if args.short else full_size(name)

    names = args.scenarios or list(SCENARIOS)
    rows: list[Ledger] = []
    start = time.monotonic()
    keep = os.environ.get("ZEROLOSS_CHAOS_KEEP")  # a directory to keep logs in, for post-mortems
    workdir: contextlib.AbstractContextManager[str] = (
        contextlib.nullcontext(tempfile.mkdtemp(prefix="zeroloss-chaos-", dir=keep)) if keep
        else tempfile.TemporaryDirectory(prefix="zeroloss-chaos-")
    )
    with workdir as tmp, EmbeddedBroker() as broker:
        if keep:
            print(f"logs kept in {tmp}", file=sys.stderr, flush=True)
        for name in names:
            print(f"-- {name}", file=sys.stderr, flush=True)
            work = Path(tmp) / name
            work.mkdir()
            began = time.monotonic()
            try:
                rows.append(SCENARIOS[name](broker, work, size_of(name)))
            except Exception as exc:  # a scenario that cannot finish is a failure with its reason
                traceback.print_exc()
                rows.append(Ledger(name, size_of(name).messages, 0, -1, -1, -1, -1, 0.0, f"error: {exc}"))
            rows[-1].wall_s = time.monotonic() - began
            print(render(rows[-1:], size, 0).splitlines()[-1], file=sys.stderr, flush=True)
    table = render(rows, size, time.monotonic() - start)
    print(table)
    if not args.short:
        out = Path("bench/results/chaos.md")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
