"""What ``zeroloss status`` says about an outbox: the numbers and a verdict, ``ok`` / ``warn`` /
``critical``, with the reasons and the command that answers each.
The details: docs/design.md, "status.py"."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from zeroloss.outbox.base import State, Stats


class Level(enum.IntEnum):
    OK = 0
    WARN = 1
    CRITICAL = 2

    @property
    def word(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class Thresholds:
    max_pending_age_s: float = 300.0
    disk_warn_pct: float = 80.0
    disk_critical_pct: float = 90.0


@dataclass(slots=True)
class Verdict:
    level: Level = Level.OK
    reasons: list[str] = field(default_factory=list)

    def add(self, level: Level, reason: str) -> None:
        self.level = max(self.level, level)
        self.reasons.append(f"{level.word}: {reason}")


def disk_used_pct(stats: Stats) -> float | None:
    if not stats.disk_total_bytes or stats.disk_free_bytes is None:
        return None
    return 100.0 * (stats.disk_total_bytes - stats.disk_free_bytes) / stats.disk_total_bytes


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 2 * 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def assess(stats: Stats, t: Thresholds | None = None) -> Verdict:
    """The verdict on one :meth:`OutboxStore.stats` reading."""
    t = t or Thresholds()
    v = Verdict()
    n = stats.counts
    if n.get(State.FAILED, 0):
        v.add(
            Level.CRITICAL,
            f"{n[State.FAILED]} failed message(s) wait for a person "
            f"({stats.parked} parked behind them): zeroloss failed list",
        )
    for state in (State.DOUBT, State.MALFORMED):
        if n.get(state, 0):
            parked = f" ({stats.parked} parked behind them)" if state is State.DOUBT and not n.get(State.FAILED) else ""
            v.add(Level.CRITICAL, f"{n[state]} {state.value} message(s){parked}: zeroloss {state.value} list")
    used = disk_used_pct(stats)
    if used is not None and used > t.disk_critical_pct:
        v.add(
            Level.CRITICAL,
            f"spool disk {used:.0f}% used (> {t.disk_critical_pct:.0f}%): free space or the app's adds will fail",
        )
    elif used is not None and used > t.disk_warn_pct:
        v.add(Level.WARN, f"spool disk {used:.0f}% used (> {t.disk_warn_pct:.0f}%)")
    age = stats.oldest_pending_age_s
    why = f"; its last error: {stats.oldest_pending_error}" if stats.oldest_pending_error else ""
    if age is not None and age > 4 * t.max_pending_age_s:
        v.add(
            Level.CRITICAL,
            f"oldest pending message is {_age(age)} old (> 4 x {_age(t.max_pending_age_s)}){why}: "
            "is the relay running and the broker reachable? zeroloss doctor --target URL",
        )
    elif age is not None and age > t.max_pending_age_s:
        v.add(Level.WARN, f"oldest pending message is {_age(age)} old (> {_age(t.max_pending_age_s)}){why}")
    if stats.expired_leases:
        v.add(
            Level.WARN,
            f"{stats.expired_leases} message(s) in sending with an expired lease: a relay died or is "
            "stuck; a running relay returns them to pending",
        )
    tmp_age = stats.oldest_age_s.get(State.TMP)
    if tmp_age is not None and tmp_age > t.max_pending_age_s:
        v.add(Level.WARN, f"tmp files {_age(tmp_age)} old: a crashed transaction? the relay's recover() moves them")
    unknown = stats.extra.get("unknown_states")
    if unknown:
        v.add(Level.WARN, f"rows in states zeroloss does not know: {unknown}")
    return v


def unreadable(exc: Exception) -> Verdict:
    v = Verdict()
    v.add(Level.CRITICAL, f"cannot read the outbox: {exc}")
    return v


def as_dict(stats: Stats | None, verdict: Verdict) -> dict[str, Any]:
    """The ``--json`` document (the keys of earlier versions kept)."""
    out: dict[str, Any] = {}
    if stats is not None:
        out = {
            "counts": {s.value: stats.counts.get(s, 0) for s in State},
            "oldest_age_s": {s.value: round(a, 3) for s, a in sorted(stats.oldest_age_s.items())},
            "oldest_pending_age_s": stats.oldest_pending_age_s,
            "oldest_pending_error": stats.oldest_pending_error,
            "expired_leases": stats.expired_leases,
            "parked": stats.parked,
            "disk_free_bytes": stats.disk_free_bytes,
            "disk_total_bytes": stats.disk_total_bytes,
            "disk_used_pct": None if (u := disk_used_pct(stats)) is None else round(u, 1),
        }
    out["verdict"] = verdict.level.word
    out["reasons"] = verdict.reasons
    return out


def render(stats: Stats | None, verdict: Verdict, states: frozenset[State] = frozenset(State)) -> str:
    """The text report: a table of states, the other numbers, then the verdict and its reasons."""
    lines = []
    if stats is not None:
        lines.append(f"{'state':<10} {'count':>9}  oldest")
        for s in State:
            if s not in states and not stats.counts.get(s):
                continue
            age = stats.oldest_age_s.get(s)
            lines.append(f"{s.value:<10} {stats.counts.get(s, 0):>9}  {'-' if age is None else _age(age)}")
        if stats.oldest_pending_error:
            lines.append(f"oldest pending waits on: {stats.oldest_pending_error}")
        lines.append(f"expired leases: {stats.expired_leases}")
        lines.append(f"parked (behind a failed or doubt message of their key): {stats.parked}")
        used = disk_used_pct(stats)
        if used is not None and stats.disk_free_bytes is not None and stats.disk_total_bytes is not None:
            free, total = stats.disk_free_bytes / 2**20, stats.disk_total_bytes / 2**20
            lines.append(f"disk free: {free:.0f} MiB of {total:.0f} MiB ({used:.0f}% used)")
    lines.append(f"verdict: {verdict.level.word}")
    lines.extend(f"  {r}" for r in verdict.reasons)
    return "\n".join(lines)
