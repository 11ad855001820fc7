"""What the spool's test files share: writing a message, listing a state's files, a small tmpfs,
an fsync that fails once."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from zeroloss.outbox.base import State
from zeroloss.outbox.spool import FileSpool


def add(spool: FileSpool, value: bytes = b"v", key: bytes | None = None, txid: str | None = None) -> str:
    with spool.transaction(txid) as tx:
        return tx.add(topic="t", value=value, key=key)


def files(spool: FileSpool, state: State) -> list[str]:
    return sorted(os.listdir(os.path.join(spool.root, state.value)))


def fsync_fails_once(monkeypatch: pytest.MonkeyPatch, fd: int) -> None:
    """The next os.fsync of ``fd`` raises EIO, the later ones succeed: Linux reports a lost write
    once to each open file, so a second fsync cannot tell the writes were lost."""
    real_fsync = os.fsync
    failed = False

    def fails_once(called: int) -> None:
        nonlocal failed
        if called == fd and not failed:
            failed = True
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(called)

    monkeypatch.setattr(os, "fsync", fails_once)


def fsynced_inodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on, the inode of every file or directory fsynced (the fsync itself still runs)."""
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append(os.fstat(fd).st_ino)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def all_ids(root: str | Path) -> list[str]:
    """Every message id that has a file anywhere in the spool (duplicates kept)."""
    return [n[:36] for s in State for n in os.listdir(os.path.join(root, s.value)) if n.endswith(".zlm")]


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB filesystem, so ENOSPC comes from the kernel rather than a mock."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
