"""What a ``rocketmq://`` URL says: :func:`check_url` (the publisher's, admin's and doctor's:
credentials, several name servers, a cluster) and :func:`parse_url` (the consume side's and the
reader's: the proxy and one name server). The URL's form: docs/design.md, "brokers/rocketmq.py"."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from zeroloss.brokers.rocketmq_remoting import DEFAULT_NAMESRV_PORT, parse_address
from zeroloss.errors import ConfigError
from zeroloss.urls import safe_url

DEFAULT_PROXY_PORT = 8081


@dataclass(frozen=True)
class RocketMQURL:
    """What a ``rocketmq://`` URL says (the form: docs/design.md, "brokers/rocketmq.py")."""

    endpoint: str  # the gRPC proxy, host:port
    namesrv: str  # name server(s), host:port[;host:port]
    cluster: str | None = None
    access_key: str = ""
    secret_key: str = ""


def check_url(url: str) -> RocketMQURL:
    """Parse a ``rocketmq://`` URL; ConfigError saying what to write for anything else."""
    example = "write rocketmq://HOST:8081 (the gRPC proxy), optionally ?namesrv=HOST:9876"
    if not url.startswith("rocketmq://"):
        raise ConfigError(f"not a RocketMQ URL: {url!r}; {example}")
    parts = urllib.parse.urlsplit(url)
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ConfigError(f"bad port in {url!r}: {exc}; {example}") from None
    if not host or parts.path not in ("", "/"):
        raise ConfigError(f"{url!r} names no proxy host (or has a path); {example}")
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    unknown = set(query) - {"namesrv", "cluster"}
    if unknown:
        raise ConfigError(f"unknown setting(s) {sorted(unknown)} in {url!r}; known: namesrv, cluster")
    namesrv = (query.get("namesrv") or [f"{host}:{DEFAULT_NAMESRV_PORT}"])[-1]
    for one in namesrv.replace(",", ";").split(";"):
        if one:
            parse_address(one)  # ConfigError for a bad one
    cluster = (query.get("cluster") or [""])[-1] or None
    return RocketMQURL(
        f"{host}:{port or DEFAULT_PROXY_PORT}",
        namesrv,
        cluster,
        urllib.parse.unquote(parts.username or ""),
        urllib.parse.unquote(parts.password or ""),
    )


@dataclass(frozen=True, slots=True)
class Endpoints:
    proxy: str  # HOST:PORT of the gRPC proxy
    namesrv: tuple[str, int]  # the name server, for the remoting protocol


def parse_url(url: str) -> Endpoints:
    """``rocketmq://HOST:PORT[?namesrv=HOST:PORT]`` → the proxy and the name server."""
    parts = urlsplit(url)
    if parts.scheme != "rocketmq" or not parts.hostname or parts.port is None:
        raise ConfigError(
            f"not a RocketMQ URL: {safe_url(url)!r}; write rocketmq://HOST:PORT (the gRPC proxy), "
            f"optionally ?namesrv=HOST:PORT"
        )
    ns = parse_qs(parts.query).get("namesrv", [f"{parts.hostname}:{DEFAULT_NAMESRV_PORT}"])[0]
    host, _, port = ns.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"RocketMQ URL {safe_url(url)!r}: namesrv={ns!r} is not HOST:PORT")
    return Endpoints(f"{parts.hostname}:{parts.port}", (host, int(port)))
