"""What zeroloss's log output looks like: :func:`logging_setup` for applications, one-line
summaries of errors for the log lines themselves, and :class:`Progress`, the periodic "what have
I done" line of a long-running loop (relay, consumer).

zeroloss never configures logging by itself, as the logging HOWTO asks of libraries ("do not add
any handlers other than NullHandler"): the application owns the root logger, and a library that
calls ``basicConfig`` takes that choice away (and duplicates lines where the app configured it
later). Like ``urllib3.add_stderr_logger()``, :func:`logging_setup` is one explicit call for a
script that wants zeroloss's lines with their time and level; the ``zeroloss`` command calls it.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_MARK = "_zeroloss_setup"  # on the handler logging_setup installed, so a second call replaces it

logging.getLogger("zeroloss").addHandler(logging.NullHandler())


def logging_setup(
    level: int | str = logging.INFO, *, stream: IO[str] | None = None, others: int | str | None = None
) -> logging.Handler:
    """Show zeroloss's log lines (start, progress, outages, summary at stop) with time and level
    on ``stream`` (stderr), from ``level`` up. Only the ``zeroloss`` logger is touched unless
    ``others`` is given: then the root logger gets the same handler at that level (the
    ``zeroloss`` command does this, so that client libraries' warnings show too) — if it has no
    handler yet: like ``logging.basicConfig``, a configuration that is there already (the
    application's, a test runner's) is left alone, and zeroloss's lines go to it. Calling it
    again replaces what the previous call installed. Returns the handler."""
    handler = logging.StreamHandler(stream) if stream is not None else _Stderr()
    handler.setFormatter(logging.Formatter(FORMAT))
    setattr(handler, _MARK, True)
    root, ours = logging.getLogger(), logging.getLogger("zeroloss")
    for lg in (root, ours):
        for h in [h for h in lg.handlers if getattr(h, _MARK, False)]:
            lg.removeHandler(h)
    ours.setLevel(level)
    if others is None:
        ours.addHandler(handler)
    elif not root.handlers:
        root.setLevel(others)
        root.addHandler(handler)
    return handler


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of each line (as logging's last-resort
    handler does), so a replaced stderr (a test runner's capture, a daemon's redirect) is followed
    and a closed one is never written to."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, value: IO[str]) -> None:
        pass


def brief(exc: BaseException) -> str:
    """An error in one line for a log: a database error (SQLAlchemy's DBAPIError) as
    its driver's first line — SQLAlchemy's ``str()`` appends the statement, its parameters and a
    link, which bury the reason — anything else as ``Type: message`` with its lines joined by
    `` | `` (one log line each, nothing dropped)."""
    orig = getattr(exc, "orig", None)  # sqlalchemy.exc.DBAPIError, without importing SQLAlchemy
    if orig is not None and hasattr(exc, "statement"):
        return f"{type(orig).__name__}: {first_line(str(orig))}"
    text = one_line(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def one_line(text: str) -> str:
    """``text``'s non-empty lines joined by `` | ``: a multi-line error in one log line or table row."""
    return " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def first_line(text: str) -> str:
    """The first non-empty line of ``text``: a database error's reason without its ``[SQL: …]``."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


class Progress:
    """Says every ``every_s`` seconds what a loop has done: :meth:`due` tells when, :meth:`rate`
    how many per second since the last line. None: never (the caller logs nothing)."""

    def __init__(self, every_s: float | None) -> None:
        self.every_s = every_s
        self.started = time.monotonic()
        self._last_at = self.started
        self._last_count = 0

    def due(self) -> bool:
        return self.every_s is not None and time.monotonic() - self._last_at >= self.every_s

    def rate(self, count: int) -> float:
        """Per second since the previous call (the first: since the start); resets the clock."""
        now = time.monotonic()
        per_s = (count - self._last_count) / max(now - self._last_at, 1e-9)
        self._last_at, self._last_count = now, count
        return per_s

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def age(seconds: float | None) -> str:
    """``12s``, ``4m05s``, ``3h02m``; ``-`` for none."""
    if seconds is None:
        return "-"
    s = int(max(seconds, 0))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
