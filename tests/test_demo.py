from __future__ import annotations

import pytest

from zeroloss.demo import run_demo

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def test_the_demo_loses_nothing_and_prints_its_ledger() -> None:
    lines: list[str] = []
    assert run_demo(orders=600, echo=lines.append) == 0, "\n".join(lines)
    text = "\n".join(lines)
    assert "orders committed         600" in text
    assert "lost                     0" in text
    assert "invoices (effects)       600" in text
    assert "double effects           0" in text
    assert "SIGKILLed" in text
