"""A broker that is down when the relay starts: nothing lost, no attempts spent, backlog visible."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import unique_topic
from tests.waiting import wait_until
from zeroloss.cli import main
from zeroloss.embedded_broker import EmbeddedBroker, free_port, port_open
from zeroloss.outbox.base import State

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def test_relay_waits_out_a_dead_broker_and_delivers_everything(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    source = f"spool://{spool_dir}"
    port = free_port()
    from zeroloss.outbox.spool import FileSpool

    spool = FileSpool(spool_dir)
    topic = unique_topic("outage")
    ids = []
    for i in range(200):
        with spool.transaction() as tx:
            ids.append(tx.add(topic=topic, value=b"%d" % i, key=b"k%d" % (i % 5)))
    log = tmp_path / "relay.log"
    with open(log, "ab") as out:
        relay = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "zeroloss",
                "-v",
                "relay",
                "--source",
                source,
                "--target",
                f"kafka://127.0.0.1:{port}",
                "--timeout-s",
                "1",
                "--lease-s",
                "5",
                "--max-backoff-s",
                "1",
                "--max-attempts",
                "2",
                "--relay-id",
                "outage",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    broker = EmbeddedBroker(port)
    try:
        wait_until(lambda: "broker unavailable" in log.read_text(), 60, "the relay to notice the outage")
        status = CliRunner().invoke(main, ["status", "--source", source, "--json"])
        counts = json.loads(status.output)["counts"]
        # nothing can have been delivered or given up on; pending+sending is not compared to 200
        # here because a file the relay moves between the two directory scans is counted in neither
        assert counts["success"] == 0 and counts["failed"] == 0 and counts["doubt"] == 0
        broker.start()
        wait_until(lambda: spool.stats().counts[State.SUCCESS] == 200, 120, "delivery after the broker came up")
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(30) == 0
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait()
        broker.stop()
    # max-attempts 2 and many outage rounds: still nothing failed, because outages spend no attempts
    assert spool.stats().counts[State.FAILED] == 0
    assert all(spool.get(i)[1].attempts == 0 for i in ids[:5])


def test_zeroloss_broker_command_serves_until_interrupted(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "zeroloss", "broker", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # printed once the port answers
        assert b"listening at kafka://127.0.0.1:%d" % port in first
        assert port_open(port)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # a port in use is a configuration error, said plainly
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        res = subprocess.run(
            [sys.executable, "-m", "zeroloss", "broker", "--port", str(busy)],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ},
        )
    assert res.returncode == 2
    assert "already in use" in res.stderr


@pytest.mark.parametrize("fault", ["nobody-listens", "broker-frozen"])
def test_sigterm_stops_the_relay_at_once_while_the_broker_does_not_answer(fault: str, tmp_path: Path) -> None:
    """With --timeout-s 60 the relay used to sit out the whole timeout (in init_transactions or
    flush) before it looked at the signal. Stop means stop: within seconds, exit 0, and the
    batch back in pending with no attempt spent."""
    from zeroloss.outbox.spool import FileSpool

    spool = FileSpool(tmp_path / "spool")
    with spool.transaction() as tx:
        mid = tx.add(topic=unique_topic("stop"), value=b"v", key=b"k")
    broker = EmbeddedBroker(free_port())
    if fault == "broker-frozen":
        broker.start()
        assert broker.process is not None
        broker.process.send_signal(signal.SIGSTOP)  # accepts connections, answers nothing
    log = tmp_path / "relay.log"
    with open(log, "ab") as out:
        relay = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "zeroloss",
                "-v",
                "relay",
                "--source",
                f"spool://{tmp_path / 'spool'}",
                "--target",
                broker.url,
                "--timeout-s",
                "60",
                "--lease-s",
                "120",
                "--relay-id",
                f"stop-{fault}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: "relay started" in log.read_text(), 60, "the relay to start")
        relay.send_signal(signal.SIGTERM)
        try:
            code = relay.wait(15)  # far below the 60 s timeout it used to sit out
        except subprocess.TimeoutExpired:
            pytest.fail(f"the relay ignored SIGTERM for 15 s while the broker was down:\n{log.read_text()[-3000:]}")
        assert code == 0, log.read_text()[-3000:]
        state, msg = FileSpool(tmp_path / "spool").get(mid)
        assert state is State.PENDING and msg.attempts == 0
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait()
        if broker.process is not None:
            broker.process.send_signal(signal.SIGCONT)
        broker.stop()
        spool.close()


def test_a_second_relay_on_one_spool_exits_2_and_names_the_first(tmp_path: Path) -> None:
    from zeroloss.outbox.spool import FileSpool

    spool = FileSpool(tmp_path / "spool")
    with spool.transaction() as tx:
        tx.add(topic=unique_topic("one"), value=b"v", key=b"k")
    spool.close()
    args = [
        sys.executable,
        "-m",
        "zeroloss",
        "-v",
        "relay",
        "--source",
        f"spool://{tmp_path / 'spool'}",
        "--target",
        f"kafka://127.0.0.1:{free_port()}",
        "--timeout-s",
        "1",
        "--lease-s",
        "5",
    ]
    log = tmp_path / "first.log"
    with open(log, "ab") as out:
        first = subprocess.Popen([*args, "--relay-id", "first"], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "broker unavailable" in log.read_text(), 60, "the first relay to claim")
        second = subprocess.run([*args, "--relay-id", "second"], capture_output=True, text=True, timeout=60)
        assert second.returncode == 2, second.stderr
        assert f"another relay (pid {first.pid} on" in second.stderr and "one relay per spool" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0, log.read_text()[-2000:]
