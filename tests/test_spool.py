"""File-spool behaviour beyond the OutboxStore contract: tmp files, crashes, disk full, group commit."""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.spool_helpers import add, all_ids, files, fsync_fails_once, fsynced_inodes, small_tmpfs  # noqa: F401  (a fixture)
from tests.waiting import wait_until
from zeroloss.errors import ConfigError, MessageError, SpoolFullError, StoreError, UnknownMessageError
from zeroloss.message import decode, encode, new_message
from zeroloss.outbox import _fsync
from zeroloss.outbox.base import Delivered, State
from zeroloss.outbox.spool import FileSpool


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[FileSpool]:
    s = FileSpool(tmp_path / "spool")
    yield s
    s.close()


def age(path: str | Path, seconds: float = 3600) -> None:
    """Make a file look old instead of sleeping past a grace period."""
    past = time.time() - seconds
    os.utime(path, (past, past))


# ---- producer side -----------------------------------------------------------------------


def test_directories_are_the_state_names_and_stats_count_every_state(spool: FileSpool) -> None:
    assert sorted(os.listdir(spool.root)) == sorted(s.value for s in State)
    stats = spool.stats()
    assert stats.counts == {s: 0 for s in State}
    assert stats.oldest_pending_age_s is None
    assert stats.disk_total_bytes and stats.disk_free_bytes is not None


def test_tmp_files_are_invisible_to_claim_until_the_block_exits(spool: FileSpool) -> None:
    with spool.transaction("order-17") as tx:
        assert tx.id == "order-17"
        a = tx.add(topic="t", value=b"a")
        b = tx.add(topic="t", value=b"b", key=b"k", headers={"h": b"1"})
        assert files(spool, State.TMP) == sorted([f"{a}.order-17.zlm", f"{b}.order-17.zlm"])
        assert spool.claim(10, lease_s=30) == []
        assert spool.get(a)[0] is State.TMP
        assert spool.stats().counts[State.TMP] == 2
    assert files(spool, State.TMP) == []
    assert files(spool, State.PENDING) == [f"{a}.zlm", f"{b}.zlm"]
    assert [m.id for m in spool.claim(10, lease_s=30)] == [a, b]


def test_an_exception_in_the_block_removes_its_tmp_files(spool: FileSpool) -> None:
    kept = add(spool)
    with pytest.raises(RuntimeError, match="rollback"), spool.transaction() as tx:
        gone = tx.add(topic="t", value=b"x")
        assert len(files(spool, State.TMP)) == 1
        raise RuntimeError("rollback")
    assert files(spool, State.TMP) == []
    assert files(spool, State.PENDING) == [f"{kept}.zlm"]
    with pytest.raises(UnknownMessageError, match=gone):
        spool.get(gone)


def test_bad_messages_and_bad_txids_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    spool = FileSpool(tmp_path / "s", max_message_bytes=10)
    with pytest.raises(MessageError, match="exceeds the limit of 10"), spool.transaction() as tx:
        tx.add(topic="t", value=b"x" * 11)
    with pytest.raises(MessageError, match="topic"), spool.transaction() as tx:
        tx.add(topic="no/slash", value=b"x")
    with pytest.raises(StoreError, match="transaction id"):
        spool.transaction("a.b")
    assert all_ids(spool.root) == []
    with spool.transaction() as tx:
        pass
    with pytest.raises(StoreError, match="outside its with-block"):
        tx.add(topic="t", value=b"late")
    spool.close()
    with pytest.raises(StoreError, match="closed"):
        spool.stats()


# ---- recover: tmp files, leases, duplicates ------------------------------------------------


def _crashed_transaction(spool: FileSpool, txid: str, n: int = 2) -> list[str]:
    """Tmp files of a transaction whose process died before the block exited, made old."""
    tx = spool.transaction(txid).__enter__()
    ids = [tx.add(topic="t", value=b"%d" % i) for i in range(n)]
    for mid in ids:
        age(os.path.join(spool.root, "tmp", f"{mid}.{txid}.zlm"))
    return ids


def test_recover_resolves_tmp_files_with_the_resolver(spool: FileSpool) -> None:
    committed = _crashed_transaction(spool, "tx-commit")
    rolled_back = _crashed_transaction(spool, "tx-rollback")
    unknown = _crashed_transaction(spool, "tx-unknown")
    with spool.transaction("tx-live") as live:  # young tmp files: a live transaction, left alone
        live_id = live.add(topic="t", value=b"live")
        asked: list[str] = []

        def resolver(txid: str) -> bool | None:
            asked.append(txid)
            return {"tx-commit": True, "tx-rollback": False}.get(txid)

        report = spool.recover(resolver)
        assert (report.promoted, report.discarded, report.doubt, report.malformed) == (2, 2, 2, 0)
        assert sorted(asked) == ["tx-commit", "tx-rollback", "tx-unknown"]  # once per transaction
        assert spool.get(live_id)[0] is State.TMP
    assert [spool.get(m)[0] for m in committed] == [State.PENDING] * 2
    assert [spool.get(m)[0] for m in unknown] == [State.DOUBT] * 2
    assert spool.get(live_id)[0] is State.PENDING
    assert files(spool, State.DOUBT) == sorted(f"{m}.tx-unknown.zlm" for m in unknown)
    for mid in rolled_back:
        with pytest.raises(UnknownMessageError):
            spool.get(mid)
    again = spool.recover(resolver)  # idempotent
    assert (again.promoted, again.discarded, again.doubt, again.lease_expired) == (0, 0, 0, 0)
    # An operator who checked the app's database requeues the doubtful ones.
    assert spool.requeue(unknown) == 2
    assert {m.id for m in spool.claim(10, lease_s=30)} == {*committed, *unknown, live_id}


def test_recover_without_a_resolver_moves_old_tmp_files_to_doubt(spool: FileSpool) -> None:
    ids = _crashed_transaction(spool, "tx1")
    assert spool.recover().doubt == 2
    assert spool.stats().counts[State.DOUBT] == 2
    assert [m.id for m in spool.list(State.DOUBT)] == ids
    assert spool.claim(10, lease_s=30) == []


