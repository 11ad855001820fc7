"""Directories that survive a crash: ``make_durable_dirs`` is ``os.makedirs`` with the parent of
each directory it makes fsynced (the spool's directories, the consumer's parking lot)."""

from __future__ import annotations

import os


def make_durable_dirs(root: str) -> None:
    """``os.makedirs(root)``, with the parent of each directory it makes fsynced: a directory's
    own name is an entry of its parent, and until that is on the disk a crash can take the
    directory, and every file made durable in it, with it. Nothing is fsynced when ``root`` is there."""
    missing = []
    at = os.path.abspath(root)  # "parked" has the parent "" to os.path, which cannot be opened
    while not os.path.isdir(at) and os.path.dirname(at) != at:
        missing.append(at)
        at = os.path.dirname(at)
    for directory in reversed(missing):  # the first that was not there first
        # opened before the mkdir: its fsync then hears of a failed write-out of the new entry
        parent = os.open(os.path.dirname(directory), os.O_RDONLY)
        try:
            try:
                os.mkdir(directory)
            except FileExistsError:  # another process's, maybe not fsynced yet: fsync it anyway
                if not os.path.isdir(directory):
                    raise
            os.fsync(parent)
        finally:
            os.close(parent)
