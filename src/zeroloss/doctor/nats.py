"""``zeroloss doctor`` for NATS JetStream (``nats://``): the server and JetStream, the sync interval
(read from the monitoring endpoint), and per stream its replicas, file storage and duplicate window.
The details: docs/design.md, "doctor/nats.py"."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from zeroloss.doctor.base import Check, Verdict
from zeroloss.relay import RelaySettings

DEFAULT_SYNC_S = 120.0
"""JetStream's fsync interval when nothing is configured."""
MONITOR_PORT = 8222
SYNC_FIX = "set jetstream { sync_interval: always } in the server config (every write fsynced before its ack)"


def retry_horizon_s(settings: RelaySettings, publish_timeout_s: float) -> tuple[float, str]:
    """How long after the broker stored a message the relay may publish the same id again, and
    how that was worked out. Two ways lead to a republish of a stored message:

    * the relay dies between the ack and marking ``success``: its claim expires after
      ``lease_s`` and the next recovery pass (every ``recover_every_s``) sends it again;
    * the ack is lost (no answer within the publish timeout): the batch goes back to ``pending``
      for at most ``max_backoff_s`` and is sent again.

    Attempts spent on a message the stream refused (an error answer) stored nothing, so
    ``max_attempts`` does not lengthen the horizon. An outage in which every republish is stored
    but never acknowledged is unbounded: no window covers it (the consumer's inbox does)."""
    crash = settings.lease_s + settings.recover_every_s
    lost_ack = publish_timeout_s + settings.max_backoff_s
    how = (
        f"max(lease {settings.lease_s:g}s + recovery pass {settings.recover_every_s:g}s, "
        f"publish timeout {publish_timeout_s:g}s + longest backoff {settings.max_backoff_s:g}s)"
    )
    return max(crash, lost_ack), how


def nats_checks(
    url: str,
    *,
    topic: str | None = None,
    min_replication: int = 3,
    monitor: str | None = None,
    relay: RelaySettings | None = None,
    relay_timeout_s: float = 30.0,
    timeout_s: float = 10.0,
) -> list[Check]:
    return asyncio.run(
        _checks(url, topic, min_replication, monitor, relay or RelaySettings(), relay_timeout_s, timeout_s)
    )


async def _checks(
    url: str,
    topic: str | None,
    min_replication: int,
    monitor: str | None,
    relay: RelaySettings,
    relay_timeout_s: float,
    timeout_s: float,
) -> list[Check]:
    from zeroloss.brokers.nats import check_url, nats_module

    nats = nats_module()
    check_url(url)
    try:
        nc = await nats.connect(
            servers=[url],
            connect_timeout=timeout_s,
            allow_reconnect=False,
            max_reconnect_attempts=1,
            name="zeroloss-doctor",
        )
    except (TimeoutError, nats.errors.Error, OSError) as exc:
        return [
            Check(
                "nats reachable",
                Verdict.FAIL,
                f"{url}: {type(exc).__name__}: {exc}",
                "start nats-server with -js or fix --target",
            )
        ]
    try:
        info: dict[str, Any] = dict(getattr(nc, "_server_info", {}) or {})
        version = str(info.get("version", "?"))
        checks = [Check("nats reachable", Verdict.OK, f"{url}: nats-server {version}")]
        js = nc.jetstream(timeout=timeout_s)
        try:
            await js.account_info()
        except (TimeoutError, nats.errors.TimeoutError) as exc:
            return [
                *checks,
                Check(
                    "nats jetstream",
                    Verdict.FAIL,
                    f"no answer within {timeout_s:g}s ({exc}): "
                    "JetStream is off, or a cluster has no JetStream meta leader (servers lost)",
                    "bring the cluster's servers back (nats server report jetstream), or start nats-server with -js",
                ),
            ]
        except nats.errors.Error as exc:
            return [
                *checks,
                Check(
                    "nats jetstream",
                    Verdict.FAIL,
                    f"not available: {type(exc).__name__}: {exc}",
                    "start nats-server with -js (or jetstream {} in its config)",
                ),
            ]
        streams = []
        if topic is not None:
            from zeroloss.brokers.base import with_dead_letters

            for t in with_dead_letters([topic]):
                streams.append((t, await _stream(js, nats, t, timeout_s)))
        main = streams[0][1] if streams and not isinstance(streams[0][1], Check) else None
        replicas = (main.config.num_replicas or 1) if main is not None else None
        checks.append(_sync_check(url, info, monitor, replicas, timeout_s))
        horizon = retry_horizon_s(relay, relay_timeout_s)
        if topic is None:
            checks.append(Check("stream", Verdict.SKIP, "no --topic given", "pass --topic T to check its stream"))
        for _, got in streams:
            if isinstance(got, Check):
                checks.append(got)
            else:
                checks += _stream_checks(got, min_replication, horizon)
        return checks
    finally:
        await nc.close()