def test_a_doubt_message_parks_its_key_like_failed(spool: FileSpool) -> None:
    # A doubt message may have committed: sending its key's later messages first would reorder the
    # key once an operator requeues it. Other keys and keyless messages go on.
    tx = spool.transaction("tx-crashed").__enter__()
    doubtful = tx.add(topic="t", value=b"first", key=b"k")
    age(os.path.join(spool.root, "tmp", f"{doubtful}.tx-crashed.zlm"))
    later = add(spool, b"second", key=b"k")
    other, keyless = add(spool, b"other", key=b"j"), add(spool, b"keyless")
    assert spool.recover().doubt == 1
    assert sorted(m.id for m in spool.claim(10, lease_s=30)) == sorted([other, keyless])
    assert spool.get(later)[0] is State.PENDING
    assert spool.stats().parked == 1  # status shows it waits behind the doubt message
    assert spool.requeue([doubtful]) == 1  # the operator found the transaction committed
    assert [m.id for m in spool.claim(10, lease_s=30)] == [doubtful, later]  # in key order


def test_a_crash_leftover_the_resolver_cannot_settle_still_blocks_its_key(spool: FileSpool) -> None:
    """Committed (the app says so later) but left in tmp/ by a crash: while the resolver cannot
    answer, the key's later messages wait, as behind a doubt message; a young tmp file (a
    transaction still running) blocks nothing."""
    tx = spool.transaction("tx-crashed").__enter__()
    first = tx.add(topic="t", value=b"first", key=b"A")
    age(os.path.join(spool.root, "tmp", f"{first}.tx-crashed.zlm"))
    live = spool.transaction("tx-live").__enter__()
    live.add(topic="t", value=b"running", key=b"B")
    second, other = add(spool, b"second", key=b"A"), add(spool, b"other", key=b"B")

    def down(txid: str) -> bool | None:
        raise ConnectionError("the app's database is down")

    assert spool.recover(down).promoted == 0
    assert [m.id for m in spool.claim(10, lease_s=30)] == [other]
    assert spool.get(second)[0] is State.PENDING
    assert spool.recover(lambda txid: True).promoted == 1
    assert [m.id for m in spool.claim(10, lease_s=30)] == [first, second]


def test_a_transaction_slower_than_tmp_grace_takes_its_messages_back(tmp_path: Path) -> None:
    spool = FileSpool(tmp_path / "s", tmp_grace_s=0)
    with spool.transaction("slow") as tx:
        mid = tx.add(topic="t", value=b"x")
        assert spool.recover().doubt == 1  # recover() ran while the app's transaction was open
    assert spool.get(mid)[0] is State.PENDING  # the block exited normally: it committed
    with pytest.raises(StoreError, match="tmp_grace_s"), spool.transaction("slower") as tx:
        tx.add(topic="t", value=b"y")
        assert spool.recover(lambda txid: False).discarded == 1  # a resolver asked too early
    spool.close()


def test_truncated_bit_flipped_and_foreign_files_are_quarantined_and_counted(spool: FileSpool) -> None:
    pending = Path(spool.root) / "pending"
    bad = [new_message("t", b"truncated"), new_message("t", b"bit-flipped")]  # older than the good ones
    good = [add(spool, b"good%d" % i) for i in range(3)]
    (pending / f"{bad[0].id}.zlm").write_bytes(encode(bad[0])[:-4])
    flipped = bytearray(encode(bad[1]))
    flipped[-3] ^= 0x10
    (pending / f"{bad[1].id}.zlm").write_bytes(bytes(flipped))
    (pending / "notes.txt").write_text("not a message")
    report = spool.recover()
    assert report.malformed == 3
    assert spool.stats().counts[State.MALFORMED] == 3
    assert len(spool.malformed_paths()) == 3
    with pytest.raises(Exception, match="quarantined"):
        spool.get(bad[0].id)
    # The same files found by claim() instead of recover(): quarantined, good ones still claimed.
    for p in spool.malformed_paths():
        shutil.move(p, pending / os.path.basename(p))
    assert [m.id for m in spool.claim(10, lease_s=30)] == good
    assert files(spool, State.PENDING) == []
    assert spool.stats().counts[State.MALFORMED] == 3


def test_duplicates_keep_the_copy_that_wins_by_precedence(spool: FileSpool) -> None:
    a, b = add(spool, b"a"), add(spool, b"b")
    root = Path(spool.root)
    future_ms = int((time.time() + 3600) * 1000)
    shutil.copy(root / "pending" / f"{a}.zlm", root / "sending" / f"{a}.{future_ms}.zlm")
    shutil.copy(root / "pending" / f"{b}.zlm", root / "failed" / f"{b}.zlm")
    shutil.copy(root / "pending" / f"{b}.zlm", root / "doubt" / f"{b}.tx.zlm")
    report = spool.recover()
    assert report.lease_expired == 0
    assert spool.get(a)[0] is State.PENDING  # pending beats a stale sending copy
    assert spool.get(b)[0] is State.FAILED  # failed was decided later than any pending copy
    assert sorted(all_ids(root)) == sorted([a, b])


