from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.broker_harness import AMQP_URL, NATS_URL
from tests.broker_inspect import amqp_queue, kafka_partitions, nats_subjects, with_redis
from tests.conftest import REDIS_URL, require_service
from zeroloss.cli import main
from zeroloss.demo import run_demo

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.mark.kafka
def test_the_demo_loses_nothing_and_prints_its_ledger() -> None:
    lines: list[str] = []
    assert run_demo(orders=600, echo=lines.append) == 0, "\n".join(lines)
    text = "\n".join(lines)
    assert "orders committed         600" in text
    assert "lost                     0" in text
    assert "invoices (effects)       600" in text
    assert "double effects           0" in text
    assert "SIGKILLed" in text


def _demo_against(url: str) -> tuple[str, str]:
    """Run the demo on ``url``; (its output, the topic it used)."""
    lines: list[str] = []
    code = run_demo(orders=200, echo=lines.append, target=url)
    text = "\n".join(lines)
    assert code == 0, text
    for needle in (
        "orders committed         200",
        "lost                     0",
        "invoices (effects)       200",
        "double effects           0",
        "effects out of key order 0",
        "SIGKILLed",
    ):
        assert needle in text
    found = re.search(r"topic (orders-[0-9a-f]{8})", text)
    assert found, text
    assert f"removed {found[1]} and {found[1]}.dlq from the broker" in text
    return text, found[1]


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=getattr(pytest.mark, n)) for n in ("rabbitmq", "redis", "nats")]
)
def test_the_demo_runs_against_another_broker_and_cleans_up(name: str) -> None:
    require_service(name)
    url = {"rabbitmq": AMQP_URL, "redis": REDIS_URL, "nats": NATS_URL}[name]
    text, topic = _demo_against(url)
    # Not read back (a queue is emptied by its consumer): the ledger says where the numbers come from.
    assert "as the consumer received them" in text
    # Nothing left behind, asked of the broker's own client.
    for t in (topic, topic + ".dlq"):
        if name == "rabbitmq":
            assert asyncio.run(amqp_queue(t)) is None
        elif name == "redis":
            assert with_redis(lambda r: r.exists(t)) == 0  # noqa: B023
        else:
            assert asyncio.run(nats_subjects(t)) is None


@pytest.mark.kafka
def test_the_demo_runs_against_an_external_kafka(kafka: Any) -> None:
    text, topic = _demo_against(kafka.url)
    assert "read back from the broker" in text
    assert kafka_partitions(kafka.bootstrap, topic) == 0


@pytest.mark.rocketmq
def test_the_demo_runs_against_rocketmq_and_cleans_up(rocketmq: Any) -> None:
    """Issue 13's "done when": outbox -> relay (SIGKILLed) -> RocketMQ -> consumer with inbox, lost 0
    and double effects 0; the topics and the consumer group it declared are gone after it."""
    from zeroloss.brokers.rocketmq_admin import RocketMQAdmin
    from zeroloss.brokers.rocketmq_fields import rocketmq_topic

    text, topic = _demo_against(rocketmq.zeroloss_url)
    assert "(RocketMQ)" in text
    assert "unique ids on the broker 200  (read back from the broker)" in text  # not only what was consumed
    group = re.search(r"created\s+consumer group (zeroloss-demo-[0-9a-f]{8})", text)
    assert group, text  # created ahead: a RocketMQ consumer cannot join a group that does not exist
    assert f"removed consumer group {group[1]} from the broker" in text
    admin = RocketMQAdmin(rocketmq.namesrv_addr)
    for t in (topic, topic + ".dlq"):
        assert not admin.routed(rocketmq_topic(t))
    assert admin.group_config(group[1]) is None


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when this returns: nothing listens there


def test_the_demo_on_an_unreachable_rocketmq_proxy_says_so_before_declaring_anything() -> None:
    """Declaring goes to the name server, and the relay would retry a dead proxy for minutes: the
    proxy is checked first. Exit 1 with one line naming it; nothing created (the name server here
    is the shared test server's port, up or not: it is never asked)."""
    port = _closed_port()
    result = CliRunner().invoke(
        main, ["demo", "--orders", "10", "--target", f"rocketmq://127.0.0.1:{port}?namesrv=127.0.0.1:19876"]
    )
    assert result.exit_code == 1, result.output
    assert (
        f"error: RocketMQ proxy 127.0.0.1:{port} (the URL's HOST:PORT, gRPC) does not accept connections"
        in result.output
    )
    assert "is started by: make services" in result.output  # the one command, as the Makefile has it
    assert "created" not in result.output
    assert "Traceback" not in result.output


def test_the_demo_on_an_unreachable_rocketmq_name_server_says_which_one() -> None:
    port = _closed_port()
    with socket.socket() as proxy:  # only accepts connections: the demo checks no more before declaring
        proxy.bind(("127.0.0.1", 0))
        proxy.listen()
        url = f"rocketmq://ak:s3cret-key@127.0.0.1:{proxy.getsockname()[1]}?namesrv=127.0.0.1:{port}"
        result = CliRunner().invoke(main, ["demo", "--orders", "10", "--target", url])
    assert result.exit_code == 1, result.output
    assert f"error: RocketMQ name server 127.0.0.1:{port}" in result.output
    assert "while declaring" in result.output and "ConnectionRefusedError" in result.output
    assert "Traceback" not in result.output
    assert "s3cret-key" not in result.output  # the secret key of the URL is masked: rocketmq://ak:***@...


def test_make_services_starts_the_rocketmq_server_the_demo_names() -> None:
    """The demo's hint for a dead RocketMQ proxy names `make services`: that target must start it."""
    dry = subprocess.run(["make", "-n", "services"], cwd=REPO, capture_output=True, text=True, check=True)
    assert "tests.rocketmq_server start" in dry.stdout, dry.stdout


def test_make_services_on_a_machine_without_java_says_so_and_goes_on() -> None:
    """As the rocketmq fixture skips there, the RocketMQ line of make services does not fail
    (it does under CI, where the tests would fail anyway)."""
    env = {"PATH": str(REPO / ".venv" / "bin"), "HOME": str(Path.home())}  # no java on it, no JAVA_HOME
    for ci, code in ((None, 0), ("1", 1)):
        done = subprocess.run(
            [sys.executable, "-m", "tests.rocketmq_server", "start"],
            cwd=REPO,
            env={**env, **({"CI": ci} if ci else {})},
            capture_output=True,
            text=True,
        )
        assert done.returncode == code, done.stderr
        assert "not started: no java" in done.stderr  # "or mvn" too while the jars are not cached
