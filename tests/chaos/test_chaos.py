"""The short form of the chaos suite, inside `make test`: the scenarios that take seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.chaos.broker_faults import CLUSTER_SCENARIOS
from tests.chaos.pipeline import Size
from tests.chaos.scenarios import SCENARIOS, short_size
from tests.chaos.spool_faults import CannotMount
from tests.conftest import require_service
from zeroloss.embedded_broker import EmbeddedBroker

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]


# make test runs the ones that take seconds (under ~20 s each here) and that no other test covers
# as closely; `make chaos` runs them all (broker outage on S3 storage, the broker that loses
# everything, the PostgreSQL restart, handler failures, bad input and the commit/promotion crash,
# which tests/test_consumer.py, test_cli*.py and test_spool.py cover in make test) at full size.
# The cut keeps make test under 15 minutes on this machine.
IN_MAKE_TEST = [
    "relay-sigkill-postgresql", "consumer-sigkill", "two-relays", "zombie-consumer", "rebalance-storm",
    "spool-disk-full", "spool-corrupted-files",
]  # fmt: skip

# Scenarios whose message count is what the fault allowed (a full disk), not Size.messages.
OWN_COUNT = {"spool-disk-full", "spool-corrupted-files", "spool-crash-before-promotion"}


@pytest.mark.parametrize("name", IN_MAKE_TEST)
def test_scenario_loses_nothing_and_doubles_nothing(name: str, kafka: EmbeddedBroker, tmp_path: Path) -> None:
    require_service("postgres")
    try:
        ledger = SCENARIOS[name](kafka, tmp_path, Size.short())
    except CannotMount as exc:
        pytest.skip(str(exc))
    assert ledger.lost == 0, ledger
    assert not ledger.double_effects, ledger
    assert not ledger.out_of_order_keys, ledger
    assert ledger.violations == 0, ledger
    assert ledger.messages > 0 if name in OWN_COUNT else ledger.messages == Size.short().messages, ledger


# Broker faults on the real three-broker cluster: the two that take seconds. The rest (ISR below
# min.insync.replicas, the whole cluster killed, the unclean election with audit --repair) run in
# make chaos; the ISR rule itself is also in test_brokers_publish.py and test_doctor.py.
CLUSTER_IN_MAKE_TEST = ["cluster-leader-killed", "cluster-partition"]


@pytest.mark.kafka_cluster
@pytest.mark.parametrize("name", CLUSTER_IN_MAKE_TEST)
def test_broker_fault_loses_nothing_and_doubles_nothing(name: str, kafka_cluster: Any, tmp_path: Path) -> None:
    require_service("postgres")
    size = short_size(name)
    ledger = CLUSTER_SCENARIOS[name](kafka_cluster, tmp_path, size)
    assert (ledger.lost, ledger.double_effects, ledger.out_of_order_keys, ledger.violations) == (0, 0, 0, 0), ledger
    assert ledger.messages == size.messages and ledger.faults > 0, ledger
