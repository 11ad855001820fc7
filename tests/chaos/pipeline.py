"""The whole path under test, as real processes: app → outbox → relay(s) → broker → consumer(s)
with a PostgreSQL inbox whose effects table is the ground truth.

Counting follows the trusted systems' own tests: every message has a unique id; after the
faults heal, a final drain reads everything back; we report lost (committed, no effect),
duplicates on the broker, double effects, per-key order, and how long draining took.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from zeroloss.inbox import SqlInbox
from zeroloss.outbox.sql import SqlOutbox
from zeroloss.readback import read_topic

PG = os.environ.get("ZEROLOSS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
CHILD = Path(__file__).resolve().parent.parent / "consumer_child.py"


@dataclass(frozen=True)
class Size:
    messages: int
    kills: int
    outage_s: float

    @classmethod
    def short(cls) -> Size:
        return cls(messages=1500, kills=3, outage_s=4)

    @classmethod
    def full(cls) -> Size:
        return cls(messages=50_000, kills=10, outage_s=20)


def wait_until(cond: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll ``cond`` until true; return the seconds it took; AssertionError past the deadline."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def zeroloss_cli(*args: str, timeout_s: float = 300) -> tuple[int, str, str]:
    """Run the ``zeroloss`` command as an operator would: (exit code, stdout, stderr)."""
    done = subprocess.run([sys.executable, "-m", "zeroloss", *args], capture_output=True, text=True, timeout=timeout_s)
    return done.returncode, done.stdout, done.stderr


def start_relay(
    source_args: Sequence[str],
    broker_url: str,
    relay_id: str,
    log: Path,
    lease_s: float = 3.0,
    extra: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """A ``zeroloss relay`` process with the chaos suite's short timeouts, logging to ``log``;
    ``extra``: more ``zeroloss relay`` options (``--metrics-port N`` ...)."""
    cmd = [
        sys.executable,
        "-m",
        "zeroloss",
        "-v",
        "relay",
        *source_args,
        "--target",
        broker_url,
        "--batch-size",
        "200",
        "--lease-s",
        str(lease_s),
        "--timeout-s",
        "2.5",
        "--max-backoff-s",
        "2",
        "--relay-id",
        relay_id,
        *extra,
    ]
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


@dataclass
class Ledger:
    scenario: str
    messages: int
    faults: int
    lost: int
    broker_duplicates: int | None  # None: does not apply to this scenario (shown as n/a)
    double_effects: int | None
    out_of_order_keys: int | None
    drain_s: float | None
    notes: str = ""
    violations: int = 0  # a broken promise with no column of its own; the notes say which
    wall_s: float | None = None  # how long the whole scenario took (set by the runner)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and not self.double_effects and not self.out_of_order_keys and self.violations == 0


def broker_ledger(
    scenario: str,
    broker_url: str,
    topic: str,
    committed: Sequence[tuple[str, bytes | None]],
    faults: int,
    drain_s: float | None,
    notes: str,
    problems: list[str],
) -> Ledger:
    """A Ledger from what is on ``topic``: committed ids missing (lost), copies, per-key order
    against commit order, and ids that were never committed (a violation, as are ``problems``)."""
    ids = [mid for mid, _ in committed]
    seen = read_topic(broker_url, topic, expect=ids, idle_s=3)
    known = set(ids)
    lost = sum(1 for mid in ids if not seen.ids[mid])
    strangers = [mid for mid in seen.ids if mid not in known]
    if strangers:
        problems.append(f"{len(strangers)} never-committed message(s) on the broker")
    by_key: dict[bytes, list[str]] = {}
    for mid, key in committed:
        if key is not None and seen.ids[mid]:
            by_key.setdefault(key, []).append(mid)
    out_of_order = sum(1 for key, mids in by_key.items() if [m for m in seen.order.get(key, []) if m in known] != mids)
    notes += "".join(f"; PROBLEM: {p}" for p in problems)
    return Ledger(
        scenario, len(ids), faults, lost, seen.duplicates, None, out_of_order, drain_s, notes, violations=len(problems)
    )


@dataclass
class Pipeline:
    """One isolated run: its own outbox table, topic, group, inbox and effects tables."""

    broker_url: str
    workdir: Path
    source: str = "postgresql"  # or "sqlite"
    name: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    relays: list[subprocess.Popen[bytes]] = field(default_factory=list)
    consumers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    committed: list[tuple[str, bytes]] = field(default_factory=list)  # (id, key) in add order

    def __post_init__(self) -> None:
        self.topic = f"chaos-{self.name}"
        self.group = f"g-{self.name}"
        self.outbox_url = PG if self.source == "postgresql" else f"sqlite:///{self.workdir / 'outbox.db'}"
        self.outbox = SqlOutbox(self.outbox_url, table=f"ob_{self.name}")
        self.outbox.create_schema()
        self.inbox = SqlInbox(PG, table=f"ib_{self.name}")
        self.inbox.create_schema()
        md = sa.MetaData()
        self.effects = sa.Table(
            f"fx_{self.name}", md,
            sa.Column("n", sa.BigInteger, primary_key=True, autoincrement=True),
            sa.Column("msg_id", sa.String(64), nullable=False),
            sa.Column("msg_key", sa.String(64)),
            sa.Column("attempts", sa.Integer),
        )  # fmt: skip
        md.create_all(self.inbox.engine)
        self.relay_log = self.workdir / f"relay-{self.name}.log"
        self.consumer_log = self.workdir / f"consumer-{self.name}.log"

    # -- producing ------------------------------------------------------------------------------

    def produce(self, n: int, keys: int = 17, per_txn: int = 50, pad: bytes = b"") -> None:
        """Commit ``n`` messages, ``per_txn`` per transaction; the i-th one's value is ``i`` (then
        ``pad``, to make records bigger), its key one of ``keys``."""
        for start in range(0, n, per_txn):
            rows: list[dict[str, Any]] = [
                {"topic": self.topic, "value": b"%d%s" % (i, pad), "key": b"k%d" % (i % keys)}
                for i in range(start, min(n, start + per_txn))
            ]
            with self.outbox.engine.begin() as conn:
                ids = self.outbox.add_many(conn, rows)
            self.committed.extend((i, r["key"]) for i, r in zip(ids, rows, strict=True))

    def produce_in_background(self, n: int, **kw: Any) -> threading.Thread:
        t = threading.Thread(target=self.produce, args=(n,), kwargs=kw, daemon=True)
        t.start()
        return t

    # -- processes ------------------------------------------------------------------------------

    @property
    def source_args(self) -> list[str]:
        """``--source URL --table T`` of this pipeline's outbox, for zeroloss commands."""
        url = self.outbox.engine.url.render_as_string(hide_password=False)
        return ["--source", url, "--table", self.outbox.table.name]

    def start_relay(
        self, relay_id: str = "r0", lease_s: float = 3.0, extra: Sequence[str] = ()
    ) -> subprocess.Popen[bytes]:
        p = start_relay(self.source_args, self.broker_url, f"{self.name}-{relay_id}", self.relay_log, lease_s, extra)
        self.relays.append(p)
        return p

    def start_consumer(self, mode: str = "run", options: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        """A consumer_child.py process; ``options`` as that script takes them (``poison=N`` …)."""
        cmd = [
            sys.executable,
            str(CHILD),
            self.broker_url,
            self.group,
            self.topic,
            PG,
            self.inbox.table.name,
            self.effects.name,
            mode,
            *options,
        ]
        with open(self.consumer_log, "ab") as out:
            p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        self.consumers.append(p)
        return p

    def assignments(self) -> Counter[int]:
        """How many assignments each consumer process has logged (one per rebalance it took part in)."""
        out: Counter[int] = Counter()
        if self.consumer_log.exists():
            for line in self.consumer_log.read_text(errors="replace").splitlines():
                if " assigned [" in line:
                    out[int(line.split()[2])] += 1  # "date time pid logger message"
        return out

    @staticmethod
    def kill(p: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        if p.poll() is None:
            p.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            p.wait(30)

    def stop_all(self) -> None:
        for p in self.relays + self.consumers:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.send_signal(signal.SIGTERM)
        for p in self.relays + self.consumers:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    # -- counting -------------------------------------------------------------------------------

    def delivered(self) -> int:
        from zeroloss.outbox.base import State

        return self.outbox.stats().counts[State.SUCCESS]

    def effect_counts(self) -> Counter[str]:
        with self.inbox.engine.connect() as conn:
            return Counter(r[0] for r in conn.execute(sa.select(self.effects.c.msg_id)))

    def effects_done(self) -> int:
        with self.inbox.engine.connect() as conn:
            q = sa.select(sa.func.count(sa.distinct(self.effects.c.msg_id)))
            return int(conn.execute(q).scalar_one())

    def wait_drained(self, timeout_s: float = 180, expect: int | None = None) -> float:
        """Seconds until every committed message (or ``expect`` of them) has its effect."""
        want = len(self.committed) if expect is None else expect
        try:
            return wait_until(lambda: self.effects_done() >= want, timeout_s, "every effect")
        except AssertionError as exc:
            stats = self.outbox.stats()
            alive = [p.poll() is None for p in self.relays], [p.poll() is None for p in self.consumers]
            raise AssertionError(
                f"{exc}: {self.effects_done()} of {want} effects; outbox "
                f"{ {k.value: v for k, v in stats.counts.items() if v} }, parked {stats.parked}; "
                f"relays/consumers alive {alive}; logs in {self.workdir}"
            ) from exc

    def ledger(
        self,
        scenario: str,
        faults: int,
        drain_s: float,
        notes: str = "",
        *,
        no_effect: Collection[str] = (),
        unordered: Collection[str] = (),
    ) -> Ledger:
        """Count what happened. ``no_effect``: ids that must have no effect (dead letters): not
        lost without one, a violation with one. ``unordered``: ids left out of the per-key order
        check (messages sent again out of order by design, e.g. by ``audit --repair``)."""
        ids = [i for i, _ in self.committed]
        counts = self.effect_counts()
        lost = sum(1 for i in ids if counts[i] == 0 and i not in no_effect)
        violations = sum(1 for i in no_effect if counts[i])
        double = sum(n - 1 for n in counts.values() if n > 1)
        seen = read_topic(self.broker_url, self.topic, expect=ids, idle_s=3)
        # Per key, the order of first effects must be the order the app added them.
        with self.inbox.engine.connect() as conn:
            rows = conn.execute(sa.select(self.effects.c.msg_id).order_by(self.effects.c.n)).scalars().all()
        first: dict[str, int] = {}
        for pos, mid in enumerate(rows):
            first.setdefault(mid, pos)
        by_key: dict[bytes, list[str]] = {}
        for mid, key in self.committed:
            if mid not in unordered:
                by_key.setdefault(key, []).append(mid)
        out_of_order = sum(
            1 for mids in by_key.values()
            if [m for m in sorted((m for m in mids if m in first), key=first.__getitem__)]
            != [m for m in mids if m in first]
        )  # fmt: skip
        return Ledger(
            scenario, len(ids), faults, lost, seen.duplicates, double, out_of_order, drain_s, notes, violations
        )

    def close(self) -> None:
        self.stop_all()
        self.effects.drop(self.inbox.engine, checkfirst=True)
        self.inbox.drop_schema()
        self.inbox.close()
        self.outbox.drop_schema()
        self.outbox.close()
