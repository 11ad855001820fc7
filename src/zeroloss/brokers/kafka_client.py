"""confluent-kafka (librdkafka), as every Kafka part uses it: loading the library, the bootstrap
URL, the producer settings zeroloss insists on, topic creation, and which of librdkafka's error
names mean what (permanent for a message, broker-wide, a refused admin setting). The producer is
:mod:`zeroloss.brokers.kafka`, the reader :mod:`zeroloss.brokers.kafka_reader`, the consume loop
:mod:`zeroloss.consumer.kafka_loop`."""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from zeroloss.errors import BrokerError, ConfigError, MissingExtraError

log = logging.getLogger("zeroloss.brokers.kafka")  # the adapter's one logger name, as before the split

# Error names (KafkaError.name()) that no retry can fix for this message.
PERMANENT_ERRORS = frozenset(
    {
        "MSG_SIZE_TOO_LARGE",
        "RECORD_LIST_TOO_LARGE",
        "INVALID_TOPIC_EXCEPTION",
        "TOPIC_AUTHORIZATION_FAILED",
        "INVALID_RECORD",
        "_INVALID_ARG",
        "INVALID_REQUIRED_ACKS",
    }
)

# Said of every record of a produce request whose batch is too big, the innocent ones too.
SIZE_ERRORS = frozenset({"MSG_SIZE_TOO_LARGE", "RECORD_LIST_TOO_LARGE"})

# Failures of the path to the broker, not of the message: the batch goes back unspent.
BROKER_WIDE_ERRORS = frozenset(
    {
        "_MSG_TIMED_OUT",
        "_TIMED_OUT",
        "_TRANSPORT",
        "_ALL_BROKERS_DOWN",
        "_RESOLVE",
        "REQUEST_TIMED_OUT",
        "NOT_ENOUGH_REPLICAS",
        "NOT_ENOUGH_REPLICAS_AFTER_APPEND",
        "NOT_LEADER_FOR_PARTITION",
        "LEADER_NOT_AVAILABLE",
        "_PURGE_QUEUE",
        "_PURGE_INFLIGHT",
    }
)

# AdminClient errors that say the request itself is wrong (bad name, impossible sizing, not
# allowed): fixing them is the operator's job, so they are configuration errors, not outages.
ADMIN_CONFIG_ERRORS = frozenset(
    {
        "INVALID_TOPIC_EXCEPTION",
        "INVALID_PARTITIONS",
        "INVALID_REPLICATION_FACTOR",
        "INVALID_REPLICA_ASSIGNMENT",
        "INVALID_CONFIG",
        "POLICY_VIOLATION",
        "TOPIC_AUTHORIZATION_FAILED",
        "CLUSTER_AUTHORIZATION_FAILED",
        "TOPIC_DELETION_DISABLED",
    }
)
# librdkafka's local errors when no broker answered an admin request in time ("Failed while waiting
# for controller"): the error says what it waited for; the hint says what to check.
UNANSWERED = frozenset({"_TIMED_OUT", "_TRANSPORT", "_ALL_BROKERS_DOWN", "_RESOLVE"})


TRANSACTION_LOG = "__transaction_state"
"""Kafka's internal topic of transaction states: the coordinator needs it in sync to begin or end one."""


class RepeatFilter(logging.Filter):
    """Lets one copy of a log line through per ``window_s``; the next copy after the window says
    how many were held back. librdkafka repeats a connection failure for every broker, partition
    and retry (hundreds of identical lines in an outage, flushed at once)."""

    def __init__(self, window_s: float = 30.0, clock: Any = time.monotonic) -> None:
        super().__init__()
        self.window_s = window_s
        self._clock = clock
        self._seen: dict[str, tuple[float, int]] = {}  # text -> (when let through, held back since)
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        # "[rdkafka#producer-7] [thrd:…]" differ per client and thread: the text after them decides.
        text = record.getMessage().rsplit("]: ", 1)[-1]
        now = self._clock()
        with self._lock:
            if len(self._seen) > 1000:
                self._seen.clear()
            first, held = self._seen.get(text, (None, 0))
            if first is not None and now - first < self.window_s:
                self._seen[text] = (first, held + 1)
                return False
            self._seen[text] = (now, 0)
        if held:
            record.msg, record.args = f"{record.getMessage()} (and {held} more like it in {self.window_s:.0f}s)", ()
        return True


