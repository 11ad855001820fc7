"""The parking lot (dead letters no broker would take) must hear of a failed write-out of its own
rename, even when another park's fsync of the same directory was told of it first."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from zeroloss.consumer.dead_letters import ParkingLot, parked
from zeroloss.message import new_message


class _Errseq:
    """os.open/os.fsync of directories with Linux's writeback-error rule (errseq_t): a descriptor
    samples the error count when opened (an error nobody was told of yet still counts as new to
    it) and its fsync reports, once, every error after its sample."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, directory: str) -> None:
        self._dir, self._ino = directory, os.stat(directory).st_ino
        self.errors = 0
        self._told = False  # whether any descriptor was told of the latest error
        self._sample: dict[int, int] = {}
        self._open, self._fsync = os.open, os.fsync
        monkeypatch.setattr(os, "open", self.open)
        monkeypatch.setattr(os, "fsync", self.fsync)

    def open(self, path: str, flags: int, mode: int = 0o777) -> int:
        fd = self._open(path, flags, mode)
        if os.fstat(fd).st_ino == self._ino:
            self._sample[fd] = self.errors if self._told else 0
        return fd

    def fsync(self, fd: int) -> None:
        self._fsync(fd)
        if os.fstat(fd).st_ino == self._ino and self.errors > self._sample.get(fd, self.errors):
            self._sample[fd], self._told = self.errors, True
            raise OSError(errno.EIO, "Input/output error")

    def another_park_is_told(self) -> None:
        """Writing out the directory failed, and another descriptor's fsync took the error."""
        self.errors += 1
        fd = self.open(self._dir, os.O_RDONLY)
        try:
            with pytest.raises(OSError):
                self.fsync(fd)
        finally:
            os.close(fd)


def test_a_park_hears_of_a_failed_write_out_of_its_rename_another_fsync_was_told_of(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "parked"
    root.mkdir()
    errseq = _Errseq(monkeypatch, str(root))
    real_rename = os.rename

    def rename_then_fail(src: str, dst: str) -> None:
        real_rename(src, dst)
        errseq.another_park_is_told()  # the rename was in the failed write-out

    monkeypatch.setattr(os, "rename", rename_then_fail)
    with pytest.raises(OSError, match="Input/output error"):
        ParkingLot(root).park(new_message(topic="t", value=b"v"), "refused")
    monkeypatch.undo()
    assert errseq.errors == 1


def test_a_park_is_durable_and_readable(tmp_path: Path) -> None:
    path = ParkingLot(tmp_path / "lot").park(new_message(topic="t", key=b"k", value=b"v"), "refused: too big")
    [(found, letter)] = parked(tmp_path / "lot")
    assert found == path
    assert (letter.topic, letter.key, letter.value, letter.last_error) == ("t", b"k", b"v", "refused: too big")
    assert not [n for n in os.listdir(tmp_path / "lot") if n.endswith(".tmp")]
