"""The progress bar of ``zeroloss relay --drain`` on a terminal (issue 15): done/total, percent,
ETA (click's), average rate and failures, redrawn every half second from the relay's progress reports,
in place of the progress log line. Only where stderr is a terminal and the log level is the
default: logs, CI and ``-v``/``-q`` runs keep the plain lines. Log lines that come while the bar
is drawn (an outage, the summary) end the bar's line first, so neither overwrites the other."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, TextIO

import click

from zeroloss.logs import age
from zeroloss.relay import RelayProgress

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar

EVERY_S = 0.5  # how often the bar is redrawn: the relay's progress interval while it is shown
_SHOW_CURSOR = "\033[?25h"  # click hides the cursor while its bar is drawn


def wanted(drain: bool, progress_s: float, stream: TextIO) -> bool:
    """A bar for this run: a drain (its total is known), progress not turned off, ``stream`` a
    terminal that can redraw a line, and zeroloss logging at its default level (INFO)."""
    return (
        drain
        and progress_s > 0
        and stream.isatty()
        and os.environ.get("TERM") != "dumb"
        and logging.getLogger("zeroloss").getEffectiveLevel() == logging.INFO
    )


class DrainBar:
    """click's progress bar fed with :class:`RelayProgress` reports; its total (delivered and
    failed so far plus the backlog) grows when messages are added during the drain."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._bar: ProgressBar[int] | None = None
        self._last: RelayProgress | None = None
        self._started = time.monotonic()
        self._drawn = False  # the bar is on the terminal's current line

    def show(self, p: RelayProgress) -> None:
        done = p.delivered + p.failed
        if self._bar is None:
            self._bar = click.progressbar(
                length=max(done + p.backlog, 1),
                label="relaying",
                show_pos=True,
                show_percent=True,
                item_show_func=lambda _: self._info(),
                file=self._stream,
            )
            self._bar.__enter__()
        bar = self._bar
        self._last = p
        bar.length = max(bar.length or 0, done + p.backlog, 1)
        bar.make_step(done - bar.pos)
        bar.show_eta = done > 0 and p.broker_down_s is None  # click's guess from no progress is nonsense
        bar.finished = bar.pos >= bar.length  # click never unsets it, and the total can grow
        bar._last_line = None  # redraw even when unchanged: a log line may have moved it up
        bar.render_progress()
        self._drawn = True

    def _info(self) -> str:
        p = self._last
        if p is None:
            return ""
        # the average since the start: what the ETA assumes, and not 0/s on the last frame
        said = [f"{(p.delivered + p.failed) / max(time.monotonic() - self._started, 1e-3):.0f}/s"]
        if p.failed:
            said.append(f"{p.failed} failed")
        if p.broker_down_s is not None:
            said.append(f"broker down {age(p.broker_down_s)}")
        return ", ".join(said)

    def before_log_line(self, record: logging.LogRecord) -> bool:
        """A handler filter: the bar's line is ended (and kept) before a log line is written."""
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False
        return True

    def close(self) -> None:
        if self._bar is None:
            return
        if self._drawn:
            self._bar.render_finish()  # shows the cursor and ends the line
        else:
            self._stream.write(_SHOW_CURSOR)
            self._stream.flush()


@contextlib.contextmanager
def drain_bar(stream: TextIO | None = None) -> Iterator[DrainBar]:
    """A :class:`DrainBar` on ``stream`` (stderr), hooked into the log handlers for its time."""
    bar = DrainBar(stream or sys.stderr)
    handlers = [*logging.getLogger().handlers, *logging.getLogger("zeroloss").handlers]
    for h in handlers:
        h.addFilter(bar.before_log_line)
    try:
        yield bar
    finally:
        for h in handlers:
            h.removeFilter(bar.before_log_line)
        bar.close()
