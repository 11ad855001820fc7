"""What every ``zeroloss doctor`` check returns: a :class:`Check` with its :class:`Verdict`."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass


class Verdict(enum.StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    verdict: Verdict
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}


def overall(checks: list[Check]) -> Verdict:
    verdicts = {c.verdict for c in checks}
    return Verdict.FAIL if Verdict.FAIL in verdicts else Verdict.WARN if Verdict.WARN in verdicts else Verdict.OK
