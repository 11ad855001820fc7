"""``zeroloss audit``: end-to-end reconciliation of the outbox's ``success`` ledger against the
broker and, optionally, a consumer group's inbox.
The details: docs/design.md, "audit.py"."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from zeroloss.errors import BrokerError, ConfigError
from zeroloss.message import ID_HEADER
from zeroloss.outbox.base import Delivered, OutboxAdmin

log = logging.getLogger(__name__)


@dataclass(slots=True)
class BrokerFindings:
    target: str
    confirmed: int = 0
    missing: dict[str, str] = field(default_factory=dict)  # id -> why


@dataclass(slots=True)
class InboxFindings:
    inbox: str
    group: str
    consumed: int = 0
    too_recent: int = 0
    missing: list[str] = field(default_factory=list)


@dataclass(slots=True)
class AuditReport:
    checked: int = 0  # success messages examined
    broker: BrokerFindings | None = None
    inbox: InboxFindings | None = None
    repaired: int = 0

    @property
    def missing(self) -> list[str]:
        """Every id missing anywhere, in id (= creation) order."""
        ids = set(self.broker.missing) if self.broker else set()
        ids.update(self.inbox.missing if self.inbox else ())
        return sorted(ids)

    def loss_rates(self) -> dict[str, float]:
        out = {}
        if self.broker is not None:
            out["broker"] = len(self.broker.missing) / self.checked if self.checked else 0.0
        if self.inbox is not None:
            judged = self.checked - self.inbox.too_recent
            out["inbox"] = len(self.inbox.missing) / judged if judged else 0.0
        return out

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "checked": self.checked,
            "missing": self.missing,
            "loss_rate": self.loss_rates(),
            "repaired": self.repaired,
        }
        if self.broker is not None:
            out["broker"] = {
                "target": self.broker.target,
                "delivered": self.checked,
                "confirmed": self.broker.confirmed,
                "missing": self.broker.missing,
            }
        if self.inbox is not None:
            out["inbox"] = {
                "inbox": self.inbox.inbox,
                "group": self.inbox.group,
                "delivered": self.checked,
                "consumed": self.inbox.consumed,
                "too_recent": self.inbox.too_recent,
                "missing": self.inbox.missing,
            }
        return out


def _pages(store: OutboxAdmin, since_s: float | None, page: int) -> Iterator[list[Delivered]]:
    started = time.time()
    after: str | None = None
    while True:
        since = None if since_s is None else since_s + (time.time() - started)  # one fixed floor for all pages
        got = store.list_success(since, after_id=after, limit=page)
        if not got:
            return
        yield got
        after = got[-1].message.id


def audit(
    store: OutboxAdmin,
    *,
    target: str | None = None,
    inbox: Any = None,
    inbox_url: str = "",
    group: str | None = None,
    since_s: float | None = None,
    grace_s: float = 60.0,
    page: int = 5000,
    idle_s: float = 3.0,
    timeout_s: float = 30.0,
) -> AuditReport:
    """Check every ``success`` message (created in the last ``since_s`` seconds) on the broker at
    ``target`` and/or in ``inbox`` (an :class:`zeroloss.inbox.Inbox`) for consumer ``group``."""
    if target is None and inbox is None:
        raise ConfigError("audit needs --target URL (check the broker) and/or --inbox URL --group G")
    if inbox is not None and not group:
        raise ConfigError("--inbox needs --group: whose inbox to check")
    report = AuditReport()
    reader = _reader(target, timeout_s=timeout_s, idle_s=idle_s) if target is not None else None
    if reader is not None:
        report.broker = BrokerFindings(target or "")
    if inbox is not None and group:
        report.inbox = InboxFindings(inbox_url, group)
    try:
        for batch in _pages(store, since_s, page):
            report.checked += len(batch)
            if reader is not None and report.broker is not None:
                reader.check(batch, report.broker)
            if inbox is not None and report.inbox is not None and group:
                _check_inbox(inbox, group, batch, grace_s, report.inbox)
    finally:
        if reader is not None:
            reader.close()
    log.info("audit: %d checked, %d missing", report.checked, len(report.missing))
    return report


def repair(store: OutboxAdmin, ids: Iterable[str], chunk: int = 1000) -> int:
    """Send the given ``success`` messages again (``success`` → ``pending``)."""
    todo = list(ids)
    return sum(store.resend(todo[i : i + chunk]) for i in range(0, len(todo), chunk))


# -- the broker ----------------------------------------------------------------------------------


def _reader(url: str, *, timeout_s: float, idle_s: float) -> _BrokerReader | _RocketMQReader:
    from zeroloss.registry import scheme_of

    scheme = scheme_of(url)
    if scheme == "rocketmq":
        return _RocketMQReader(url, timeout_s=timeout_s, idle_s=idle_s)
    if scheme != "kafka":  # RabbitMQ, NATS, Redis: no position recorded that could be read back
        raise ConfigError(
            f"audit --target reads messages back from Kafka and RocketMQ only, not {scheme}://; "
            "check that the consumers got them with --inbox URL --group G instead"
        )
    return _BrokerReader(url, timeout_s=timeout_s, idle_s=idle_s)


class _RocketMQReader:
    """Finds each recorded RocketMQ message by its broker message id (the remoting protocol's
    QUERY_MESSAGE through the name server's brokers) and checks it carries our id."""

    def __init__(self, url: str, *, timeout_s: float, idle_s: float) -> None:
        from zeroloss.brokers.rocketmq_admin import RocketMQAdmin
        from zeroloss.brokers.rocketmq_url import parse_url

        config = parse_url(url)
        self.idle_s = idle_s
        self.admin = RocketMQAdmin.for_url(config, timeout_s=min(timeout_s, 10.0))
        self.admin.masters()  # an unreachable name server says so now, even with nothing to check
        self._topics: dict[str, bool] = {}

    def close(self) -> None:
        pass

    def _exists(self, topic: str) -> bool:
        if topic not in self._topics:
            self._topics[topic] = self.admin.topic_config(topic) is not None
        return self._topics[topic]

    def check(self, batch: list[Delivered], out: BrokerFindings) -> None:
        from zeroloss.brokers.rocketmq import parse_location

        left: dict[str, tuple[str, str, int]] = {}
        for d in batch:
            loc = parse_location(d.location)
            if loc is None:
                out.missing[d.message.id] = f"no RocketMQ message id recorded ({d.location!r})"
            elif not self._exists(loc[0]):
                out.missing[d.message.id] = f"topic {loc[0]} does not exist on the broker"
            else:
                left[d.message.id] = loc
        deadline = time.monotonic() + self.idle_s
        while left:
            for mid, (topic, broker_id, _) in list(left.items()):
                found = self.admin.query_messages(topic, broker_id, unique=True)
                mine = [m for m in found if m.properties.get(ID_HEADER) == mid]
                if mine:
                    del left[mid]
                    m = mine[0]
                    first, end = self.admin.queue_offsets(m.broker, topic, m.queue_id)
                    if first <= m.queue_offset < end:
                        out.confirmed += 1
                    else:
                        out.missing[mid] = (
                            f"message {broker_id} is in the commit log, but queue {m.queue_id} of "
                            f"{topic} on {m.broker} holds offsets {first}-{end - 1}, not its "
                            f"{m.queue_offset}: no consumer can read it (topic deleted, or data lost)"
                        )
                elif found:
                    out.missing[mid] = (
                        f"message {broker_id} of {topic} carries "
                        f"{found[0].properties.get(ID_HEADER) or 'no ' + ID_HEADER}"
                    )
                    del left[mid]
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(0.2)  # the broker's index is written just after the commit log: ask again
        for mid, (topic, broker_id, offset) in left.items():
            out.missing[mid] = f"not found: {topic} has no message {broker_id} (queue offset {offset})"


def _parse(location: str) -> tuple[str, int, int] | None:
    parts = location.rsplit("/", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    return parts[0], int(parts[1]), int(parts[2])


class _BrokerReader:
    """Reads recorded positions back (:class:`~zeroloss.brokers.kafka_reader.KafkaReader`)."""

    def __init__(self, url: str, *, timeout_s: float, idle_s: float) -> None:
        from zeroloss.brokers.kafka_reader import KafkaReader

        self.idle_s = idle_s
        self.reader = KafkaReader(url, timeout_s=timeout_s, purpose="audit")
        try:
            self.reader.partitions("")  # an unreachable broker says so now, even with nothing to check
        except BaseException:
            self.reader.close()
            raise

    def close(self) -> None:
        self.reader.close()

    def check(self, batch: list[Delivered], out: BrokerFindings) -> None:
        want: dict[tuple[str, int], dict[int, list[str]]] = {}  # several ids can claim one position
        for d in batch:
            loc = _parse(d.location)
            parts = None if loc is None else self.reader.partitions(loc[0])
            if loc is None:
                out.missing[d.message.id] = f"no broker position recorded ({d.location!r})"
            elif parts is None:
                out.missing[d.message.id] = f"topic {loc[0]} does not exist on the broker"
            elif loc[1] not in parts:
                out.missing[d.message.id] = f"partition {loc[0]}/{loc[1]} does not exist on the broker"
            else:
                want.setdefault((loc[0], loc[1]), {}).setdefault(loc[2], []).append(d.message.id)
        if want:
            self._read(want, out)

    def _read(self, want: dict[tuple[str, int], dict[int, list[str]]], out: BrokerFindings) -> None:
        last = {tp: max(offsets) for tp, offsets in want.items()}
        starts = {tp: min(offsets) for tp, offsets in want.items()}
        try:
            with contextlib.closing(self.reader.scan(starts, idle_s=self.idle_s)) as records:
                for rec in records:
                    tp = (rec.topic, rec.partition)
                    left = want.get(tp)
                    if left is None:
                        continue
                    got = rec.id or ""
                    for mid in left.pop(rec.offset, ()):
                        if got == mid:
                            out.confirmed += 1
                        else:
                            out.missing[mid] = (
                                f"offset {rec.offset} of {tp[0]}/{tp[1]} holds {got or 'a record without ' + ID_HEADER}"
                            )
                    if not left or rec.offset >= last[tp]:
                        self._give_up(tp, want.pop(tp), out, "no record at offset {o} of {t}/{p}")
                    if not want:
                        break
        except BrokerError as exc:  # partitions not read to their end in time: what is left is not found
            log.warning("audit: %s", exc)
        for tp in list(want):
            self._give_up(tp, want.pop(tp), out, "not found: {t}/{p} ends before offset {o}")

    @staticmethod
    def _give_up(tp: tuple[str, int], left: dict[int, list[str]], out: BrokerFindings, why: str) -> None:
        for offset, mids in left.items():
            for mid in mids:
                out.missing[mid] = why.format(o=offset, t=tp[0], p=tp[1])


# -- the inbox -----------------------------------------------------------------------------------


def _check_inbox(inbox: Any, group: str, batch: list[Delivered], grace_s: float, out: InboxFindings) -> None:
    cutoff = time.time() - grace_s
    judged = [d.message.id for d in batch if d.message.created_at <= cutoff]
    out.too_recent += len(batch) - len(judged)
    seen = _consumed(inbox, group, judged)
    out.consumed += len(seen)
    out.missing.extend(mid for mid in judged if mid not in seen)


def _consumed(inbox: Any, group: str, ids: list[str]) -> set[str]:
    """Which of ``ids`` the group's inbox has: one query per 1000 ids for a SQL inbox, else ``seen``."""
    import sqlalchemy as sa

    table, engine = getattr(inbox, "table", None), getattr(inbox, "engine", None)
    if (
        isinstance(table, sa.Table)
        and isinstance(engine, sa.Engine)
        and {"group_name", "message_id"} <= set(table.c.keys())
    ):
        found: set[str] = set()
        with engine.connect() as conn:
            for i in range(0, len(ids), 1000):
                part = ids[i : i + 1000]
                q = sa.select(table.c.message_id).where(table.c.group_name == group, table.c.message_id.in_(part))
                found.update(conn.scalars(q))
        return found
    return {mid for mid in ids if inbox.seen(group, mid)}


def open_inbox(url: str, table: str = "zeroloss_inbox") -> Any:
    """The consumer group's inbox behind ``url`` (SQL or Redis), from :mod:`zeroloss.inbox`."""
    try:
        from zeroloss import inbox as inbox_module
    except ImportError as exc:
        raise ConfigError(f"auditing an inbox needs zeroloss.inbox, which cannot be imported: {exc}") from exc
    if url.startswith(("redis://", "rediss://", "unix://")):
        return inbox_module.open_inbox(url)
    return inbox_module.SqlInbox(url, table=table)
