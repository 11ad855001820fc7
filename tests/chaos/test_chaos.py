"""The short form of the chaos suite, inside `make test`: every scenario at small counts."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.pipeline import Size
from tests.chaos.scenarios import SCENARIOS
from tests.conftest import require_service
from zeroloss.embedded_broker import EmbeddedBroker

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]


# make test runs the ones that take seconds; `make chaos` runs them all (broker outage on S3
# storage and the PostgreSQL restart included) at full size.
IN_MAKE_TEST = ["relay-sigkill-postgresql", "consumer-sigkill", "two-relays", "zombie-consumer", "rebalance-storm"]


@pytest.mark.parametrize("name", IN_MAKE_TEST)
def test_scenario_loses_nothing_and_doubles_nothing(name: str, kafka: EmbeddedBroker, tmp_path: Path) -> None:
    require_service("postgres")
    ledger = SCENARIOS[name](kafka, tmp_path, Size.short())
    assert ledger.lost == 0, ledger
    assert ledger.double_effects == 0, ledger
    assert ledger.out_of_order_keys == 0, ledger
    assert ledger.messages == Size.short().messages
