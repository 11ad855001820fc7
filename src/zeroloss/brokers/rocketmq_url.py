"""What a ``rocketmq://`` URL says, parsed in one place (:func:`parse_url`) for every RocketMQ part:
the gRPC proxy, the name server(s), a cluster and the credentials. The URL's form: docs/design.md,
"brokers/rocketmq.py"."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field

from zeroloss.brokers.rocketmq_remoting import DEFAULT_NAMESRV_PORT, parse_address
from zeroloss.errors import ConfigError
from zeroloss.urls import safe_url

DEFAULT_PROXY_PORT = 8081
EXAMPLE = "write rocketmq://[ACCESS_KEY:SECRET_KEY@]HOST:8081 (the gRPC proxy), optionally ?namesrv=HOST:9876"


@dataclass(frozen=True)
class RocketMQURL:
    """What a ``rocketmq://`` URL says (the form: docs/design.md, "brokers/rocketmq.py")."""

    endpoint: str  # the gRPC proxy, host:port
    namesrv: str  # name server(s) as written, host:port[;host:port]
    cluster: str | None = None
    access_key: str = ""
    # Out of the repr: a parsed URL in a log line or a traceback's locals keeps the secret to itself.
    secret_key: str = field(default="", repr=False)

    @property
    def credentials(self) -> tuple[str, str] | None:
        """(access key, secret key) to sign requests with; None when the URL names none."""
        return (self.access_key, self.secret_key) if self.access_key else None

    @property
    def namesrvs(self) -> tuple[tuple[str, int], ...]:
        """The name servers, in the order written (checked by :func:`parse_url`)."""
        return namesrv_addresses(self.namesrv)


def namesrv_addresses(namesrv: str) -> tuple[tuple[str, int], ...]:
    """``host:port[;host:port]`` (``,`` too, as RocketMQ's own tools take it) → the addresses, in
    order; ConfigError for a bad one or none."""
    found = tuple(parse_address(one) for one in namesrv.replace(",", ";").split(";") if one.strip())
    if not found:
        raise ConfigError(f"{namesrv!r} names no name server")
    return found


def parse_url(url: str) -> RocketMQURL:
    """Parse a ``rocketmq://`` URL; ConfigError saying what to write for anything else. No error
    carries the URL's secret key (it is printed through :func:`~zeroloss.urls.safe_url`)."""
    shown = safe_url(url)
    if not url.startswith("rocketmq://"):
        raise ConfigError(f"not a RocketMQ URL: {shown!r}; {EXAMPLE}")
    parts = urllib.parse.urlsplit(url)
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ConfigError(f"bad port in {shown!r}: {exc}; {EXAMPLE}") from None
    if not host or parts.path not in ("", "/"):
        raise ConfigError(f"{shown!r} names no proxy host (or has a path); {EXAMPLE}")
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    unknown = set(query) - {"namesrv", "cluster"}
    if unknown:
        raise ConfigError(f"unknown setting(s) {sorted(unknown)} in {shown!r}; known: namesrv, cluster")
    config = RocketMQURL(
        f"{host}:{port or DEFAULT_PROXY_PORT}",
        (query.get("namesrv") or [f"{host}:{DEFAULT_NAMESRV_PORT}"])[-1],
        (query.get("cluster") or [""])[-1] or None,
        urllib.parse.unquote(parts.username or ""),
        urllib.parse.unquote(parts.password or ""),
    )
    try:
        config.namesrvs  # noqa: B018 - checked now, not at the first admin request
    except ConfigError as exc:
        raise ConfigError(f"RocketMQ URL {shown!r}: namesrv={config.namesrv!r}: {exc}") from None
    if config.secret_key and not config.access_key:
        raise ConfigError(f"RocketMQ URL {shown!r}: a secret key without an access key; write AK:SK@HOST")
    return config
