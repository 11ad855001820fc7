"""URLs as text: their scheme, and the form that may be printed (a password masked)."""

from __future__ import annotations

from zeroloss.errors import ConfigError


def scheme_of(url: str) -> str:
    scheme, sep, _ = url.partition("://")
    if not sep or not scheme:
        raise ConfigError(f"{url!r} is not a URL; write SCHEME://..., e.g. sqlite:///app.db or kafka://host:9092")
    return scheme.split("+", 1)[0].lower()


def safe_url(url: str) -> str:
    """The URL with the password it may carry masked, for printing: ``amqp://u:***@host/``."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{host}"
