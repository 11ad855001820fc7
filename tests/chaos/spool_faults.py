"""Faults of the file spool's own disk: full, files corrupted or truncated, and an application
killed between its database commit and the spool's promotion. Counted from the broker: every
committed message must be on the topic, and nothing that was not committed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from tests.chaos.pipeline import Ledger, Size, broker_ledger, start_relay, wait_until, zeroloss_cli
from zeroloss.embedded_broker import EmbeddedBroker
from zeroloss.errors import SpoolFullError, UnknownMessageError
from zeroloss.message import encode, new_message
from zeroloss.outbox.base import RecoveryReport, Resolver, State
from zeroloss.outbox.spool import FileSpool
from zeroloss.readback import read_topic

WRITER = Path(__file__).with_name("spool_writer.py")


def _spool_relay(root: Path, broker: EmbeddedBroker, work: Path) -> subprocess.Popen[bytes]:
    return start_relay(["--source", f"spool://{root}"], broker.url, f"spool-{uuid.uuid4().hex[:8]}", work / "relay.log")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _delivered(root: Path) -> int:
    return len(os.listdir(root / State.SUCCESS.value))


def _status(root: Path) -> tuple[int, dict[str, object]]:
    code, out, err = zeroloss_cli("status", "--source", f"spool://{root}", "--json", timeout_s=60)
    try:
        return code, json.loads(out)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"zeroloss status exited {code}: {err.strip()[-1000:]}") from exc


# -- (c) disk full ---------------------------------------------------------------------------------


class CannotMount(RuntimeError):
    """This machine does not let us mount a tmpfs (not root, or a container without the right)."""


@contextlib.contextmanager
def small_tmpfs(mnt: Path, size: str = "2m") -> Iterator[Path]:
    """A real, small filesystem, so ENOSPC comes from the kernel (needs root)."""
    mnt.mkdir()
    if os.geteuid() != 0:
        raise CannotMount("the disk-full scenario mounts a tmpfs: it needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise CannotMount(f"mount -t tmpfs failed: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=True)


def disk_full(broker: EmbeddedBroker, work: Path, size: Size) -> Ledger:
    """The app writes orders (a database row and 5 messages each, in one transaction) into a spool
    on a 2 MiB tmpfs, with a relay running, until ``add`` raises SpoolFullError. That order's
    transaction must roll back entirely; every order before it must be intact; once space is
    freed the same order commits and the relay delivers every committed message."""
    topic = f"chaos-full-{uuid.uuid4().hex[:10]}"
    problems: list[str] = []
    with small_tmpfs(work / "mnt") as mnt:
        root = mnt / "spool"
        spool = FileSpool(root)
        db = sqlite3.connect(work / "app.db", isolation_level=None)  # the app's own database, elsewhere
        db.execute("create table orders (n integer primary key, ids text not null)")
        relay = _spool_relay(root, broker, work)
        committed: list[tuple[str, bytes | None]] = []
        values: dict[str, bytes] = {}
        try:
            written: list[str] = []

            def order(n: int) -> None:
                """One business transaction, the spool block outside the database transaction."""
                written.clear()
                key = b"k%d" % (n % 17)
                batch = []
                with spool.transaction(f"order-{n}") as tx:
                    db.execute("begin")
                    try:
                        db.execute("insert into orders values (?, '')", (n,))
                        for j in range(5):
                            value = b"order %d line %d " % (n, j) + b"x" * 900
                            mid = tx.add(topic=topic, value=value, key=key)
                            written.append(mid)
                            batch.append((mid, value))
                        db.execute("update orders set ids = ? where n = ?", (" ".join(written), n))
                    except BaseException:
                        db.execute("rollback")
                        raise
                    db.execute("commit")
                committed.extend((mid, key) for mid, _ in batch)
                values.update(batch)

            vfs = os.statvfs(mnt)
            filler = mnt / "filler"
            filler.write_bytes(b"\0" * (vfs.f_bavail * vfs.f_frsize - 400_000))  # room for ~20 orders
            n = 0
            error: SpoolFullError | None = None
            while error is None and n < 10_000:
                try:
                    order(n)
                    n += 1
                except SpoolFullError as exc:
                    error = exc
            if error is None:
                raise AssertionError("the spool never filled up")
            full_at, partial = n, len(written)
            # The failed order left nothing: no row, no file of its transaction anywhere.
            if db.execute("select count(*) from orders where n = ?", (n,)).fetchone()[0]:
                problems.append(f"order {n}'s row committed without its messages")
            leftovers = [f for s in State for f in os.listdir(root / s.value) if f".order-{n}." in f]
            for mid in written:
                with contextlib.suppress(UnknownMessageError):
                    spool.get(mid)
                    leftovers.append(mid)
            if leftovers:
                problems.append(f"rolled-back order {n} left {leftovers}")
            # Everything committed before it: present, decodable, unchanged.
            damaged = 0
            for mid, _ in committed:
                try:
                    state, msg = spool.get(mid)
                    damaged += state not in (State.PENDING, State.SENDING, State.SUCCESS) or msg.value != values[mid]
                except Exception:
                    damaged += 1
            if damaged:
                problems.append(f"{damaged} committed message(s) missing or damaged after the disk filled")
            intact = len(committed) - damaged
            if not (error.retriable and "out of disk space" in str(error) and "roll back" in str(error)):
                problems.append(f"unclear error: {error}")
            rows = db.execute("select count(*) from orders").fetchone()[0]
            if rows * 5 != len(committed):
                problems.append(f"{rows} order rows for {len(committed)} messages")
            code, status = _status(root)
            used = status.get("disk_used_pct")
            if code != 2:
                problems.append(f"status exit {code} with the disk full")
            # An operator frees space; the app retries the same order, and goes on.
            filler.unlink()
            for m in range(full_at, 2 * full_at + 1):
                order(m)
            t = time.monotonic()
            wait_until(lambda: _delivered(root) >= len(committed), 120, "the relay to deliver everything")
            drain = time.monotonic() - t
        finally:
            _stop(relay)
            spool.close()
            db.close()
    notes = (
        f"2 MiB tmpfs full after {full_at} orders: order {full_at} failed at message {partial + 1} of 5 with "
        f"SpoolFullError ('out of disk space (No space left on device) ... roll back the application's "
        f"transaction'), its row and tmp files rolled back; the {intact} committed before intact; status exit "
        f"{code} at {used}% used; after freeing space the same order committed, {full_at} more followed; "
        f"relay delivered all"
    )
    return broker_ledger(
        "spool disk full (tmpfs), app transaction rolled back", broker.url, topic, committed, 1, drain, notes, problems
    )


# -- (d) corrupted and truncated files ---------------------------------------------------------------


def _plant(pending: Path, round_no: int, topic: str) -> tuple[int, set[str]]:
    """Five bad files in ``pending/``: truncated, bit-flipped, empty, a foreign name, and a name
    whose content is another message. Returns how many, and the ids they carry."""
    ids: set[str] = set()
    msgs = [new_message(topic, b"planted %d/%d" % (round_no, i), b"k%d" % i) for i in range(5)]
    ids.update(m.id for m in msgs)
    data = encode(msgs[0])
    (pending / f"{msgs[0].id}.zlm").write_bytes(data[: len(data) // 2])
    flipped = bytearray(encode(msgs[1]))
    flipped[-5] ^= 0x20
    (pending / f"{msgs[1].id}.zlm").write_bytes(bytes(flipped))
    (pending / f"{msgs[2].id}.zlm").write_bytes(b"")
    (pending / f"notes-{round_no}.txt").write_text("an editor's backup, not a message")
    (pending / f"{msgs[3].id}.zlm").write_bytes(encode(msgs[4]))  # intact, but not the message its name says
    return 5, ids


def corrupted_files(broker: EmbeddedBroker, work: Path, size: Size) -> Ledger:
    """Bad files planted in ``pending/`` while the app writes and the relay sends: quarantined to
    ``malformed/``, counted by ``zeroloss status``, never sent; the good ones all delivered."""
    topic = f"chaos-bad-{uuid.uuid4().hex[:10]}"
    root = work / "spool"
    spool = FileSpool(root)
    relay = _spool_relay(root, broker, work)
    committed: list[tuple[str, bytes | None]] = []
    planted, bad_ids = 0, set()
    n = size.messages // 5
    problems: list[str] = []
    try:
        for start in range(0, n, 50):
            with spool.transaction() as tx:
                committed.extend(
                    (tx.add(topic=topic, value=b"%d" % i, key=b"k%d" % (i % 17)), b"k%d" % (i % 17))
                    for i in range(start, min(n, start + 50))
                )
            if (start // 50) % max(1, n // 50 // size.kills) == 0 and planted < 5 * size.kills:
                got, ids = _plant(root / "pending", start, topic)
                planted += got
                bad_ids |= ids
        t = time.monotonic()
        wait_until(
            lambda: _delivered(root) >= len(committed) and not os.listdir(root / "pending"),
            120,
            "the relay to deliver the good ones",
        )
        drain = time.monotonic() - t
        code, status = _status(root)
        counts = status.get("counts", {})
        malformed = counts.get("malformed") if isinstance(counts, dict) else None
        if malformed != planted:
            problems.append(f"status counts {malformed} malformed, {planted} were planted")
        if code != 2:
            problems.append(f"status exit {code} with malformed files")
    finally:
        _stop(relay)
        spool.close()
    on_broker = set(read_topic(broker.url, topic, idle_s=2).ids) & bad_ids
    if on_broker:
        problems.append(f"{len(on_broker)} planted message(s) reached the broker")
    notes = (
        f"{planted} bad files planted in pending/ in {size.kills} rounds (truncated, bit-flipped, empty, "
        f"foreign name, name/content mismatch): status exit {code} counts {malformed} malformed, none sent; "
        f"the {len(committed)} good ones delivered"
    )
    return broker_ledger(
        "corrupted and truncated spool files", broker.url, topic, committed, planted, drain, notes, problems
    )


# -- (e) crash between the app's commit and the spool's promotion -------------------------------------


class _Journal:
    """The writer's journal is the app's database: a transaction committed iff its line is there."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.txids: dict[str, list[str]] = {}
        self._read = 0

    def refresh(self) -> dict[str, list[str]]:
        if not self.path.exists():
            return self.txids
        with open(self.path, "rb") as f:
            f.seek(self._read)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line the kill cut short is not a commit
        for line in data[:end].decode().splitlines():
            txid, *ids = line.split()
            self.txids[txid] = ids
        self._read += end
        return self.txids

    def __call__(self, txid: str) -> bool:
        """The resolver: did this transaction commit?"""
        return txid in self.txids or txid in self.refresh()