def test_recover_leaves_alone_a_file_another_relay_claimed_while_it_listed(
    spool: FileSpool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relays on one spool run recover() while others claim. A file renamed pending/ → sending/
    between recover's directory listings shows up in both; it is one file, not a duplicate, and
    deleting the sending/ name would lose a message the other relay is publishing. (relay.lock
    keeps a second relay out; where the lock is not shared, e.g. two hosts on a network
    filesystem, recover must still be safe, so the lock is bypassed here.)"""
    mid = add(spool)
    other = FileSpool(spool.root)  # a second relay process on the same spool
    monkeypatch.setattr(other, "_relay_lock", lambda: None)
    pending_names = spool._pending_names

    def stale_listing(quarantine: bool = False) -> list[tuple[str, str]]:
        listed = pending_names(quarantine)  # pending/ is listed, then the other relay claims before sending/ is
        assert [m.id for m in other.claim(1, lease_s=60)] == [mid]
        return listed

    monkeypatch.setattr(spool, "_pending_names", stale_listing)
    spool.recover()
    monkeypatch.setattr(spool, "_pending_names", pending_names)
    assert spool.get(mid)[0] is State.SENDING  # the other relay's claim survived
    other.close()


def test_an_interrupted_rewrite_leaves_the_original_and_its_part_file_is_cleaned(spool: FileSpool) -> None:
    mid = add(spool)
    [msg] = spool.claim(1, lease_s=0)  # a lease that has already run out
    part = Path(spool.root) / "tmp" / f"{mid}.~123-abcd.part"
    part.write_bytes(encode(replace(msg, attempts=1))[:10])  # the relay died while writing it
    age(part)
    report = spool.recover()
    assert (report.lease_expired, report.malformed) == (1, 0)
    assert not part.exists()
    assert spool.get(mid) == (State.PENDING, msg)


# ---- relay side --------------------------------------------------------------------------


def test_the_lease_is_in_the_sending_file_name(spool: FileSpool) -> None:
    a, b = add(spool), add(spool)
    before = time.time()
    [m] = spool.claim(1, lease_s=30)
    after = time.time()
    [name] = files(spool, State.SENDING)
    mid, lease_ms, suffix = name.split(".")
    assert (mid, suffix) == (a, "zlm")
    assert (before + 30) * 1000 - 1 <= int(lease_ms) <= (after + 30) * 1000
    assert spool.stats().expired_leases == 0
    spool.claim(1, lease_s=0)
    assert spool.stats().expired_leases == 1
    assert spool.recover().lease_expired == 1
    assert spool.get(b)[0] is State.PENDING and spool.get(m.id)[0] is State.SENDING


def test_success_records_the_location_and_ages_by_success_time(spool: FileSpool) -> None:
    a, b = add(spool), add(spool)
    ma, mb = spool.claim(2, lease_s=30)
    long_location = "x" * 300 + "/1/2"
    spool.succeed([Delivered(ma, "orders/2/1543"), Delivered(mb, long_location)])
    assert files(spool, State.SUCCESS)[0] == f"{a}.orders%2F2%2F1543.zlm"
    assert spool.location(a) == "orders/2/1543"
    assert long_location.startswith(spool.location(b)) and len(spool.location(b)) > 200
    assert all(len(n) <= 255 for n in files(spool, State.SUCCESS))
    age(Path(spool.root) / "success" / files(spool, State.SUCCESS)[0])
    assert spool.purge_success(older_than_s=60) == 1
    assert [m.id for m in spool.list(State.SUCCESS)] == [b]


def test_retry_and_fail_rewrite_the_one_copy(spool: FileSpool) -> None:
    a, b = add(spool, key=b"K"), add(spool, key=b"K")
    [ma] = spool.claim(1, lease_s=30)
    assert spool.claim(10, lease_s=30) == []  # b waits behind a, which is sending
    spool.retry([replace(ma, attempts=1, not_before=time.time() - 1, last_error="e1")])
    [ma] = spool.claim(1, lease_s=30)
    assert (ma.attempts, ma.last_error) == (1, "e1")
    spool.fail([replace(ma, attempts=2, last_error="e2")])
    assert spool.get(a)[1].last_error == "e2"
    assert spool.stats().parked == 1
    assert sorted(all_ids(spool.root)) == sorted([a, b])
    with pytest.raises(UnknownMessageError, match=b):  # b is pending: nothing moves
        spool.requeue([a, b])
    assert spool.get(a)[0] is State.FAILED
    spool.succeed([Delivered(ma, "t/0/0")])  # not in sending any more: ignored, logged
    assert spool.get(a)[0] is State.FAILED


# ---- disk full ---------------------------------------------------------------------------


def test_disk_full_raises_spool_full_and_keeps_what_was_committed(small_tmpfs: Path) -> None:  # noqa: F811
    spool = FileSpool(small_tmpfs / "spool")
    committed = [add(spool, b"committed %d" % i) for i in range(3)]
    vfs = os.statvfs(small_tmpfs)
    filler = small_tmpfs / "filler"
    filler.write_bytes(b"\0" * (vfs.f_bavail * vfs.f_frsize - 150_000))  # leave room for one message

    def two_big_messages() -> list[str]:
        with spool.transaction() as tx:
            return [tx.add(topic="t", value=bytes([i]) * 100_000) for i in range(2)]

    with pytest.raises(SpoolFullError, match="roll back") as err:
        two_big_messages()
    assert err.value.retriable and str(spool.root) in str(err.value)
    assert files(spool, State.TMP) == []  # neither the written one nor the partial one
    assert files(spool, State.PENDING) == sorted(f"{m}.zlm" for m in committed)
    assert [spool.get(m)[1].value for m in committed] == [b"committed %d" % i for i in range(3)]
    filler.unlink()
    big = two_big_messages()
    assert [m.id for m in spool.claim(10, lease_s=30)] == [*committed, *big]
    spool.close()


# ---- concurrency and group commit --------------------------------------------------------


def test_concurrent_transactions_share_directory_fsyncs(spool: FileSpool) -> None:
    threads, per_thread = 16, 50
    ids: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def producer(n: int) -> None:
        try:
            start.wait()
            for i in range(per_thread):
                ids.append(add(spool, b"%d-%d" % (n, i), key=b"%d" % n))
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=producer, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    transactions = threads * per_thread
    assert files(spool, State.PENDING) == sorted(f"{m}.zlm" for m in ids)
    assert len(set(ids)) == transactions and sorted(all_ids(spool.root)) == sorted(ids)
    promote = spool.promote_sync  # pending/ then tmp/, one wait per promotion
    assert promote.requests == transactions
    assert 0 < promote.fsyncs < transactions
    assert spool.dir_syncs[State.PENDING].requests == 0
    assert spool.dir_syncs[State.TMP].requests == transactions  # the add's: the name before the commit
    assert spool.dir_syncs[State.TMP].fsyncs < spool.dir_syncs[State.TMP].requests


def test_stats_count_the_promotions_directory_fsyncs_too(spool: FileSpool) -> None:
    for _ in range(10):  # one at a time: nothing shared, every request is an fsync
        add(spool)
    extra = spool.stats().extra  # tmp/ before each commit, then pending/ and tmp/ for each promotion
    assert extra["dir_fsync_requests"] == extra["dir_fsyncs"] == 30


def test_group_sync_covers_each_caller_with_an_fsync_that_started_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = itertools.count()  # next() is atomic under the GIL: a global order of events
    fsyncs: list[tuple[int, int]] = []
    calls: list[tuple[int, int]] = []
    gate = threading.Event()

    def slow_fsync(fd: int) -> None:
        started = next(clock)
        gate.wait(0.002)  # stay in flight a moment so others pile up behind this fsync
        fsyncs.append((started, next(clock)))

    monkeypatch.setattr(os, "fsync", slow_fsync)
    fd = os.open(tmp_path, os.O_RDONLY)
    sync = _fsync.GroupSync(fd, window_s=0.001)

    def caller() -> None:
        for _ in range(20):
            arrived = next(clock)
            sync.sync(linger=True)
            calls.append((arrived, next(clock)))

    workers = [threading.Thread(target=caller) for _ in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    os.close(fd)
    assert len(calls) == sync.requests == 160
    for arrived, returned in calls:
        assert any(arrived < s and e < returned for s, e in fsyncs), (arrived, returned)
    assert len(fsyncs) == sync.fsyncs < 160


def test_group_sync_reports_a_failed_fsync_to_every_caller_it_covered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    fd = os.open(tmp_path, os.O_RDONLY)
    sync = _fsync.GroupSync(fd)
    with pytest.raises(OSError, match="directory fsync failed"):
        sync.sync()
    monkeypatch.undo()
    sync.sync()  # the next fsync works again
    os.close(fd)
    assert sync.fsyncs == 2


def test_group_sync_of_several_directories_fsyncs_each_in_order_and_fails_as_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "b").mkdir()
    a, b = os.open(tmp_path, os.O_RDONLY), os.open(tmp_path / "b", os.O_RDONLY)
    seen: list[int] = []
    real_fsync = os.fsync

    def recording(fd: int) -> None:
        seen.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    sync = _fsync.GroupSync((a, b))
    sync.sync()
    sync.sync()
    assert seen == [a, b, a, b] and sync.fsyncs == 2

    def second_fails(fd: int) -> None:
        seen.append(fd)
        if fd == b:
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", second_fails)
    with pytest.raises(OSError, match="directory fsync failed: Input/output error"):
        sync.sync()  # the first directory's fsync worked: the generation failed all the same
    monkeypatch.undo()
    os.close(a)
    os.close(b)


def test_group_sync_reports_a_failure_to_the_callers_that_waited_while_it_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writeback error is reported once per open file: the next generation's fsync succeeds,
    yet the failed one may have been writing out the renames of those waiting for it to end
    (main's GroupSync told 7 of these 8 callers their renames were durable)."""
    fd = os.open(tmp_path, os.O_RDONLY)
    sync = _fsync.GroupSync(fd)
    real_fsync = os.fsync
    calls = itertools.count()

    def fails_once(fd: int) -> None:
        if next(calls) == 0:
            wait_until(lambda: sync.requests == 8, what="every caller waiting")
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fails_once)
    told: list[str] = []

    def caller() -> None:
        try:
            sync.sync()
            told.append("durable")
        except OSError:
            told.append("error")

    first = threading.Thread(target=caller)
    first.start()
    wait_until(lambda: sync.requests == 1, what="the first caller leading")
    others = [threading.Thread(target=caller) for _ in range(7)]
    for t in others:
        t.start()
    for t in [first, *others]:
        t.join()
    monkeypatch.undo()
    os.close(fd)
    assert told == ["error"] * 8
    assert sync.fsyncs == 2