async def _stream(js: Any, nats: Any, topic: str, timeout_s: float) -> Any:
    """The stream of ``topic`` (StreamInfo), or the Check that says why there is none."""
    from zeroloss.brokers.nats import stream_name

    name = stream_name(topic)
    try:
        return await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        return Check(
            f"stream {name}",
            Verdict.FAIL,
            f"does not exist (subject {topic}); the relay would create it with 1 replica",
            f"zeroloss init --target URL --topic {topic.removesuffix('.dlq')} --replication-factor 3",
        )
    except (TimeoutError, nats.errors.Error) as exc:
        return Check(
            f"stream {name}",
            Verdict.WARN,
            f"cannot read it: {type(exc).__name__}: {exc}",
            "grant this user $JS.API.STREAM.INFO",
        )


def _stream_checks(info: Any, min_replication: int, horizon: tuple[float, str]) -> list[Check]:
    cfg, name = info.config, f"stream {info.config.name}"
    checks: list[Check] = []
    n = cfg.num_replicas or 1
    if n < min_replication:
        one = (
            (
                "1 replica: every message lives on one server's disk; losing that disk loses them all, and while "
                "that server is down nothing can be published or consumed"
            )
            if n == 1
            else f"{n} replicas: losing {n} servers' disks loses every message"
        )
        checks.append(
            Check(
                f"{name} replicas",
                Verdict.FAIL,
                f"{one} (need >= {min_replication})",
                f"nats stream edit {cfg.name} --replicas {min_replication} (a cluster of at least "
                f"{min_replication} servers)",
            )
        )
    else:
        checks.append(_live_replicas(name, n, info.cluster))
    storage = str(getattr(cfg.storage, "value", cfg.storage))
    if storage == "file":
        checks.append(Check(f"{name} storage", Verdict.OK, "file"))
    else:
        checks.append(
            Check(
                f"{name} storage",
                Verdict.FAIL,
                f"{storage}: a server restart loses every message in the stream",
                f"recreate {cfg.name} with file storage (the storage type cannot be "
                "edited): drain it, delete it, zeroloss init",
            )
        )
    window = float(cfg.duplicate_window or 0)
    needed, how = horizon
    if window >= needed:
        checks.append(
            Check(
                f"{name} duplicate window", Verdict.OK, f"{window:g}s >= the relay's retry horizon {needed:g}s = {how}"
            )
        )
    else:
        checks.append(
            Check(
                f"{name} duplicate window",
                Verdict.WARN,
                f"{window:g}s < the relay's retry horizon {needed:g}s = {how}: a copy the relay sends "
                "again after that is stored twice (the consumer's inbox still drops it)",
                f"nats stream edit {cfg.name} --dupe-window {needed:g}s (or shorten the relay's "
                "--lease-s / --max-backoff-s)",
            )
        )
    return checks