class _CountingSpool(FileSpool):
    """Adds up what recover() did, for the ledger's notes."""

    totals = RecoveryReport()

    def recover(self, resolver: Resolver | None = None) -> RecoveryReport:
        r = super().recover(resolver)
        self.totals.promoted += r.promoted
        self.totals.discarded += r.discarded
        self.totals.doubt += r.doubt
        return r


def _copy_tmp(src: Path, dst: Path) -> int:
    """Copy the tmp/ files that are still there (the relay may resolve some meanwhile)."""
    (dst / "tmp").mkdir(parents=True)
    n = 0
    for name in os.listdir(src / "tmp"):
        with contextlib.suppress(FileNotFoundError):
            (dst / "tmp" / name).write_bytes((src / "tmp" / name).read_bytes())
            n += 1
    return n


def crash_before_promotion(broker: EmbeddedBroker, work: Path, size: Size) -> Ledger:
    """A writer process (4 threads, 3 messages per transaction, the journal as its database) is
    SIGKILLed ``kills`` times mid-stream; in every run one transaction commits and then hangs before
    the spool promotes it. A relay with the app's resolver runs throughout: recover(resolver)
    sends the committed tmp files and discards the rolled-back ones; on a copy, recover() without
    a resolver must move all of them to doubt/ and promote none."""
    from zeroloss.registry import open_broker
    from zeroloss.relay import Relay, RelaySettings

    topic = f"chaos-crash-{uuid.uuid4().hex[:10]}"
    root, journal = work / "spool", _Journal(work / "journal")
    spool = _CountingSpool(root, tmp_grace_s=10)  # longer than any live transaction of the writer
    spool.totals = RecoveryReport()
    kafka = open_broker(broker.url, relay_id=f"crash-{uuid.uuid4().hex[:8]}", timeout_s=5)
    relay = Relay(
        spool, kafka, RelaySettings(batch_size=200, lease_s=5, recover_every_s=1, max_backoff_s=2), resolver=journal
    )
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    per_run = max(300, size.messages // 5 // size.kills)
    problems: list[str] = []
    doubt_checked = ""
    try:
        for run in range(size.kills):
            hang_after = per_run // 12
            with open(work / "writer.log", "ab") as log:
                writer = subprocess.Popen(
                    [sys.executable, str(WRITER), str(root), str(journal.path), topic, f"r{run}", str(hang_after)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            start = len(journal.refresh())
            try:
                wait_until(
                    lambda: (
                        len(journal.refresh()) - start >= per_run // 3  # noqa: B023
                        and f"r{run}-0-{hang_after}" in journal.txids  # noqa: B023
                    ),
                    120,
                    "the writer to commit, and hang after one commit",
                )
            finally:
                os.kill(writer.pid, signal.SIGKILL)
                writer.wait()
            if run == 0:  # the same crash, recovered without a resolver
                copied = _copy_tmp(root, work / "copy")
                other = FileSpool(work / "copy", tmp_grace_s=0)
                r = other.recover()
                sent = len(os.listdir(work / "copy" / "pending"))
                other.close()
                doubt_checked = f"without a resolver {r.doubt} of {copied} tmp files went to doubt/, {sent} to pending"
                if r.doubt != copied or sent:
                    problems.append(doubt_checked)
        committed_txids = journal.refresh()
        committed = [(mid, txid.rsplit("-", 1)[0].encode()) for txid, ids in committed_txids.items() for mid in ids]
        t = time.monotonic()
        wait_until(
            lambda: _delivered(root) >= len(committed) and not os.listdir(root / "tmp"),
            120,
            "the relay to resolve every tmp file and deliver every committed message",
        )
        drain = time.monotonic() - t
    finally:
        relay.stop()
        thread.join(30)
        kafka.close()
        spool.close()
    tot = spool.totals
    notes = (
        f"writer SIGKILLed {size.kills}x mid-transaction ({len(committed_txids)} transactions committed): "
        f"recover(resolver) promoted {tot.promoted} committed-but-unpromoted, discarded {tot.discarded} "
        f"rolled back, doubt {tot.doubt}; {doubt_checked}"
    )
    if tot.doubt:
        problems.append(f"{tot.doubt} to doubt/ although the resolver knew")
    if tot.promoted < 3 * size.kills:
        problems.append(f"only {tot.promoted} promoted by recover(), expected at least {3 * size.kills}")
    return broker_ledger(
        "app killed between commit and spool promotion",
        broker.url,
        topic,
        committed,
        size.kills,
        drain,
        notes,
        problems,
    )
