"""JetStream errors that are the server's state, not the message's — JetStream not enabled (503
from stream info), a full store (503 from a publish) — are outages: no message is failed or
spends an attempt for them, and the relay delivers everything once JetStream is back. A stream
the server refuses for good for this topic is still ``failed``.

Each test runs its own nats-server on a free port (JetStream off, or with a tiny store), so the
shared server on 4222 is never disturbed."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.broker_harness import NATS_URL
from tests.conftest import OutboxHarness, require_service, unique_topic
from zeroloss.brokers.base import Status
from zeroloss.brokers.nats import NatsBroker, stream_name
from zeroloss.embedded_broker import free_port, port_open
from zeroloss.message import new_message
from zeroloss.outbox.base import State
from zeroloss.relay import Relay, RelaySettings

pytestmark = pytest.mark.nats

FAST = RelaySettings(batch_size=100, backoff_base_s=0.01, max_backoff_s=0.05, idle_wait_s=0.01, max_attempts=2)


@contextmanager
def nats_server(port: int, store: Path, *, jetstream: bool, max_file_store: str | None = None) -> Iterator[None]:
    """A nats-server of our own on ``port``; ``jetstream=False`` answers every JetStream call 503."""
    if shutil.which("nats-server") is None:
        pytest.skip("no nats-server binary")
    conf = store / f"server-{port}.conf"
    js = f'jetstream {{ store_dir: "{store / "js"}"' + (f", max_file_store: {max_file_store}" if max_file_store else "")
    conf.write_text(f'listen: "127.0.0.1:{port}"\n' + (js + " }\n" if jetstream else ""))
    proc = subprocess.Popen(["nats-server", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not port_open(port):
            assert proc.poll() is None, f"nats-server exited {proc.returncode}"
            assert time.monotonic() < deadline, "nats-server did not listen within 20 s"
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.mark.parametrize("outbox", ["spool", "sqlite"], indirect=True)
def test_jetstream_unavailable_is_an_outage_not_a_failed_message(outbox: OutboxHarness, tmp_path: Path) -> None:
    # Before the fix the 503 from stream info marked the topic refused: the message went to
    # `failed` and its key was parked until a person acted.
    port = free_port()
    topic = unique_topic("js503")
    ids = [outbox.add(topic=topic, value=b"%d" % i, key=b"k") for i in range(5)]
    broker = NatsBroker(f"nats://127.0.0.1:{port}", timeout_s=5.0)
    try:
        with nats_server(port, tmp_path, jetstream=False):
            relay = Relay(outbox.store, broker, FAST)
            deadline = time.monotonic() + 30
            while relay.counters.broker_errors < 3:  # more rounds than max_attempts: nothing may be spent
                assert relay.counters.failed == 0 and time.monotonic() < deadline, relay.counters
                relay.run_once()
            counts = outbox.store.stats().counts
            assert counts[State.FAILED] == 0, f"a JetStream outage failed messages: {counts}"
            assert counts[State.PENDING] == 5 and relay.counters.broker_errors >= 1
            for mid in ids:
                state, msg = outbox.store.get(mid)
                assert state is State.PENDING and msg.attempts == 0, (state, msg.attempts)
                assert "ServiceUnavailable" in (msg.last_error or ""), msg.last_error
        with nats_server(port, tmp_path, jetstream=True):  # JetStream is back
            Relay(outbox.store, broker, FAST).drain(timeout_s=60)
            assert outbox.store.stats().counts[State.SUCCESS] == 5

            async def stored() -> int:
                import nats

                nc = await nats.connect(f"nats://127.0.0.1:{port}")
                try:
                    return int((await nc.jetstream().stream_info(stream_name(topic))).state.messages)
                finally:
                    await nc.close()

            assert asyncio.run(stored()) == 5
    finally:
        broker.close()


@pytest.mark.parametrize("outbox", ["spool"], indirect=True)
def test_a_full_jetstream_store_spends_no_attempts(outbox: OutboxHarness, tmp_path: Path) -> None:
    # A 1 MB store takes about 20 of these 50 kB messages, then answers every publish 503
    # (insufficient resources). Before the fix that was RETRY: an attempt spent on each round,
    # and with max_attempts 2 the message went to `failed` while the store was merely full.
    port = free_port()
    topic = unique_topic("jsfull")
    n = 40
    ids = [outbox.add(topic=topic, value=bytes([i]) * 50_000, key=b"k") for i in range(n)]
    broker = NatsBroker(f"nats://127.0.0.1:{port}", timeout_s=5.0)
    try:
        with nats_server(port, tmp_path, jetstream=True, max_file_store="1MB"):
            relay = Relay(outbox.store, broker, FAST)
            deadline = time.monotonic() + 30
            while relay.counters.broker_errors < 3:  # more rounds than max_attempts
                assert relay.counters.failed == 0 and time.monotonic() < deadline, relay.counters
                relay.run_once()
            counts = outbox.store.stats().counts
            assert counts[State.FAILED] == 0, f"a full store failed messages: {counts}"
            assert 0 < counts[State.SUCCESS] < n, counts  # what fitted is kept; the rest waits
            assert all(
                outbox.store.get(mid)[1].attempts == 0 for mid in ids if outbox.store.get(mid)[0] is State.PENDING
            )

            async def make_room() -> None:
                import nats

                nc = await nats.connect(f"nats://127.0.0.1:{port}")
                try:
                    await nc.jetstream().purge_stream(stream_name(topic))
                finally:
                    await nc.close()

            while (done := outbox.store.stats().counts[State.SUCCESS]) < n:  # room for ~20 at a time
                assert time.monotonic() < deadline + 60, f"{done} of {n} delivered"
                asyncio.run(make_room())
                relay.run_once()
            assert outbox.store.stats().counts[State.FAILED] == 0
    finally:
        broker.close()


def test_a_stream_the_server_refuses_for_this_topic_is_still_rejected() -> None:
    # 500 with err_code 10074 (replicas > 1 on a server that is not clustered): the stream as
    # configured can never be made here, so the message is REJECTED, not retried as an outage.
    require_service("nats")
    topic = unique_topic("r3")
    broker = NatsBroker(NATS_URL, timeout_s=5.0, replicas=3)
    try:
        (out,) = broker.publish([new_message(topic, b"x", key=b"k")])
    finally:
        broker.close()
    assert out.status is Status.REJECTED and "replicas" in (out.error or ""), out