def _live_replicas(name: str, n: int, cluster: Any) -> Check:
    """The replicas as they are: a leader, and every follower current and online."""
    if n == 1 or cluster is None:
        return Check(f"{name} replicas", Verdict.OK, f"{n}")
    if not cluster.leader:
        return Check(
            f"{name} replicas",
            Verdict.FAIL,
            f"{n} configured, no leader: nothing can be published",
            "bring the stream's servers back (nats stream info shows which)",
        )
    behind = [p.name for p in cluster.replicas or [] if p.offline or not p.current]
    if behind:
        return Check(
            f"{name} replicas",
            Verdict.WARN,
            f"{n} configured; {behind} offline or not current: one more server lost and writes stop or copies are lost",
            "bring those servers back",
        )
    return Check(f"{name} replicas", Verdict.OK, f"{n}, leader {cluster.leader}, every replica current")


def _monitor_url(url: str, monitor: str | None) -> str:
    if monitor:
        return monitor.rstrip("/")
    host = urlsplit(url).hostname or "127.0.0.1"
    return f"http://{host}:{MONITOR_PORT}"


def _varz(base: str, timeout_s: float) -> tuple[dict[str, Any] | None, str]:
    try:
        with urllib.request.urlopen(base + "/varz", timeout=timeout_s) as resp:
            return json.loads(resp.read()), ""
    except (OSError, ValueError) as exc:  # URLError is an OSError; bad JSON a ValueError
        return None, f"{type(exc).__name__}: {exc}"


def _version(v: str) -> tuple[int, ...]:
    parts = []
    for p in v.split("-")[0].split("."):
        parts.append(int(p) if p.isdigit() else 0)
    return tuple(parts)


def _sync_check(url: str, info: dict[str, Any], monitor: str | None, replicas: int | None, timeout_s: float) -> Check:
    name = "nats sync_interval"
    version = str(info.get("version", "0"))
    # One copy (or no stream to tell): an OS crash of that one server loses what was not yet synced.
    single = replicas is not None and replicas < 2
    loss_verdict = Verdict.FAIL if single else Verdict.WARN
    who = (
        "the stream has 1 replica: an OS crash or power cut"
        if single
        else f"the stream has {replicas} replicas: a power cut of all their servers together"
        if replicas
        else "an OS crash or power cut (all the stream's servers at once, if it has replicas)"
    )
    if _version(version) < (2, 10):
        return Check(
            name,
            loss_verdict,
            f"nats-server {version} fsyncs every {DEFAULT_SYNC_S:g}s and cannot be "
            f"told otherwise: {who} can lose up to {DEFAULT_SYNC_S:g}s of messages the relay marked success",
            "upgrade to nats-server 2.10 or later and " + SYNC_FIX,
        )
    base = _monitor_url(url, monitor)
    varz, err = _varz(base, timeout_s)
    conf = (varz or {}).get("jetstream", {}).get("config") if varz else None
    if conf is None:
        why = err or "it reports no jetstream config"
        return Check(
            name,
            Verdict.WARN,
            f"unknown: {base}/varz did not answer ({why}); JetStream's default fsyncs "
            f"every {DEFAULT_SYNC_S:g}s, and then {who} can lose up to that much of messages the relay "
            "marked success",
            SYNC_FIX + "; to let doctor see it, enable monitoring (-m 8222 or http_port) or pass --nats-monitor URL",
        )
    other = varz.get("server_id") if varz else None
    same = "" if other in (None, info.get("server_id")) else f" (server {other}, not the one --target reached)"
    if conf.get("sync_always"):
        return Check(name, Verdict.OK, f"always: every write is fsynced before its ack{same}")
    interval = float(conf.get("sync_interval") or DEFAULT_SYNC_S * 1e9) / 1e9
    return Check(
        name,
        loss_verdict,
        f"{interval:g}s{same}: {who} can lose up to {interval:g}s of messages the relay marked success",
        SYNC_FIX,
    )
