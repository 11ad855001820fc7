"""``zeroloss doctor`` for Apache RocketMQ 5 (``rocketmq://``): what the brokers, the topic, the
consumer group and the relay's producer do with a message, read through the name server (the
remoting protocol) and the gRPC proxy.
The details: docs/design.md, "doctor/rocketmq.py"."""

from __future__ import annotations

from typing import Any

from zeroloss.doctor.base import Check, Verdict
from zeroloss.errors import BrokerError, ConfigError

SYNC_FIX = "set flushDiskType=SYNC_FLUSH in broker.conf and restart the broker"


def rocketmq_checks(
    url: str,
    *,
    topic: str | None = None,
    group: str | None = None,
    min_replication: int = 3,
    relay_timeout_s: float = 30.0,
    timeout_s: float = 10.0,
) -> list[Check]:
    from zeroloss.brokers.rocketmq import CLIENT_SEND_ATTEMPTS
    from zeroloss.brokers.rocketmq_admin import RocketMQAdmin
    from zeroloss.brokers.rocketmq_fields import rocketmq_topic
    from zeroloss.brokers.rocketmq_url import parse_url

    config = parse_url(url)
    checks = [_proxy_check(config.endpoint, timeout_s)]
    admin = RocketMQAdmin.for_url(config, timeout_s=timeout_s)
    try:
        info = admin.cluster_info()
        masters = info.masters(config.cluster)
    except BrokerError as exc:
        return [
            *checks,
            Check(
                "rocketmq name server",
                Verdict.FAIL,
                f"{config.namesrv}: {exc}",
                "start the name server, or name it in the URL: ?namesrv=HOST:PORT",
            ),
        ]
    if not masters:
        return [
            *checks,
            Check(
                "rocketmq name server",
                Verdict.FAIL,
                f"{config.namesrv} lists no master broker"
                + (f" in cluster {config.cluster!r}" if config.cluster else ""),
                "start the brokers (namesrvAddr in broker.conf must name this name server)",
            ),
        ]
    names = ", ".join(f"{n} ({len(info.replicas(n)) - 1} slave(s))" for n in masters)
    checks.append(Check("rocketmq name server", Verdict.OK, f"{config.namesrv}: master broker(s) {names}"))
    fifo_topic: bool | None = None
    for name, address in masters.items():
        try:
            broker = admin.broker_config(address)
        except BrokerError as exc:
            checks.append(Check(f"broker {name}", Verdict.FAIL, f"{address}: {exc}", "bring the broker back"))
            continue
        slaves = len(info.replicas(name)) - 1
        checks.append(flush_check(name, broker, slaves))
        checks.append(role_check(name, broker, slaves, min_replication))
        if broker.get("autoCreateTopicEnable", "true") == "true":
            checks.append(
                Check(
                    f"broker {name} autoCreateTopicEnable",
                    Verdict.WARN,
                    "true: a mistyped topic is created NORMAL on its first send (no key order)",
                    "set autoCreateTopicEnable=false; create topics with zeroloss init",
                )
            )
    if topic is None:
        checks.append(Check("topic", Verdict.SKIP, "no --topic given", "pass --topic T to check it and T.dlq"))
    else:
        from zeroloss.brokers.base import with_dead_letters

        for t in with_dead_letters([topic]):
            try:
                rname = rocketmq_topic(t)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            check, kind = topic_check(t, rname, {n: admin.topic_config(rname, a) for n, a in masters.items()})
            checks.append(check)
            if t == topic:
                fifo_topic = kind == "FIFO" if kind else None
    if group is None:
        checks.append(
            Check(
                "consumer group",
                Verdict.SKIP,
                "no --group given",
                "pass --group G to check its max reconsume times and order",
            )
        )
    else:
        first = next(iter(masters.values()))
        group_config = admin.group_config(group, first)
        checks.append(group_check(group, group_config, fifo_topic))
        if group_config is not None and topic is not None and fifo_topic is not None:
            rname = rocketmq_topic(topic)
            checks.append(offsets_check(group, topic, admin.missing_offsets(group, rname)))
    per_attempt = max(1, int(relay_timeout_s // CLIENT_SEND_ATTEMPTS))
    checks.append(
        Check(
            "producer send timeout and retries",
            Verdict.OK,
            f"each message: up to {CLIENT_SEND_ATTEMPTS} attempts (rocketmq-python-client, fixed) of "
            f"{per_attempt}s each (the relay's --timeout-s {relay_timeout_s:g} / {CLIENT_SEND_ATTEMPTS}), "
            "within the batch's --timeout-s; delivered only on SEND_OK. An attempt retried after a "
            "lost answer may store a copy: the consumer's inbox drops it",
        )
    )
    return checks


def _proxy_check(endpoint: str, timeout_s: float) -> Check:
    from zeroloss.brokers.rocketmq_client import proxy_refusal

    exc = proxy_refusal(endpoint, timeout_s)
    if exc is not None:
        return Check(
            "rocketmq proxy",
            Verdict.FAIL,
            f"{endpoint}: {type(exc).__name__}: {exc}",
            "start the proxy (mqbroker --enable-proxy, or mqproxy) or fix --target",
        )
    return Check("rocketmq proxy", Verdict.OK, f"{endpoint} (gRPC) accepts connections")


def flush_check(name: str, config: dict[str, str], slaves: int) -> Check:
    """flushDiskType of one master (``slaves``: how many the name server lists for it)."""
    flush = config.get("flushDiskType", "ASYNC_FLUSH")
    if flush == "SYNC_FLUSH":
        timeout = config.get("syncFlushTimeout", "5000")
        return Check(
            f"broker {name} flushDiskType",
            Verdict.OK,
            f"SYNC_FLUSH: SEND_OK only once the commit log is fsynced (a flush slower than "
            f"syncFlushTimeout {timeout} ms answers FLUSH_DISK_TIMEOUT, which the relay does not count)",
        )
    synced = config.get("brokerRole") == "SYNC_MASTER" and slaves > 0
    return Check(
        f"broker {name} flushDiskType",
        Verdict.WARN if synced else Verdict.FAIL,
        f"{flush}: SEND_OK from the page cache; an OS crash or power cut of this broker"
        + (" and its slave together" if synced else "")
        + " loses messages the relay marked success",
        SYNC_FIX,
    )


def role_check(name: str, config: dict[str, str], slaves: int, min_replication: int) -> Check:
    """brokerRole and the copies it makes (``slaves`` registered with the name server)."""
    role = config.get("brokerRole", "ASYNC_MASTER")
    fix = (
        f"give broker {name} {max(1, min_replication - 1)} slave(s) on other machines and "
        "brokerRole=SYNC_MASTER (or a controller-mode group with inSyncReplicas >= 2)"
    )
    if role == "SYNC_MASTER":
        if slaves == 0:
            return Check(
                f"broker {name} role",
                Verdict.FAIL if min_replication > 1 else Verdict.WARN,
                "SYNC_MASTER with no slave registered: it answers SEND_OK with no second copy (in-sync "
                f"replicas {config.get('inSyncReplicas', '1')}); one disk lost is every message lost",
                fix,
            )
        copies = 1 + slaves
        verdict = Verdict.OK if copies >= min_replication else Verdict.FAIL
        return Check(
            f"broker {name} role",
            verdict,
            f"SYNC_MASTER with {slaves} slave(s): SEND_OK once a slave has "
            f"the message, {copies} copies (need >= {min_replication})",
            "" if verdict is Verdict.OK else fix,
        )
    if role == "ASYNC_MASTER":
        lag = (
            f"; its {slaves} slave(s) copy later, so what was acknowledged may not be there when the master's "
            "disk is lost"
            if slaves
            else ", and it has no slave: every message lives on this one broker's disk"
        )
        return Check(
            f"broker {name} role",
            Verdict.FAIL if min_replication > 1 else Verdict.OK,
            f"ASYNC_MASTER: SEND_OK does not wait for a second copy{lag} (1 copy that counts, need >= "
            f"{min_replication})",
            fix if min_replication > 1 else "",
        )
    return Check(
        f"broker {name} role",
        Verdict.WARN,
        f"{role}: not a master as the name server lists it",
        "check the broker group's configuration",
    )


def topic_check(topic: str, name: str, configs: dict[str, dict[str, Any] | None]) -> tuple[Check, str | None]:
    """The topic on every master (broker name → its config, None where missing), and its type."""
    label = f"topic {name}" + (f" ({topic})" if name != topic else "")
    missing = [b for b, c in configs.items() if c is None]
    fix_init = f"zeroloss init --target URL --topic {topic.removesuffix('.dlq')}"
    if len(missing) == len(configs):
        return Check(
            label, Verdict.FAIL, "does not exist: the relay's messages to it are retried, then failed", fix_init
        ), None
    found = [c for c in configs.values() if c is not None]
    kinds = {str((c.get("attributes") or {}).get("message.type") or "NORMAL") for c in found}
    kind = sorted(kinds)[0]
    perms = {int(c.get("perm", 6)) for c in found}
    queues = ", ".join(f"{b}: {c.get('writeQueueNums')}" for b, c in configs.items() if c is not None)
    if missing:
        return Check(
            label, Verdict.WARN, f"{kind}, missing on {missing}: those brokers take none of it", fix_init
        ), kind
    if any(p & 0x6 != 0x6 for p in perms):
        return Check(
            label,
            Verdict.FAIL,
            f"permission {sorted(perms)}: not both readable and writable (6) on every broker",
            f"mqadmin updateTopicPerm -t {name} -p 6",
        ), kind
    if kind == "FIFO":
        return Check(label, Verdict.OK, f"FIFO: a key's messages stay in send order; write queues {queues}"), kind
    if kind == "NORMAL":
        return Check(
            label,
            Verdict.WARN,
            "NORMAL: a key's messages spread over the queues and can be consumed out of order",
            f"recreate it FIFO: drain it, mqadmin deleteTopic, {fix_init}",
        ), kind
    return Check(
        label, Verdict.FAIL, f"{kind}: the relay's messages are refused by its type", f"use another topic ({fix_init})"
    ), kind


def group_check(group: str, config: dict[str, Any] | None, fifo_topic: bool | None) -> Check:
    """The consumer group (None: missing) and whether its order matches the topic's."""
    label = f"consumer group {group}"
    if config is None:
        return Check(
            label,
            Verdict.FAIL,
            'does not exist: a gRPC consumer cannot join it ("group not found")',
            f"zeroloss init --target URL --topic T --group {group}",
        )
    retries = config.get("retryMaxTimes", 16)
    orderly = bool(config.get("consumeMessageOrderly"))
    detail = (
        f"max reconsume times {retries}: after {retries} failed deliveries RocketMQ moves a message to "
        f"%DLQ%{group}; orderly {orderly}"
    )
    if fifo_topic and not orderly:
        return Check(
            label,
            Verdict.WARN,
            detail + ": on a FIFO topic a group that is not orderly takes a key's messages concurrently, out of order",
            "recreate the group orderly (zeroloss init --group)",
        )
    if int(retries) < 1:
        return Check(
            label,
            Verdict.WARN,
            detail + ": a message whose handler fails once goes straight to the DLQ",
            f"mqadmin updateSubGroup -g {group} -r 16",
        )
    return Check(label, Verdict.OK, detail)


def offsets_check(group: str, topic: str, missing: list[tuple[str, int, int, int]]) -> Check:
    """The queues of ``topic`` where ``group`` has no offset: (broker, queue, first, next) each."""
    label = f"consumer group {group} offsets on {topic}"
    if not missing:
        return Check(label, Verdict.OK, "set on every queue: a consumer goes on from there")
    # The proxy's first receive starts at next - 1 (the last message): those before it are skipped.
    skipped = sum(max(0, nxt - 1 - first) for _, _, first, nxt in missing)
    queues = ", ".join(f"{broker}/{queue}" for broker, queue, _, _ in missing)
    return Check(
        label,
        Verdict.WARN,
        f"none on {len(missing)} queue(s) ({queues}): a consumer's first receive there starts at the "
        f"queue's last message unless its first is still in the broker's memory, skipping up to "
        f"{skipped} stored message(s) now",
        f"zeroloss init --target URL --topic {topic} --group {group} (or starting the zeroloss consumer) "
        "sets them to each queue's first message",
    )
