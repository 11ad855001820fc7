"""The spool's relay side under the conditions that could lose or reorder a message: the pending
index (inotify, its lost events, no inotify at all), producers and operators in other processes
while the relay claims, a relay SIGKILLed mid-batch, a full disk while the relay rewrites."""

from __future__ import annotations

import contextlib
import gc
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.spool_helpers import add, all_ids, files, small_tmpfs  # noqa: F401  (a fixture)
from tests.waiting import wait_until
from zeroloss.errors import SpoolFullError
from zeroloss.outbox import _pending_index
from zeroloss.outbox.base import Delivered, State
from zeroloss.outbox.spool import FileSpool


@pytest.fixture(params=["inotify", "listing"])
def relay_spool(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FileSpool]:
    """A spool as the relay sees it, with the pending index fed by inotify and, where a system
    has none, by a listing at every claim."""
    if request.param == "listing":
        monkeypatch.setattr(_pending_index._Watch, "open", classmethod(lambda cls, path: None))
    s = FileSpool(tmp_path / "spool")
    s.recover()  # takes relay.lock and builds the index
    assert s._index is not None and s._index.watched is (request.param == "inotify" and sys.platform == "linux")
    yield s
    s.close()


def test_a_requeue_by_an_operator_process_goes_before_the_later_messages_of_its_key(relay_spool: FileSpool) -> None:
    first = add(relay_spool, b"1", key=b"k")
    [m] = relay_spool.claim(10, lease_s=30)
    relay_spool.fail([m])
    later = [add(relay_spool, b"%d" % i, key=b"k") for i in (2, 3)]
    assert relay_spool.claim(10, lease_s=30) == []  # parked behind the failed one
    operator = FileSpool(relay_spool.root)  # `zeroloss requeue` in another process
    assert operator.requeue([first]) == 1
    operator.close()
    assert [m.id for m in relay_spool.claim(10, lease_s=30)] == [first, *later]  # not 2 and 3 alone


_PRODUCER = """
import sys
from zeroloss.outbox.spool import FileSpool
spool = FileSpool(sys.argv[1], fsync=False)
for i in range(int(sys.argv[2])):
    with spool.transaction() as tx:
        tx.add(topic="t", value=b"%d" % i, key=b"k%d" % (i % 3))
"""


def test_messages_a_producer_process_commits_while_the_relay_claims_come_in_commit_order(
    relay_spool: FileSpool,
) -> None:
    """The relay claims while another process commits: per key, what it claims is in the order
    the producer committed, and every message comes once (a listing taken while renames land, or
    an index that missed one, would let a later message of a key overtake an earlier one)."""
    n = 1500
    child = subprocess.Popen([sys.executable, "-c", _PRODUCER, relay_spool.root, str(n)])
    claimed: list[bytes] = []
    try:

        def claim_some() -> bool:
            batch = relay_spool.claim(37, lease_s=30)
            claimed.extend(m.value for m in batch)
            relay_spool.succeed([Delivered(m, "t/0/0") for m in batch])
            return child.poll() is not None and not batch and not files(relay_spool, State.PENDING)

        wait_until(claim_some, timeout_s=120, what="the producer's messages, all claimed", interval=0)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 0
    assert sorted(claimed) == sorted(b"%d" % i for i in range(n))  # each once
    for k in range(3):
        got = [int(v) for v in claimed if int(v) % 3 == k]
        assert got == sorted(got), f"key k{k} out of order"


def test_lost_inotify_events_make_the_relay_list_pending_again(tmp_path: Path) -> None:
    """More arrivals between two claims than the inotify queue holds: the kernel drops events and
    says so; the index lists pending/ again instead of missing messages."""
    queue = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text()) if sys.platform == "linux" else 0
    if not 0 < queue <= 40_000:
        pytest.skip(f"needs inotify with a queue of at most 40,000 events (here: {queue or 'none'})")
    relay = FileSpool(tmp_path / "spool")
    relay.recover()
    assert relay._index is not None and relay._index.watched
    listings = relay._index.listings
    producer = FileSpool(tmp_path / "spool", fsync=False)
    n = queue + 100
    with producer.transaction() as tx:
        ids = [tx.add(topic="t", value=b"x") for _ in range(n)]
    producer.close()
    claimed = [m.id for m in relay.claim(100, lease_s=30)]
    assert relay._index.listings == listings + 1
    assert claimed == ids[:100]  # the oldest, and none missed: the index holds the rest
    assert len(relay._index) == n - 100 == len(files(relay, State.PENDING))
    relay.close()


