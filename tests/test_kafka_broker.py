"""KafkaBroker against a real embedded broker: delivery, rejection, holding, outages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import unique_topic
from zeroloss.brokers.base import Broker, Status
from zeroloss.brokers.kafka import KafkaBroker, parse_bootstrap, producer_config
from zeroloss.embedded_broker import EmbeddedBroker
from zeroloss.errors import BrokerError, ConfigError
from zeroloss.message import new_message
from zeroloss.outbox.spool import FileSpool
from zeroloss.readback import read_topic

pytestmark = pytest.mark.kafka


def test_bad_urls_and_unsafe_settings_are_refused() -> None:
    for bad in ("kafka://", "kafka://host", "http://h:1", "kafka://h:x"):
        with pytest.raises(ConfigError):
            parse_bootstrap(bad)
    assert parse_bootstrap("kafka://a:1,b:2/") == "a:1,b:2"
    with pytest.raises(ConfigError, match="acks"):
        producer_config("h:1", None, 5, {"acks": "1"})
    with pytest.raises(ConfigError, match=r"enable\.idempotence"):
        producer_config("h:1", None, 5, {"enable.idempotence": False})


@pytest.mark.parametrize("transactional", [True, False])
def test_a_batch_is_delivered_with_ids_and_locations(kafka: EmbeddedBroker, transactional: bool) -> None:
    topic = unique_topic()
    broker = KafkaBroker(kafka.url, transactional_id=f"test-{topic}" if transactional else None, timeout_s=15)
    assert isinstance(broker, Broker)
    msgs = [new_message(topic, b"v%d" % i, key=b"k%d" % (i % 3)) for i in range(300)]
    try:
        outcomes = broker.publish(msgs)
    finally:
        broker.close()
    assert [o.message.id for o in outcomes] == [m.id for m in msgs]
    assert {o.status for o in outcomes} == {Status.DELIVERED}
    assert all(o.location and o.location.startswith(f"{topic}/") for o in outcomes)
    seen = read_topic(kafka.url, topic, expect=[m.id for m in msgs])
    assert set(seen.ids) == {m.id for m in msgs}
    for key, ids in seen.order.items():
        assert ids == [m.id for m in msgs if m.key == key]


def test_an_oversized_message_is_rejected_its_key_held_and_the_rest_delivered(kafka: EmbeddedBroker) -> None:
    topic = unique_topic()
    broker = KafkaBroker(
        kafka.url, transactional_id=f"test-{topic}", timeout_s=15, config={"message.max.bytes": 20_000}
    )
    big = new_message(topic, b"x" * 50_000, key=b"A")
    after_big = new_message(topic, b"a2", key=b"A")
    other = new_message(topic, b"b1", key=b"B")
    try:
        outcomes = broker.publish([big, after_big, other])
    finally:
        broker.close()
    by_id = {o.message.id: o for o in outcomes}
    assert by_id[big.id].status is Status.REJECTED
    assert "MSG_SIZE_TOO_LARGE" in (by_id[big.id].error or "")
    assert by_id[after_big.id].status is Status.HELD
    assert by_id[other.id].status is Status.DELIVERED
    seen = read_topic(kafka.url, topic, expect=[other.id])
    assert set(seen.ids) == {other.id}


def test_an_unreachable_broker_raises_a_retriable_broker_error() -> None:
    from zeroloss.embedded_broker import free_port

    broker = KafkaBroker(f"kafka://127.0.0.1:{free_port()}", transactional_id="test-unreachable", timeout_s=2)
    with pytest.raises(BrokerError) as info:
        broker.publish([new_message("t", b"v")])
    assert info.value.retriable
    broker.close()


@pytest.mark.slow
def test_the_producer_is_recreated_after_the_broker_restarts() -> None:
    b = EmbeddedBroker().start()
    topic = unique_topic()
    broker = KafkaBroker(b.url, transactional_id=f"test-{topic}", timeout_s=3)
    try:
        assert broker.publish([new_message(topic, b"1")])[0].status is Status.DELIVERED
        b.kill()
        with pytest.raises(BrokerError):
            broker.publish([new_message(topic, b"2")])
        b.start()
        m3 = new_message(topic, b"3")
        for _ in range(20):  # the relay's loop, condensed: keep trying until the broker is back
            try:
                outcome = broker.publish([m3])[0]
                break
            except BrokerError:
                continue
        assert outcome.status is Status.DELIVERED
        assert broker.producers_created >= 2
    finally:
        broker.close()
        b.stop()


def test_a_restarted_relay_fences_the_open_transaction_its_dead_predecessor_left(kafka: EmbeddedBroker) -> None:
    """A relay SIGKILLed inside a transaction leaves it open, and read_committed consumers stop
    at it. The same transactional.id, started again, aborts it and readers move on."""
    import subprocess
    import sys

    topic = unique_topic()
    tid = f"fence-{topic}"
    dead = (
        "import os\n"
        "from zeroloss.brokers.kafka import kafka_module, producer_config\n"
        f"p = kafka_module().Producer(producer_config({kafka.bootstrap!r}, {tid!r}, 5))\n"
        "p.init_transactions(10); p.begin_transaction()\n"
        f"p.produce({topic!r}, key=b'k', value=b'never committed'); p.flush(10)\n"
        "os._exit(9)\n"
    )
    assert subprocess.run([sys.executable, "-c", dead], timeout=60).returncode == 9
    broker = KafkaBroker(kafka.url, transactional_id=tid, timeout_s=10)
    after = new_message(topic, b"after", key=b"k")
    try:
        assert broker.publish([after])[0].status is Status.DELIVERED
    finally:
        broker.close()
    assert after.id in read_topic(kafka.url, topic, expect=[after.id], idle_s=5).ids


def test_a_restarted_relay_with_nothing_to_send_still_fences_at_once(kafka: EmbeddedBroker, tmp_path: Path) -> None:
    """The chaos suite found it: two relays, one SIGKILLed mid-transaction and restarted; the
    other sent everything, so the restarted one never published, never fenced, and the consumer
    stayed stuck behind the dead transaction. A relay now opens its producer at start."""
    import subprocess
    import sys

    topic = unique_topic()
    relay_id = f"fence-idle-{topic}"
    dead = (
        "import os\n"
        "from zeroloss.brokers.kafka import kafka_module, producer_config\n"
        f"p = kafka_module().Producer(producer_config({kafka.bootstrap!r}, 'zeroloss-relay-{relay_id}', 5))\n"
        "p.init_transactions(10); p.begin_transaction()\n"
        f"p.produce({topic!r}, key=b'k', value=b'never committed'); p.flush(10)\n"
        "os._exit(9)\n"
    )
    assert subprocess.run([sys.executable, "-c", dead], timeout=60).returncode == 9
    other = KafkaBroker(kafka.url, timeout_s=10)  # the relay that did the work, same key: same partition
    after = new_message(topic, b"after", key=b"k")
    try:
        assert other.publish([after])[0].status is Status.DELIVERED
    finally:
        other.close()
    FileSpool(tmp_path / "empty").close()  # an empty spool: only init (or the app) makes one
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "zeroloss",
            "relay",
            "--source",
            f"spool://{tmp_path / 'empty'}",
            "--target",
            kafka.url,
            "--relay-id",
            relay_id,
            "--drain",
        ],
        timeout=120,
    )
    assert res.returncode == 0
    assert after.id in read_topic(kafka.url, topic, expect=[after.id], idle_s=5).ids


def test_the_default_relay_id_is_stable_for_one_outbox_and_distinct_between_outboxes() -> None:
    from zeroloss.registry import default_relay_id

    assert default_relay_id("sqlite:///a.db", "t") == default_relay_id("sqlite:///a.db", "t")
    assert default_relay_id("sqlite:///a.db", "t") != default_relay_id("sqlite:///b.db", "t")


class FatalInFlush:
    """A transactional producer whose flush() fails the way confluent-kafka's does when the client
    hits a fatal error while delivery reports are still to be served: the binding raises the fatal
    KafkaException, calls the next delivery callback with it pending, and Python turns that into a
    SystemError chained to it. Seen on the three-broker cluster after an unclean leader election
    (OUT_OF_ORDER_SEQUENCE_NUMBER); before the fix the SystemError killed the relay."""

    def __init__(self) -> None:
        self.purged = False

    def begin_transaction(self) -> None:
        pass

    def produce(self, *args: object, **kwargs: object) -> None:
        pass

    def flush(self, timeout: float | None = None) -> int:
        import confluent_kafka as ck

        if self.purged:
            return 0
        fatal = ck.KafkaError(ck.KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, "sequence desynchronization", fatal=True)
        try:
            raise ck.KafkaException(fatal)
        except ck.KafkaException as exc:
            raise SystemError("<function on_delivery> returned a result with an exception set") from exc

    def purge(self, **kwargs: object) -> None:
        self.purged = True


@pytest.mark.parametrize("transactional", [False, True])
def test_a_fatal_client_error_surfacing_as_systemerror_is_an_outage_and_the_producer_is_dropped(
    transactional: bool,
) -> None:
    broker = KafkaBroker("kafka://127.0.0.1:1", transactional_id="t-fatal" if transactional else None, timeout_s=1)
    broker._producer = fake = FatalInFlush()
    with pytest.raises(BrokerError, match="OUT_OF_ORDER_SEQUENCE_NUMBER") as info:
        broker.publish([new_message("t", b"v")])
    assert info.value.retriable  # the relay puts the batch back without spending an attempt
    assert fake.purged and broker._producer is None  # the next publish starts a new producer


def test_a_systemerror_with_no_kafka_error_behind_it_is_not_swallowed() -> None:
    class Broken(FatalInFlush):
        def flush(self, timeout: float | None = None) -> int:
            raise SystemError("a bug, not the broker")

    broker = KafkaBroker("kafka://127.0.0.1:1", timeout_s=1)
    broker._producer = Broken()
    with pytest.raises(SystemError, match="a bug"):
        broker.publish([new_message("t", b"v")])


def test_librdkafka_repeats_are_held_back_and_counted() -> None:
    """An outage made hundreds of identical librdkafka lines at once; one per window is enough."""
    import logging

    from zeroloss.brokers.kafka import RepeatFilter

    now = [0.0]
    f = RepeatFilter(window_s=30, clock=lambda: now[0])

    def line(client: int) -> logging.LogRecord:
        return logging.LogRecord(
            "zeroloss.librdkafka",
            logging.ERROR,
            __file__,
            1,
            "FAIL [rdkafka#producer-%d] [thrd:b/1]: b:1/bootstrap: Connect failed: refused",
            (client,),
            None,
        )

    assert f.filter(line(1))
    assert [f.filter(line(n)) for n in range(2, 300)] == [False] * 298  # other clients, same failure
    other = logging.LogRecord("zeroloss.librdkafka", logging.ERROR, __file__, 1, "x]: something else", (), None)
    assert f.filter(other)
    now[0] = 31.0
    again = line(5)
    assert f.filter(again) and "(and 298 more like it in 30s)" in again.getMessage()


def _small_topic(cluster: Any, max_bytes: int, partitions: int = 1) -> str:
    """A topic on the cluster that refuses record batches over ``max_bytes``."""
    from confluent_kafka.admin import NewTopic

    topic = unique_topic("small")
    config = {"max.message.bytes": str(max_bytes)}
    futures = cluster.admin().create_topics([NewTopic(topic, partitions, 3, config=config)])
    futures[topic].result(30)
    cluster.wait_in_sync(topic)
    return topic


@pytest.mark.kafka_cluster
@pytest.mark.parametrize("transactional", [True, False])
@pytest.mark.parametrize(
    ("partitions", "max_bytes", "n", "size"),
    [(1, 2000, 30, 100), (3, 100_000, 500, 200)],
    ids=["1-partition", "3-partitions"],
)
def test_a_batch_over_the_topics_size_limit_fails_only_the_message_too_big_by_itself(
    kafka_cluster: Any, transactional: bool, partitions: int, max_bytes: int, n: int, size: int
) -> None:
    """The broker refuses a whole record batch over max.message.bytes, small records too (librdkafka
    does not split it): the round goes again in halves, so only the big one is REJECTED and its key
    HELD. With several partitions the failed transaction also purges the records still queued for
    the others (_PURGE_QUEUE): innocent too, not an outage (that was a batch retried forever)."""
    topic = _small_topic(kafka_cluster, max_bytes, partitions)
    broker = KafkaBroker(kafka_cluster.url, transactional_id=f"test-{topic}" if transactional else None, timeout_s=15)
    small = [new_message(topic, b"s%d." % i + b"." * size, key=b"k%d" % i) for i in range(n)]
    big = new_message(topic, b"x" * (max_bytes * 2), key=b"k0")
    after_big = new_message(topic, b"after", key=b"k0")
    warm = new_message(topic, b"warm", key=b"warm")  # a relay's producer is running already
    try:
        assert [o.status for o in broker.publish([warm])] == [Status.DELIVERED]
        outcomes = {o.message.id: o for o in broker.publish([*small[: n // 2], big, after_big, *small[n // 2 :]])}
    finally:
        broker.close()
    assert [outcomes[m.id].status for m in small] == [Status.DELIVERED] * n
    assert outcomes[big.id].status is Status.REJECTED and "MSG_SIZE_TOO_LARGE" in (outcomes[big.id].error or "")
    assert outcomes[after_big.id].status is Status.HELD
    seen = read_topic(kafka_cluster.url, topic, expect=[warm.id, *(m.id for m in small)])
    assert set(seen.ids) == {warm.id, *(m.id for m in small)}


@pytest.mark.kafka_cluster
def test_without_a_transaction_a_later_message_of_a_key_is_not_stored_after_an_earlier_one_failed(
    kafka_cluster: Any,
) -> None:
    """Nothing can take back an acknowledged record without a transaction: a key's later message
    must not be produced while its earlier one may still fail (issue 11, item 14). One record per
    request makes the earlier one fail alone while the later one would pass."""
    topic = _small_topic(kafka_cluster, 2000)
    broker = KafkaBroker(kafka_cluster.url, timeout_s=15, config={"batch.num.messages": 1, "linger.ms": 0})
    first = new_message(topic, b"x" * 5000, key=b"k")
    second = new_message(topic, b"second", key=b"k")
    other = new_message(topic, b"other", key=b"j")
    try:
        outcomes = {o.message.id: o for o in broker.publish([first, second, other])}
    finally:
        broker.close()
    assert outcomes[first.id].status is Status.REJECTED
    assert outcomes[second.id].status is Status.HELD
    assert outcomes[other.id].status is Status.DELIVERED
    assert set(read_topic(kafka_cluster.url, topic, expect=[other.id]).ids) == {other.id}