LIBRDKAFKA_LOG = logging.getLogger("zeroloss.librdkafka")
LIBRDKAFKA_LOG.addFilter(RepeatFilter())


def kafka_module() -> Any:
    """The confluent_kafka module; MissingExtraError naming zeroloss[kafka] when it is not installed."""
    try:
        import confluent_kafka
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise MissingExtraError("confluent-kafka", "kafka", "the Kafka broker adapter") from exc
    return confluent_kafka


def admin_module() -> Any:
    """``confluent_kafka.admin`` (imported by name: its stubs do not export what it has)."""
    kafka_module()  # MissingExtraError naming zeroloss[kafka] if the client is not installed
    return importlib.import_module("confluent_kafka.admin")


def parse_bootstrap(url: str) -> str:
    """``kafka://h1:9092,h2:9092`` → ``h1:9092,h2:9092``; ConfigError if it is not such a URL."""
    if not url.startswith("kafka://"):
        raise ConfigError(f"not a Kafka URL: {url!r}; write kafka://HOST:PORT[,HOST:PORT...]")
    hosts = url[len("kafka://") :].rstrip("/")
    if not hosts:
        raise ConfigError(f"Kafka URL {url!r} names no broker; write kafka://HOST:PORT")
    for hp in hosts.split(","):
        host, sep, port = hp.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"Kafka URL {url!r}: {hp!r} is not HOST:PORT")
    return hosts


def producer_config(
    bootstrap: str, transactional_id: str | None, timeout_s: float, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The producer settings zeroloss insists on (the design notes' table), plus the caller's."""
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "acks": "all",
        "enable.idempotence": True,
        "max.in.flight.requests.per.connection": 5,
        "retries": 2_147_483_647,
        "linger.ms": 5,
        "message.timeout.ms": int(timeout_s * 1000),
        "socket.keepalive.enable": True,
        "logger": logging.getLogger("zeroloss.librdkafka"),  # not stderr: the app's logging decides
    }
    if transactional_id:
        conf["transactional.id"] = transactional_id
        # A batch takes at most flush (timeout_s) + commit (timeout_s); past that the coordinator
        # may abort it. Short, so a dead relay's open transaction stops holding read_committed
        # consumers back soon (brokers that honour it; a restart with the same id fences at once).
        conf["transaction.timeout.ms"] = int((2 * timeout_s + 10) * 1000)
    conf.update(extra or {})
    for k, must in (("acks", ("all", "-1", -1)), ("enable.idempotence", (True, "true"))):
        if conf.get(k) not in must:
            raise ConfigError(f"producer setting {k}={conf.get(k)!r} would allow loss; zeroloss needs {must[0]}")
    return conf


def ensure_topics(url: str, topics: Sequence[str], *, like: str | None = None, timeout_s: float = 10.0) -> list[str]:
    """Create those of ``topics`` that do not exist yet, with as many partitions as ``like`` has
    (else the broker's default); returns the names created. One that appears meanwhile (another
    process created it) is fine. BrokerError if the broker cannot be asked or refuses."""
    ck, adm = kafka_module(), admin_module()
    admin = adm.AdminClient({"bootstrap.servers": parse_bootstrap(url), "logger": log})
    try:
        meta = admin.list_topics(timeout=timeout_s)
        missing = [t for t in dict.fromkeys(topics) if t not in meta.topics]
        if not missing:
            return []
        partitions = len(meta.topics[like].partitions) if like in meta.topics else -1
        futures = admin.create_topics(
            [adm.NewTopic(t, num_partitions=partitions) for t in missing], request_timeout=timeout_s
        )
        created = []
        for name, fut in futures.items():
            try:
                fut.result(timeout_s)
                created.append(name)
            except ck.KafkaException as exc:
                if exc.args[0].code() != ck.KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
        return created
    except ck.KafkaException as exc:
        raise BrokerError(f"cannot create topics {list(topics)} at {url}: {exc.args[0]}") from exc
