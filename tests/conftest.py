"""Shared fixtures: real services (skipped locally when down, failing in CI), outbox harnesses."""

from __future__ import annotations

import gc
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

PG_URL = os.environ.get("ZEROLOSS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
MARIADB_URL = os.environ.get("ZEROLOSS_TEST_MARIADB", "mysql://root@127.0.0.1:3306/test")
REDIS_URL = "redis://127.0.0.1:6379/0"
SERVICES = {"postgres": 5432, "mariadb": 3306, "redis": 6379, "rabbitmq": 5672, "nats": 4222}


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def require_service(name: str) -> None:
    """Skip on a developer's machine when the service is down; in CI a missing service fails."""
    if port_open(SERVICES[name]):
        return
    if os.environ.get("CI"):
        pytest.fail(f"service {name} is not answering on 127.0.0.1:{SERVICES[name]} (run `make services`)")
    pytest.skip(f"{name} not running")


@dataclass
class OutboxHarness:
    """One store under test plus the producer-side call that puts a message in it."""

    kind: str
    store: Any
    add: Callable[..., str]


def _spool_harness(tmp_path: Path) -> OutboxHarness:
    from zeroloss.outbox.spool import FileSpool

    spool = FileSpool(tmp_path / "spool")

    def add(**kw: Any) -> str:
        with spool.transaction() as tx:
            return tx.add(**kw)

    return OutboxHarness("spool", spool, add)


def _sql_harness(kind: str, url: str) -> OutboxHarness:
    from zeroloss.outbox.sql import SqlOutbox

    table = f"zl_test_{uuid.uuid4().hex[:10]}"
    outbox = SqlOutbox(url, table=table)
    outbox.create_schema()

    def add(**kw: Any) -> str:
        with outbox.engine.begin() as conn:
            return outbox.add(conn, **kw)

    return OutboxHarness(kind, outbox, add)


OUTBOX_KINDS = [
    pytest.param("spool", id="spool"),
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
    pytest.param("mariadb", id="mariadb", marks=pytest.mark.mariadb),
]


@pytest.fixture(params=OUTBOX_KINDS)
def outbox(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OutboxHarness]:
    kind = request.param
    if kind == "spool":
        h = _spool_harness(tmp_path)
    elif kind == "sqlite":
        h = _sql_harness(kind, f"sqlite:///{tmp_path / 'outbox.db'}")
    elif kind == "postgresql":
        require_service("postgres")
        h = _sql_harness(kind, PG_URL)
    else:
        require_service("mariadb")
        h = _sql_harness(kind, MARIADB_URL)
    try:
        yield h
    finally:
        if kind in ("postgresql", "mariadb"):
            h.store.drop_schema()
        h.store.close()


@pytest.fixture(autouse=True)
def _collect_garbage_in_the_test_that_made_it() -> Iterator[None]:
    """Objects a test leaves unclosed (a socket, a Popen) warn when collected: collect here, so
    the warning fails the test that leaked them instead of whichever runs when the GC does."""
    yield
    gc.collect()


@pytest.fixture(scope="session")
def kafka() -> Iterator[Any]:
    """One embedded Kafka-compatible broker (Tansu, memory storage) for the whole session."""
    from zeroloss.embedded_broker import EmbeddedBroker

    broker = EmbeddedBroker(log_path=os.environ.get("ZEROLOSS_TANSU_LOG"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def _kafka_cluster_session() -> Iterator[Any]:
    """Three Apache Kafka brokers (tests/kafka_cluster.py), RF 3 and min.insync.replicas 2 by default.

    Reused when already up (`make cluster`), and then left running; stopped at the end only if
    this session started it. Fault tests must restart or resume the nodes they kill or pause."""
    from tests.kafka_cluster import KafkaCluster

    cluster = KafkaCluster()
    missing = cluster.missing_tools()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the Kafka cluster needs {' and '.join(missing)} on PATH")
        pytest.skip(f"no {' or '.join(missing)} for the Kafka cluster")
    was_running = any(cluster.running().values())
    if not was_running:
        # Started by this session: from empty data. Every test makes its own topics, and a restarted
        # node loads every partition before it answers: 2,300 left by earlier runs took it past 60 s.
        cluster.stop(wipe=True)
    cluster.start()
    try:
        yield cluster
    finally:
        if not was_running:
            cluster.stop()


@pytest.fixture
def kafka_cluster(_kafka_cluster_session: Any) -> Any:
    """The cluster, with every node listening: a node an earlier test left down (or someone
    stopped by hand) is started again before this test rather than failing it by timeouts."""
    cluster = _kafka_cluster_session
    if not all(port_open(n.port) for n in cluster.nodes.values()):
        cluster.start()
    return cluster


@pytest.fixture(scope="session")
def _rocketmq_session() -> Iterator[Any]:
    """Apache RocketMQ 5 (tests/rocketmq_server.py): a name server and a SYNC_FLUSH broker with its
    gRPC proxy in local mode, at rocketmq://127.0.0.1:18081.

    Reused when already up (`make rocketmq`), and then left running; stopped at the end only if
    this session started it. Fault tests must restart the process they kill."""
    from tests.rocketmq_server import RocketMQServer

    server = RocketMQServer()
    missing = server.missing_tools()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the RocketMQ server needs {' and '.join(missing)} on PATH")
        pytest.skip(f"no {' or '.join(missing)} for the RocketMQ server")
    was_running = any(server.running().values())
    if not was_running:
        server.stop(wipe=True)  # from empty data, as the Kafka cluster: no topics left by earlier runs
    server.start()
    try:
        yield server
    finally:
        if not was_running:
            server.stop()


@pytest.fixture
def rocketmq(_rocketmq_session: Any) -> Any:
    """The RocketMQ server, both processes listening: one an earlier test left down (or someone
    stopped by hand) is started again before this test rather than failing it by timeouts."""
    server = _rocketmq_session
    if not server.answering():
        server.start()
    return server


FULL_CRASH_MATRIX = os.environ.get("ZEROLOSS_CRASH_MATRIX") == "full"


def only_in_the_full_crash_matrix(what: str) -> None:
    """Skip a crash-test variant in `make test` (kept under 20 minutes on 2 cores) that `make chaos`
    runs with ZEROLOSS_CRASH_MATRIX=full; the variants kept in `make test` cover the same code."""
    if not FULL_CRASH_MATRIX:
        pytest.skip(f"{what}: in make chaos (ZEROLOSS_CRASH_MATRIX=full)")


def unique_topic(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# Servers on fixed ports that tests stop, kill or pause: under pytest-xdist (make test runs
# several workers) every test of one such server goes to the same worker, one after another.
SHARED_SERVERS = ("kafka_cluster", "rocketmq")


# tryfirst: xdist's worker turns the xdist_group marks into node ids in its own hook; this one must
# run before it, or the groups are silently ignored (the CI check saw two workers on the cluster).
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for server in SHARED_SERVERS:
            if item.get_closest_marker(server) or server in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(server))
                break


# A check that the grouping took: pytest 9.2 renamed the attribute xdist's loadgroup writes, and the
# groups were then ignored without a word (two workers killed and restarted the same cluster node).
@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    if not getattr(session.config.option, "loadgroup", False):  # set on xdist workers only
        return
    ungrouped = [
        item.nodeid for item in session.items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid
    ]
    if ungrouped:
        raise pytest.UsageError(
            f"--dist loadgroup did not group {len(ungrouped)} tests (e.g. {ungrouped[0]}): "
            "tests of a shared server would run on several workers at once; "
            "check the pytest / pytest-xdist versions pinned in pyproject.toml"
        )