def test_group_sync_reports_a_failure_that_finished_after_the_mark(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)
    sync = _fsync.GroupSync(fd)
    sync.sync()
    mark = sync.mark()  # this caller's changes come after it

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError):
        sync.sync()  # another caller's fsync fails while writing out our changes too
    monkeypatch.undo()
    with pytest.raises(OSError, match="directory fsync failed: Input/output error"):
        sync.sync(since=mark)  # its own fsync succeeds, and proves nothing about them
    sync.sync(since=sync.mark())  # changes made after the failure: fine
    sync.sync()
    os.close(fd)
    assert sync.fsyncs == 5


@pytest.mark.parametrize("fails", ["always", "once"])
def test_a_failed_promotion_fsync_fails_every_writer_waiting_on_it(
    spool: FileSpool, monkeypatch: pytest.MonkeyPatch, fails: str
) -> None:
    """ "once" is Linux's way: a writeback error is reported to one fsync of an open file, and the
    next fsync succeeds although the renames it was writing out may be lost."""
    writers = 8
    pending_fd = spool._promote_fds[0]  # the promotion's own descriptor of pending/
    real_fsync = os.fsync
    failures = itertools.count()

    def broken_pending(fd: int) -> None:
        if fd == pending_fd and (fails == "always" or next(failures) == 0):
            # Hold the first failing fsync until every writer has asked for one: the other
            # seven then wait for the next generation while this one is writing their renames.
            wait_until(lambda: spool.promote_sync.requests == writers, what="every writer promoting")
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", broken_pending)
    outcomes: list[object] = []

    def writer(n: int) -> None:
        try:
            outcomes.append(add(spool, b"%d" % n))
        except StoreError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.undo()
    assert len(outcomes) == writers
    for outcome in outcomes:  # nobody was told its message is safely pending
        assert isinstance(outcome, StoreError) and not outcome.retriable, outcome
        assert "committed but promoting its messages failed" in str(outcome)
        assert "Input/output error" in str(outcome)
    assert spool.promote_sync.fsyncs == 2  # the leader's, then one for the seven followers