_RELAY = """
import sys
from zeroloss.outbox.base import Delivered
from zeroloss.outbox.spool import FileSpool
spool = FileSpool(sys.argv[1])
spool.recover()
while True:
    batch = spool.claim(50, lease_s=0)  # expired at once: the next relay recovers them at start
    spool.succeed([Delivered(m, "t/0/%d" % i) for i, m in enumerate(batch)])
    if batch:
        print(len(batch), flush=True)
"""


def test_a_relay_sigkilled_mid_batch_leaves_every_message_in_exactly_one_place(tmp_path: Path) -> None:
    """SIGKILL while a relay moves batches between pending/, sending/ and success/: after
    recover, every message is in exactly one directory; none delivered is put back."""
    root = tmp_path / "spool"
    producer = FileSpool(root, fsync=False)
    with producer.transaction() as tx:
        ids = {tx.add(topic="t", value=b"x", key=b"k%d" % (i % 7)) for i in range(3000)}
    producer.close()
    rng = random.Random()
    for _ in range(3):
        child = subprocess.Popen([sys.executable, "-c", _RELAY, str(root)], stdout=subprocess.PIPE)
        assert child.stdout is not None
        for _ in range(rng.randint(1, 8)):  # a few batches in, then somewhere inside the next ones
            if not child.stdout.readline():
                break
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
        spool = FileSpool(root)
        spool.recover()  # the dead relay's leases: expired, back to pending
        found = all_ids(root)
        assert sorted(found) == sorted(ids), "lost or duplicated"
        assert files(spool, State.SENDING) == []
        delivered = {n[:36] for n in files(spool, State.SUCCESS)}
        assert delivered.isdisjoint(n[:36] for n in files(spool, State.PENDING))
        spool.close()


def test_a_full_disk_while_the_relay_rewrites_a_message_keeps_it_in_sending(small_tmpfs: Path) -> None:  # noqa: F811
    """A retry rewrites the message (tmp/*.part, then rename over): with the disk full the
    rewrite fails, the one copy stays in sending/ as it was, and recover brings it back."""
    spool = FileSpool(small_tmpfs / "spool")
    mid = add(spool, b"x" * 10_000, key=b"k")
    [m] = spool.claim(1, lease_s=0)
    filler = small_tmpfs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (1 << 16, 1 << 12, 1):  # every last byte: the rewrite's write gets ENOSPC
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * chunk)
    finally:
        os.close(fd)
    with pytest.raises(SpoolFullError):
        spool.retry([replace(m, attempts=1, last_error="broker said retry")])
    assert [n[:36] for n in files(spool, State.SENDING)] == [mid]
    assert files(spool, State.TMP) == []  # no partial rewrite left behind
    filler.unlink()
    assert spool.recover().lease_expired == 1
    [again] = spool.claim(1, lease_s=30)
    assert (again.id, again.value, again.attempts) == (mid, b"x" * 10_000, 0)
    spool.close()


def _inotify_fds() -> int:
    fds = os.listdir("/proc/self/fd")
    return sum(1 for fd in fds if _readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify")


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:  # the listing's own descriptor, closed by now
        return ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")
def test_a_relay_spool_dropped_without_close_gives_its_inotify_instance_back(tmp_path: Path) -> None:
    """inotify instances are few per user and shared by all its processes: a relay's spool that
    is garbage collected without close() must not keep one."""
    before = _inotify_fds()
    spool = FileSpool(tmp_path / "spool")
    spool.recover()
    assert _inotify_fds() == before + 1
    del spool
    gc.collect()
    assert _inotify_fds() == before
    closed = FileSpool(tmp_path / "spool")  # and close() gives it back at once (the lock is free again)
    closed.recover()
    closed.close()
    assert _inotify_fds() == before


@pytest.mark.parametrize("watched", [True, False], ids=["inotify", "listing"])
def test_the_pending_index_keeps_names_oldest_first_and_each_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, watched: bool
) -> None:
    if not watched:
        monkeypatch.setattr(_pending_index._Watch, "open", classmethod(lambda cls, path: None))
    d = tmp_path / "pending"
    d.mkdir()
    for name in ("b", "d"):
        (d / name).touch()
    index = _pending_index.PendingIndex(str(d))
    index.refresh()
    assert list(index.names()) == ["b", "d"]
    for name in ("e", "a", "c"):  # older names too (a retry, a requeue): each lands in its place
        (d / name).touch()
    index.refresh()
    assert list(index.names()) == ["a", "b", "c", "d", "e"]
    (d / "c").unlink()
    index.discard("c")  # the relay took it
    assert list(index.names()) == ["a", "b", "d", "e"]
    (d / "c").touch()  # and it came back
    index.refresh()
    assert list(index.names()) == ["a", "b", "c", "d", "e"]
    assert index.watched is (watched and sys.platform.startswith("linux"))
    index.close()
