"""Every Prometheus metric zeroloss exports, defined here and nowhere else.
The details: docs/design.md, "metrics.py"."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    gc_collector,
    platform_collector,
    process_collector,
)

from zeroloss.errors import ConfigError

if TYPE_CHECKING:
    from zeroloss.message import Message
    from zeroloss.outbox.base import Stats

REGISTRY = CollectorRegistry(auto_describe=True)
AUDIT_REGISTRY = CollectorRegistry(auto_describe=True)
process_collector.ProcessCollector(registry=REGISTRY)
platform_collector.PlatformCollector(registry=REGISTRY)
gc_collector.GCCollector(registry=REGISTRY)

STATES = ("tmp", "pending", "sending", "success", "failed", "doubt", "malformed")
RELAY_OUTCOMES = frozenset({"delivered", "retry", "rejected", "exhausted", "held", "undecided", "outage"})
RELAY_ERROR_KINDS = frozenset({"broker", "store"})
CONSUMER_OUTCOMES = frozenset({"processed", "duplicate", "retry", "dead_lettered", "parked"})
AUDIT_WHERE = ("broker", "inbox")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)

# -- outbox (producer side and the relay's periodic view of the store) ---------------------

OUTBOX_ADDED = Counter(
    "zeroloss_outbox_added",
    "Messages added to the outbox by this process (SQL: counted at add(), "
    "before the application's commit; spool: after the commit, when promoted to pending).",
    registry=REGISTRY,
)
OUTBOX_MESSAGES = Gauge("zeroloss_outbox_messages", "Messages in the outbox per state.", ["state"], registry=REGISTRY)
OUTBOX_OLDEST_AGE = Gauge(
    "zeroloss_outbox_oldest_age_seconds",
    "Age of the oldest message per state, from its creation (malformed: since its file was written); "
    "0 when the state is empty.",
    ["state"],
    registry=REGISTRY,
)
OUTBOX_EXPIRED_LEASES = Gauge(
    "zeroloss_outbox_expired_leases",
    "Messages in sending whose lease expired (a relay died or is stuck).",
    registry=REGISTRY,
)
OUTBOX_PARKED = Gauge(
    "zeroloss_outbox_parked", "Pending messages held behind a failed message of their key.", registry=REGISTRY
)
OUTBOX_DISK_FREE = Gauge(
    "zeroloss_outbox_disk_free_bytes", "Free bytes on the spool's filesystem.", ["path"], registry=REGISTRY
)
OUTBOX_DISK_TOTAL = Gauge(
    "zeroloss_outbox_disk_total_bytes", "Size of the spool's filesystem in bytes.", ["path"], registry=REGISTRY
)
OUTBOX_STATS_TIME = Gauge(
    "zeroloss_outbox_stats_timestamp_seconds",
    "When the outbox gauges were last refreshed (Unix time).",
    registry=REGISTRY,
)

# -- relay ---------------------------------------------------------------------------------

RELAY_CLAIMED = Counter(
    "zeroloss_relay_claimed", "Messages claimed from the outbox (pending -> sending).", registry=REGISTRY
)
RELAY_MESSAGES = Counter(
    "zeroloss_relay_messages", "What became of claimed messages, by outcome.", ["outcome"], registry=REGISTRY
)
RELAY_ERRORS = Counter(
    "zeroloss_relay_errors", "Broker-wide and store failures the relay backed off from.", ["kind"], registry=REGISTRY
)
RELAY_BROKER_UP = Gauge(
    "zeroloss_relay_broker_up", "1 when the last publish reached the broker, 0 during an outage.", registry=REGISTRY
)
RELAY_PUBLISH_SECONDS = Histogram(
    "zeroloss_relay_publish_seconds",
    "Time to publish one batch (one broker transaction), failures included.",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
RELAY_DELIVERY_LATENCY = Histogram(
    "zeroloss_relay_delivery_latency_seconds",
    "End-to-end latency per delivered message: from its creation (the app's add) to the broker's acknowledgement.",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)

# -- consumer (called by zeroloss.consumer) ---------------------------------------------------

CONSUMER_MESSAGES = Counter(
    "zeroloss_consumer_messages",
    "Messages the consumer finished, by outcome.",
    ["group", "topic", "outcome"],
    registry=REGISTRY,
)
CONSUMER_HANDLER_SECONDS = Histogram(
    "zeroloss_consumer_handler_seconds",
    "Time from taking a message to committing its inbox transaction.",
    ["group", "topic"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
CONSUMER_LAG = Gauge(
    "zeroloss_consumer_lag_messages",
    "Records between the group's position and the end of the partition.",
    ["group", "topic", "partition"],
    registry=REGISTRY,
)
CONSUMER_END_TO_END = Histogram(
    "zeroloss_consumer_end_to_end_seconds",
    "Per message handled: from its creation (the app's add, read from its UUIDv7 id; the record's timestamp for "
    "foreign records) to the commit of its inbox transaction.",
    ["group", "topic"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)

# -- audit (written to a textfile-collector file by `zeroloss audit --prom-file`) -----------

AUDIT_CHECKED = Gauge(
    "zeroloss_audit_checked_messages", "Success messages the last audit checked.", registry=AUDIT_REGISTRY
)
AUDIT_MISSING = Gauge(
    "zeroloss_audit_missing_messages",
    "Messages the last audit did not find, by where "
    "it looked (broker: at the recorded offset; inbox: in the consumer group's inbox).",
    ["where"],
    registry=AUDIT_REGISTRY,
)
AUDIT_LOSS_RATIO = Gauge(
    "zeroloss_audit_loss_ratio",
    "missing / checked of the last audit, by where it looked.",
    ["where"],
    registry=AUDIT_REGISTRY,
)
AUDIT_LAST_RUN = Gauge(
    "zeroloss_audit_last_run_timestamp_seconds", "When the last audit finished (Unix time).", registry=AUDIT_REGISTRY
)

for _state in STATES:
    OUTBOX_MESSAGES.labels(_state)
    OUTBOX_OLDEST_AGE.labels(_state)
for _outcome in RELAY_OUTCOMES:
    RELAY_MESSAGES.labels(_outcome)
for _kind in RELAY_ERROR_KINDS:
    RELAY_ERRORS.labels(_kind)
RELAY_BROKER_UP.set(1)


# -- the functions the rest of zeroloss calls ----------------------------------------------------


def outbox_added(n: int) -> None:
    OUTBOX_ADDED.inc(n)


def observe_stats(stats: Stats, *, path: str | None = None) -> None:
    """Set the outbox gauges from :meth:`OutboxStore.stats` (the relay calls this every few seconds)."""
    for state in STATES:
        OUTBOX_MESSAGES.labels(state).set(sum(n for s, n in stats.counts.items() if s.value == state))
        OUTBOX_OLDEST_AGE.labels(state).set(next((a for s, a in stats.oldest_age_s.items() if s.value == state), 0.0))
    OUTBOX_EXPIRED_LEASES.set(stats.expired_leases)
    OUTBOX_PARKED.set(stats.parked)
    if path is not None and stats.disk_free_bytes is not None and stats.disk_total_bytes is not None:
        OUTBOX_DISK_FREE.labels(path).set(stats.disk_free_bytes)
        OUTBOX_DISK_TOTAL.labels(path).set(stats.disk_total_bytes)
    OUTBOX_STATS_TIME.set(time.time())


def relay_claimed(n: int) -> None:
    RELAY_CLAIMED.inc(n)


def relay_outcome(outcome: str, n: int = 1) -> None:
    if outcome not in RELAY_OUTCOMES:
        raise ConfigError(f"unknown relay outcome {outcome!r}; one of {sorted(RELAY_OUTCOMES)}")
    if n:
        RELAY_MESSAGES.labels(outcome).inc(n)


def relay_error(kind: str) -> None:
    if kind not in RELAY_ERROR_KINDS:
        raise ConfigError(f"unknown relay error kind {kind!r}; one of {sorted(RELAY_ERROR_KINDS)}")
    RELAY_ERRORS.labels(kind).inc()
    if kind == "broker":
        RELAY_BROKER_UP.set(0)


def relay_published(seconds: float, ok: bool) -> None:
    """One publish call took ``seconds``; ``ok`` if the broker answered (per-message outcomes)."""
    RELAY_PUBLISH_SECONDS.observe(seconds)
    if ok:
        RELAY_BROKER_UP.set(1)


def relay_delivered(messages: Iterable[Message], now: float | None = None) -> None:
    """Count delivered messages and observe their end-to-end latency (creation → broker ack)."""
    now = time.time() if now is None else now
    n = 0
    for m in messages:
        RELAY_DELIVERY_LATENCY.observe(max(0.0, now - m.created_at))
        n += 1
    relay_outcome("delivered", n)


def consumer_processed(
    group: str, topic: str, outcome: str, seconds: float | None = None, age_s: float | None = None
) -> None:
    """For :mod:`zeroloss.consumer`: one message finished with ``outcome`` (``processed``,
    ``duplicate``, ``retry``, ``dead_lettered``); ``seconds`` from taking it to the commit;
    ``age_s`` from its creation to the commit."""
    if outcome not in CONSUMER_OUTCOMES:
        raise ConfigError(f"unknown consumer outcome {outcome!r}; one of {sorted(CONSUMER_OUTCOMES)}")
    counter, handler_s, end_to_end = _consumer_children(group, topic, outcome)
    counter.inc()
    if seconds is not None:
        handler_s.observe(seconds)
    if age_s is not None:
        end_to_end.observe(max(0.0, age_s))


@functools.lru_cache(maxsize=1024)
def _consumer_children(group: str, topic: str, outcome: str) -> tuple[Any, Any, Any]:
    """The labelled series of one (group, topic, outcome): ``labels()`` hashes and locks on each
    call, which per message cost more than the increments themselves."""
    return (
        CONSUMER_MESSAGES.labels(group, topic, outcome),
        CONSUMER_HANDLER_SECONDS.labels(group, topic),
        CONSUMER_END_TO_END.labels(group, topic),
    )


def consumer_lag(group: str, topic: str, partition: int, lag: int) -> None:
    """For :mod:`zeroloss.consumer`: records between the group's position and the partition's end."""
    CONSUMER_LAG.labels(group, topic, str(partition)).set(max(0, lag))


def consumer_lag_forget(group: str, topic: str, partition: int) -> None:
    """A partition this consumer no longer owns: its lag is its new owner's to report."""
    with contextlib.suppress(KeyError):
        CONSUMER_LAG.remove(group, topic, str(partition))