class _WritebackErrors:
    """os.fsync with Linux's writeback-error rule (errseq_t): an error is recorded on the inode
    and reported once to each open file description that fsyncs it afterwards — a second fsync
    of the same descriptor succeeds, a fsync of another descriptor of that directory fails."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, before: Callable[[int], None]) -> None:
        self._real = os.fsync
        self._errors: dict[int, int] = {}  # inode → writeback errors so far
        self._seen: dict[int, int] = {}  # descriptor → errors already reported to it
        self._before = before
        monkeypatch.setattr(os, "fsync", self.fsync)

    def fail(self, path: str) -> None:
        """Writing out the directory at ``path`` failed (its blocks may never reach the disk)."""
        ino = os.stat(path).st_ino
        self._errors[ino] = self._errors.get(ino, 0) + 1

    def fsync(self, fd: int) -> None:
        self._before(fd)
        self._real(fd)
        errors = self._errors.get(os.fstat(fd).st_ino, 0)
        if errors > self._seen.get(fd, 0):
            self._seen[fd] = errors
            raise OSError(errno.EIO, "Input/output error")


def test_an_add_hears_of_a_tmp_fsync_failure_a_promotion_was_told_of(
    spool: FileSpool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An add's tmp/ fsync and a promotion's are in two groups: the error of writing out tmp/
    while the add's new name was in it went to the promotion's fsync, and the add's own fsync,
    on the same descriptor, then succeeded — the add returned, the app committed, and a crash
    could leave no file at all (the name was never durable)."""
    tmp_dir = os.path.join(spool.root, State.TMP.value)
    tmp_ino = os.stat(tmp_dir).st_ino
    told = threading.Event()

    def before(fd: int) -> None:
        if threading.current_thread().name == "adder" and os.fstat(fd).st_ino == tmp_ino:
            wait_until(told.is_set, what="the promotion's tmp/ fsync told of the error")

    errors = _WritebackErrors(monkeypatch, before)
    outcome: list[object] = []

    def adder() -> None:
        try:
            outcome.append(add(spool, b"a"))
        except StoreError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=adder, name="adder")
    try:
        with (
            pytest.raises(StoreError, match="committed but promoting its messages failed"),
            spool.transaction() as other,
        ):
            other.add(topic="t", value=b"other")
            thread.start()
            wait_until(lambda: spool.dir_syncs[State.TMP].requests == 2, what="the add's tmp/ fsync")
            errors.fail(tmp_dir)  # writing out tmp/, the add's new name in it, failed
            # leaving the block promoted `other`: pending/ then tmp/, and that fsync heard of it
    finally:
        told.set()
        if thread.ident is not None:  # started
            thread.join()
    monkeypatch.undo()
    assert len(outcome) == 1
    assert isinstance(outcome[0], StoreError), f"add returned {outcome[0]} though its name may not be durable"
    assert "writing tmp/" in str(outcome[0]), "told only after the app committed"
    assert "Input/output error" in str(outcome[0])


def test_a_promotion_hears_of_a_pending_fsync_failure_the_relay_was_told_of(
    spool: FileSpool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay's fsyncs of pending/ (claim, recover) and a promotion's are in two groups: the
    error of writing out the promotion's rename must reach the promotion too, not only the
    relay's fsync that happened to run first."""
    pending_dir = os.path.join(spool.root, State.PENDING.value)
    pending_ino = os.stat(pending_dir).st_ino
    told = threading.Event()

    def before(fd: int) -> None:
        if threading.current_thread().name == "promoter" and os.fstat(fd).st_ino == pending_ino:
            wait_until(told.is_set, what="the relay's pending/ fsync told of the error")

    errors = _WritebackErrors(monkeypatch, before)
    outcome: list[object] = []

    def promoter() -> None:
        try:
            outcome.append(add(spool, b"p"))
        except StoreError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=promoter, name="promoter")
    thread.start()
    try:
        wait_until(lambda: spool.promote_sync.requests == 1, what="the promotion's fsync")
        errors.fail(pending_dir)  # writing out pending/, the renamed name in it, failed
        with pytest.raises(OSError, match="Input/output error"):
            spool.dir_syncs[State.PENDING].sync()  # as claim() and recover() sync pending/
    finally:
        told.set()
        thread.join()
    monkeypatch.undo()
    assert len(outcome) == 1
    assert isinstance(outcome[0], StoreError), f"add returned {outcome[0]} though its rename may be lost"
    assert "committed but promoting its messages failed" in str(outcome[0])


@pytest.mark.parametrize("step", ["add", "promotion"])
def test_a_failure_between_a_writers_changes_and_its_fsync_is_reported_to_it(
    spool: FileSpool, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """Another writer's fsync, run after this writer's new name (add) or rename (promotion) and
    before this writer asks for its own, fails and takes the error; this writer's own fsync then
    succeeds. Only the mark it took before its changes tells it (without ``since`` it returned)."""
    state = State.TMP if step == "add" else State.PENDING
    directory = os.path.join(spool.root, state.value)
    failed = threading.Event()

    def in_the_window() -> None:
        if threading.current_thread().name == "writer":
            wait_until(failed.is_set, what="the other writer's failed fsync")

    def before(fd: int) -> None:
        if step == "add" and stat.S_ISREG(os.fstat(fd).st_mode):  # its file's fsync: after the name
            in_the_window()

    errors = _WritebackErrors(monkeypatch, before)
    real_rename = os.rename

    def rename(src: str, dst: str) -> None:
        real_rename(src, dst)
        if step == "promotion" and dst.startswith(directory):
            in_the_window()

    monkeypatch.setattr(os, "rename", rename)
    outcome: list[object] = []

    def writer() -> None:
        try:
            outcome.append(add(spool, b"w"))
        except StoreError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=writer, name="writer")
    thread.start()
    try:
        wait_until(lambda: os.listdir(directory), what=f"the writer's name in {state.value}/")
        errors.fail(directory)  # writing out the directory, the writer's change in it, failed
        with pytest.raises(StoreError, match="Input/output error"):
            add(spool, b"other")  # its fsync of the directory is told
    finally:
        failed.set()
        thread.join()
    monkeypatch.undo()
    assert len(outcome) == 1
    assert isinstance(outcome[0], StoreError), f"add returned {outcome[0]} though its {step} may be lost"
    told = "writing tmp/" if step == "add" else "committed but promoting its messages failed"
    assert told in str(outcome[0])  # an add's error before the app commits, not after
    assert "Input/output error" in str(outcome[0])


