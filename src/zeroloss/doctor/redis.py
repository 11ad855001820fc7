"""``zeroloss doctor`` on Redis: ``appendonly``, ``appendfsync`` and ``maxmemory-policy``."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from zeroloss.doctor.base import Check, Verdict

if TYPE_CHECKING:
    pass

log = logging.getLogger("zeroloss.doctor.checks")  # doctor's logger name, as before the split


def redis_checks(url: str, *, timeout_s: float = 10.0) -> list[Check]:
    try:
        import redis
    except ImportError as exc:  # pragma: no cover - depends on the installation
        from zeroloss.errors import MissingExtraError

        raise MissingExtraError("redis", "redis", "checking Redis") from exc
    client: Any = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        conf: dict[str, str] = {}
        for key in ("appendonly", "appendfsync", "maxmemory-policy"):
            got = client.config_get(key)
            conf.update(
                {
                    str(k if isinstance(k, str) else k.decode()): str(v if isinstance(v, str) else v.decode())
                    for k, v in got.items()
                }
            )
    except redis.ResponseError as exc:
        return [
            Check(
                "redis config",
                Verdict.WARN,
                f"CONFIG GET refused ({exc}); managed Redis often hides it",
                "check appendonly=yes and appendfsync=always in the provider's settings",
            )
        ]
    except redis.RedisError as exc:
        return [Check("redis reachable", Verdict.FAIL, f"{exc}", "start Redis or fix the URL")]
    finally:
        client.close()
    checks = [Check("redis reachable", Verdict.OK, url.split("@")[-1])]
    aof = conf.get("appendonly", "?")
    fix_aof = "CONFIG SET appendonly yes; CONFIG SET appendfsync always (and in redis.conf)"
    if aof != "yes":
        checks.append(
            Check(
                "redis appendonly",
                Verdict.FAIL,
                f"appendonly={aof}: a restart loses everything since the last snapshot",
                fix_aof,
            )
        )
    else:
        checks.append(Check("redis appendonly", Verdict.OK, "appendonly=yes"))
    fsync = conf.get("appendfsync", "?")
    if aof == "yes" and fsync == "always":
        checks.append(Check("redis appendfsync", Verdict.OK, "appendfsync=always"))
    elif fsync == "everysec":
        checks.append(
            Check(
                "redis appendfsync",
                Verdict.WARN,
                "appendfsync=everysec: a crash can lose up to 1 s of acknowledged writes",
                "CONFIG SET appendfsync always",
            )
        )
    else:
        checks.append(Check("redis appendfsync", Verdict.FAIL, f"appendfsync={fsync}", fix_aof))
    policy = conf.get("maxmemory-policy", "?")
    checks.append(
        Check(
            "redis maxmemory-policy",
            Verdict.OK if policy == "noeviction" else Verdict.WARN,
            f"maxmemory-policy={policy}"
            + (
                ""
                if policy == "noeviction"
                else ": at the memory limit Redis evicts keys (inbox marks, stream entries)"
            ),
            "" if policy == "noeviction" else "CONFIG SET maxmemory-policy noeviction",
        )
    )
    return checks