def record_audit(checked: int, missing: dict[str, int], finished_at: float | None = None) -> None:
    """Set the audit gauges; ``missing`` maps where (``broker`` / ``inbox``) to a count, for the
    checks that ran."""
    AUDIT_CHECKED.set(checked)
    for where, n in missing.items():
        if where not in AUDIT_WHERE:
            raise ConfigError(f"unknown audit place {where!r}; one of {AUDIT_WHERE}")
        AUDIT_MISSING.labels(where).set(n)
        AUDIT_LOSS_RATIO.labels(where).set(n / checked if checked else 0.0)
    AUDIT_LAST_RUN.set(time.time() if finished_at is None else finished_at)


_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created")}


def metric_names(registries: Iterable[CollectorRegistry] = (REGISTRY, AUDIT_REGISTRY)) -> set[str]:
    """Every sample name zeroloss can expose (``..._total``, ``..._bucket`` and so on), labelled
    children or not: what alert rules and dashboards may refer to."""
    names: set[str] = set()
    for registry in registries:
        for family in registry.collect():
            names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
            names.update(s.name for s in family.samples)
    return names


def zeroloss_metric_families() -> dict[str, str]:
    """The zeroloss metrics (name as exposed in ``# TYPE`` lines → type), for docs and tests."""
    out: dict[str, str] = {}
    for registry in (REGISTRY, AUDIT_REGISTRY):
        for family in registry.collect():
            if family.name.startswith("zeroloss_"):
                name = family.name + ("_total" if family.type == "counter" else "")
                out[name] = family.type
    return out