# ---- the relay's and the operators' fsyncs: every caller hears of a failure that may cover it --


def _before_its_sync(monkeypatch: pytest.MonkeyPatch, group: _fsync.GroupSync, other: Callable[[], None]) -> None:
    """Run ``other`` once when this thread next asks ``group`` for its fsync: after its changes,
    before its own fsync — where another caller's fsync of the same descriptor can take the
    error of writing them out."""
    caller = threading.get_ident()
    real = group.sync
    ran: list[bool] = []

    def sync(linger: bool = False, since: int | None = None) -> None:
        if threading.get_ident() == caller and not ran:
            ran.append(True)
            other()
        real(linger=linger, since=since)

    monkeypatch.setattr(group, "sync", sync)


def _in_a_thread(name: str, fn: Callable[[], object]) -> object:
    """What ``fn`` returned or raised, run to its end in a thread called ``name``."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(fn())
        except Exception as exc:  # what it raised is the outcome
            outcome.append(exc)

    thread = threading.Thread(target=run, name=name)
    thread.start()
    thread.join()
    return outcome[0]


def _parked_by_recover(spool: FileSpool, txid: str) -> str:
    """A slow transaction's message that a recover() without resolver moved to doubt/: the
    producer's promotion will take it back (_reclaim)."""
    [mid] = _crashed_transaction(spool, txid, 1)
    assert spool.recover().doubt == 1
    return mid


@pytest.mark.parametrize("move", ["claim", "requeue", "resend"])
def test_a_relay_or_operator_move_hears_of_a_pending_fsync_failure_a_reclaim_was_told_of(
    spool: FileSpool, monkeypatch: pytest.MonkeyPatch, move: str
) -> None:
    """claim() renames pending → sending (requeue failed → pending, resend success → pending) and
    fsyncs the directories. Before its fsync of pending/, a producer taking back what recover()
    had parked (_reclaim, no spool lock) fsyncs pending/ on the same descriptor and is told of the
    error of writing it out with this call's renames; this call's own fsync then succeeds (main:
    the claim returned its batch; requeue and resend — audit --repair's, the one whose undoing
    leaves a message the broker lost unsent — reported done)."""
    parked = _parked_by_recover(spool, "slow")
    mid = add(spool, b"c")
    if move != "claim":
        [m] = spool.claim(10, lease_s=30)
        if move == "requeue":
            spool.fail([m])
        else:
            spool.succeed([Delivered(m, "t/0/0")])
    moves: dict[str, Callable[[], object]] = {
        "claim": lambda: spool.claim(10, lease_s=30),
        "requeue": lambda: spool.requeue([mid]),
        "resend": lambda: spool.resend([mid]),
    }
    pending_dir = os.path.join(spool.root, State.PENDING.value)
    errors = _WritebackErrors(monkeypatch, lambda fd: None)
    reclaimed: list[object] = []

    def window() -> None:
        errors.fail(pending_dir)
        reclaimed.append(_in_a_thread("producer", lambda: spool._reclaim("slow", [parked])))

    _before_its_sync(monkeypatch, spool.dir_syncs[State.PENDING], window)
    with pytest.raises(StoreError, match=f"{move}: the fsync of {pending_dir} failed") as told:
        moves[move]()
    assert "Input/output error" in str(told.value)
    assert ("restart the relay" if move == "claim" else "repeat the command") in str(told.value)
    assert isinstance(reclaimed[0], (StoreError, OSError)), reclaimed  # its own fsync was told


def test_a_reclaim_hears_of_a_pending_fsync_failure_a_claim_was_told_of(
    spool: FileSpool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other way round: the relay's claim fsyncs pending/ between the producer's rename
    doubt/ → pending/ and its fsync, and takes the error (main: the producer was told its
    message is pending; a crash could leave it in doubt/, waiting for a person)."""
    parked = _parked_by_recover(spool, "slow")
    add(spool, b"c")
    pending_dir = os.path.join(spool.root, State.PENDING.value)
    errors = _WritebackErrors(monkeypatch, lambda fd: None)
    claims: list[object] = []

    def window() -> None:
        errors.fail(pending_dir)
        claims.append(_in_a_thread("relay", lambda: spool.claim(10, lease_s=30)))

    _before_its_sync(monkeypatch, spool.dir_syncs[State.PENDING], window)
    with pytest.raises(StoreError, match=f"the fsync of {pending_dir} failed") as told:
        spool._reclaim("slow", [parked])
    assert f"messages {parked} were moved back from doubt/" in str(told.value)
    assert "zeroloss doubt retry" in str(told.value) and not told.value.retriable
    assert isinstance(claims[0], StoreError), claims  # the claim's own fsync was told


def test_recover_hears_of_a_tmp_fsync_failure_an_add_was_told_of(
    spool: FileSpool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """recover() promotes a committed leftover out of tmp/ and fsyncs tmp/ first; an add's fsync
    of tmp/ in between is told of the error of writing out tmp/ (main: recover reported the
    promotion done, though after a crash the tmp/ file could come back and be sent twice)."""
    [mid] = _crashed_transaction(spool, "tx-commit", 1)
    tmp_dir = os.path.join(spool.root, State.TMP.value)
    errors = _WritebackErrors(monkeypatch, lambda fd: None)
    adds: list[object] = []

    def window() -> None:
        errors.fail(tmp_dir)
        adds.append(_in_a_thread("adder", lambda: add(spool, b"a")))

    _before_its_sync(monkeypatch, spool.dir_syncs[State.TMP], window)
    with pytest.raises(StoreError, match=f"recover: the fsync of {tmp_dir} failed"):
        spool.recover(lambda txid: True)
    assert isinstance(adds[0], StoreError) and "writing tmp/" in str(adds[0]), adds
    assert spool.get(mid)[0] is State.PENDING  # done in memory; not said to be durable


def test_after_a_failed_fsync_the_relays_moves_are_refused_until_the_spool_is_reopened(
    spool: FileSpool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A succeed() whose success/ fsync failed raises; the relay then calls it again with the same
    batch, which finds nothing left in sending/ and (main) returned as if the moves were durable:
    no later fsync can tell, the kernel reported the lost write once. So every later move of this
    FileSpool is refused, reads still work, and a reopened spool goes on from what it finds."""
    for i in range(3):
        add(spool, b"%d" % i)
    batch = spool.claim(10, lease_s=30)
    fsync_fails_once(monkeypatch, spool._fds[State.SUCCESS])
    delivered = [Delivered(m, f"t/0/{i}") for i, m in enumerate(batch)]
    success_dir = os.path.join(spool.root, State.SUCCESS.value)
    with pytest.raises(StoreError, match="Input/output error") as first:
        spool.succeed(delivered)
    with pytest.raises(StoreError) as again:
        spool.succeed(delivered)  # the same batch again: the relay must not count it recorded
    assert f"succeed: the fsync of {success_dir} failed (Input/output error)" in str(first.value)
    assert "restart the relay" in str(first.value) and not first.value.retriable
    assert "succeed refused: an earlier succeed: the fsync of" in str(again.value)
    add(spool, b"later")  # producers are told of their own fsyncs' failures only: they go on
    moves: list[Callable[[], object]] = [
        lambda: spool.claim(10, lease_s=30),
        lambda: spool.extend(batch, 30),
        lambda: spool.retry(batch),
        lambda: spool.fail(batch),
        lambda: spool.recover(),
        lambda: spool.purge_success(0),
        lambda: spool.requeue([batch[0].id]),
        lambda: spool.resend([batch[0].id]),
        lambda: spool.purge(State.FAILED),
    ]
    for move in moves:
        with pytest.raises(StoreError, match="refused: an earlier succeed"):
            move()
    counts = spool.stats().counts
    assert counts[State.SUCCESS] == 3 and counts[State.PENDING] == 1
    monkeypatch.undo()
    spool.close()
    reopened = FileSpool(spool.root)
    try:
        [later] = reopened.claim(10, lease_s=30)
        assert later.value == b"later"
        reopened.succeed([Delivered(later, "t/0/3")])
        assert reopened.stats().counts[State.SUCCESS] == 4
    finally:
        reopened.close()


def test_a_reclaim_whose_fsync_failed_still_names_the_messages_recover_discarded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transaction slower than tmp_grace_s whose tmp files a resolver asked too early had
    discarded: its commit must say they are gone (the app's committed messages will never be
    sent). If the fsync of pending/ after the take-back fails as well, that error must not hide
    it (gsync: "its messages none were moved back from doubt/ ... requeue what is in doubt/",
    sending the operator to look for them where they are not)."""
    spool = FileSpool(tmp_path / "s", tmp_grace_s=0)
    pending_fd = spool._fds[State.PENDING]  # the take-back's group, not the promotion's own fds
    real_fsync = os.fsync

    def broken(fd: int) -> None:
        if fd == pending_fd:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    try:
        with pytest.raises(StoreError) as told, spool.transaction("slower") as tx:
            mid = tx.add(topic="t", value=b"y")
            assert spool.recover(lambda txid: False).discarded == 1  # a resolver asked too early
            monkeypatch.setattr(os, "fsync", broken)
        monkeypatch.undo()
        assert f"already discarded its messages {mid}" in str(told.value), told.value
        assert "tmp_grace_s" in str(told.value) and "Input/output error" in str(told.value)
        assert not told.value.retriable
    finally:
        spool.close()


def test_recover_fsyncs_each_destination_before_its_source(spool: FileSpool, monkeypatch: pytest.MonkeyPatch) -> None:
    """recover() promotes a committed leftover tmp/ → pending/ and puts an expired lease
    sending/ → pending/: pending/ must be made durable before the sources are, as every other
    move does (claim, succeed, requeue, the promotion), or a crash between the two fsyncs on a
    filesystem whose renames are not atomic (ext4 without a journal) leaves the message in
    neither directory. gsync fsynced tmp/ first (``_marks(*State)``: the enum's order)."""
    [committed] = _crashed_transaction(spool, "tx-commit", 1)
    add(spool, b"e")
    [expired] = spool.claim(10, lease_s=0)
    inodes = {os.stat(os.path.join(spool.root, s.value)).st_ino: s for s in State}
    order: list[State] = []
    real_fsync = os.fsync

    def recording(fd: int) -> None:
        state = inodes.get(os.fstat(fd).st_ino)
        if state is not None:
            order.append(state)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    report = spool.recover(lambda txid: True)
    monkeypatch.undo()
    assert report.promoted == 1 and report.lease_expired == 1
    assert order.index(State.PENDING) < order.index(State.TMP), order
    assert order.index(State.PENDING) < order.index(State.SENDING), order
    assert order.index(State.DOUBT) < order.index(State.TMP), order
    assert {spool.get(committed)[0], spool.get(expired.id)[0]} == {State.PENDING}


@pytest.mark.parametrize("command", ["retry", "purge"])
def test_an_operators_command_whose_fsync_failed_exits_1_naming_the_directory(
    spool: FileSpool, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    from click.testing import CliRunner

    from zeroloss.cli import main

    mid = add(spool, b"f")
    spool.fail(spool.claim(10, lease_s=30))
    spool.close()
    real_fsync = os.fsync
    target = State.PENDING if command == "retry" else State.FAILED
    ino = os.stat(os.path.join(spool.root, target.value)).st_ino

    def broken(fd: int) -> None:
        if os.fstat(fd).st_ino == ino:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", broken)
    args = ["failed", command, mid, "--source", f"spool://{spool.root}"] + (["--yes"] if command == "purge" else [])
    result = CliRunner().invoke(main, args)
    monkeypatch.undo()
    assert result.exit_code == 1, result.output
    directory = os.path.join(spool.root, target.value)
    assert f"the fsync of {directory} failed (Input/output error)" in result.output
    assert "check the disk" in result.output and "repeat the command" in result.output


# ---- a producer process killed mid-transaction -------------------------------------------

_CHILD = """
import os, sys, threading
from zeroloss.outbox.spool import FileSpool

spool = FileSpool(sys.argv[1])
journal = os.open(sys.argv[2], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

def producer(n):
    for i in range(1_000_000):
        txid = f"p{n}-{i}"
        with spool.transaction(txid) as tx:
            ids = [tx.add(topic="t", value=os.urandom(20_000), key=b"k%d" % j) for j in range(3)]
            # The app's database commit: one append, atomic under SIGKILL.
            os.write(journal, f"{txid} {' '.join(ids)}\\n".encode())
            if txid == "p0-10":  # committed, then stuck before the spool promotes: the kill lands here
                threading.Event().wait()

for n in range(4):
    threading.Thread(target=producer, args=(n,)).start()
"""


@pytest.mark.slow
def test_a_producer_killed_mid_transaction_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    root, journal = tmp_path / "spool", tmp_path / "journal"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(root), str(journal)])
    try:
        wait_until(
            lambda: journal.exists() and "p0-10 " in journal.read_text() and len(os.listdir(root / "pending")) >= 300,
            timeout_s=120,
            what="the child to commit 100 transactions, one of them left unpromoted",
        )
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    committed: dict[str, list[str]] = {}
    for line in journal.read_text().splitlines(keepends=True):
        if line.endswith("\n"):
            txid, *ids = line.split()
            committed[txid] = ids
    committed_ids = {m for ids in committed.values() for m in ids}
    unresolved = Path(shutil.copytree(root, tmp_path / "copy"))  # the same crash, recovered without a resolver

    spool = FileSpool(root, tmp_grace_s=0)  # the child is dead: no live transactions
    report = spool.recover(lambda txid: txid in committed)
    assert report.promoted >= 3  # at least p0-10, committed but never promoted
    assert report.malformed == 0 and report.doubt == 0 and os.listdir(root / "malformed") == []
    assert sorted(all_ids(root)) == sorted(files_ids(root, State.PENDING))
    assert sorted(files_ids(root, State.PENDING)) == sorted(committed_ids)  # each exactly once
    assert all(decode((root / "pending" / f"{m}.zlm").read_bytes()).id == m for m in committed_ids)
    spool.close()

    spool = FileSpool(unresolved, tmp_grace_s=0)
    report = spool.recover()
    pending, doubt = files_ids(unresolved, State.PENDING), files_ids(unresolved, State.DOUBT)
    ids = pending + doubt
    assert len(ids) == len(set(ids)) and committed_ids <= set(ids)
    assert set(pending) <= committed_ids
    assert set(committed["p0-10"]) <= set(doubt)
    for name in os.listdir(unresolved / "malformed"):  # only a write the kill cut short
        assert name[:36] not in committed_ids
    assert files_ids(unresolved, State.TMP) == []
    spool.close()


def files_ids(root: str | Path, state: State) -> list[str]:
    return [n[:36] for n in os.listdir(os.path.join(root, state.value)) if n.endswith(".zlm")]


def test_a_second_relay_on_one_spool_is_refused_until_the_first_is_gone(spool: FileSpool) -> None:
    """Two relays on one spool would break per-key order: the first claim or recover takes
    relay.lock; another FileSpool (another relay) is refused with a reason naming the holder;
    producers and operators (add, stats, list) are not affected; closing releases it."""
    add(spool)
    spool.recover()
    second = FileSpool(spool.root)
    try:
        for relay_work in (lambda: second.claim(10, lease_s=30), second.recover):
            with pytest.raises(ConfigError, match=rf"another relay \(pid {os.getpid()} on .*one relay per spool"):
                relay_work()
        add(second)  # a producer through the second instance is fine
        assert second.stats().counts[State.PENDING] == 2
    finally:
        second.close()
    spool.close()
    third = FileSpool(spool.root)
    try:
        assert len(third.claim(10, lease_s=30)) == 2  # the lock went with the first relay
    finally:
        third.close()


def test_threads_of_one_relay_share_its_relay_lock(tmp_path: Path) -> None:
    """Found by CI: two threads of one FileSpool taking relay.lock at once each opened the file,
    and the second flock failed as if another relay held it."""
    import threading

    for n in range(20):
        spool = FileSpool(tmp_path / f"spool-{n}")
        add(spool)
        start = threading.Barrier(8)
        errors: list[BaseException] = []

        def claim(
            spool: FileSpool = spool, start: threading.Barrier = start, errors: list[BaseException] = errors
        ) -> None:
            start.wait()
            try:
                spool.claim(1, lease_s=30)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=claim) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        spool.close()
        assert not errors, errors


def test_a_new_spool_makes_its_directories_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A spool's directories are entries of their parents: until those are written out, a crash
    soon after the spool was made could take pending/ and every message the app was told was
    committed in it. The parent of each directory made is fsynced; a spool already there, nothing."""
    root = tmp_path / "a" / "spool"
    synced = fsynced_inodes(monkeypatch)
    FileSpool(root).close()
    for made_in in (tmp_path, tmp_path / "a", root):  # where a, spool and the state directories were made
        assert os.stat(made_in).st_ino in synced, made_in
    synced.clear()
    FileSpool(root).close()
    assert os.stat(root).st_ino not in synced and os.stat(tmp_path).st_ino not in synced
