"""What every RocketMQ part that uses rocketmq-python-client shares (publisher, subscription, dead
letters, half messages): loading the client library, the one client configuration built from a
parsed URL (proxy and credentials), starting a client object on the calling thread, and the one
check that the gRPC proxy accepts connections (the client starts "successfully" with nothing
to talk to). Why ``start`` sets the thread's event loop: docs/design.md, "brokers/rocketmq_client.py"."""

from __future__ import annotations

import asyncio
import logging
import socket
import warnings
from typing import Any

from zeroloss.brokers.rocketmq_url import RocketMQURL
from zeroloss.errors import MissingExtraError


class _ClientCallbackNoise(logging.Filter):
    """rocketmq-python-client's heartbeat callback re-raises a failed heartbeat (every 10 s while
    the proxy is down), which concurrent.futures logs as an ERROR with a gRPC traceback: noise
    beside the relay's own outage report. Only such records (a gRPC error in a future's callback)
    are dropped; they stay in the client's own log (~/logs/rocketmq_python)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (
            exc is not None
            and type(exc).__module__.startswith("grpc")
            and str(record.msg).startswith("exception calling callback")
        )


_NOISE = _ClientCallbackNoise()


def rocketmq_module() -> Any:
    logging.getLogger("concurrent.futures").addFilter(_NOISE)  # the same filter object: added once
    try:
        import rocketmq
        import rocketmq.grpc_protocol
        import rocketmq.v5.exception
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise MissingExtraError("rocketmq-python-client", "rocketmq", "the RocketMQ broker adapter") from exc
    return rocketmq


def client_config(config: RocketMQURL, request_timeout: int) -> Any:
    """The client's ClientConfiguration for ``config``: its proxy and its credentials (the client
    signs every request with them; empty ones sign nothing). ``request_timeout``: whole seconds."""
    rmq = rocketmq_module()
    return rmq.ClientConfiguration(
        config.endpoint,
        rmq.Credentials(config.access_key, config.secret_key),
        request_timeout=max(1, int(request_timeout)),
    )


def start(client: Any) -> None:
    """``client.startup()``, with the thread's event loop set to the client's I/O loop where it has none."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: get_event_loop outside a loop
        try:
            asyncio.get_event_loop()
        except RuntimeError:
            from rocketmq.v5.client.connection.rpc_client import RpcClient

            io_loop = RpcClient.get_channel_io_loop()
            if io_loop is not None:  # None before the first client: then startup() sets it itself
                asyncio.set_event_loop(io_loop)
    client.startup()


def proxy_refusal(endpoint: str, timeout_s: float) -> OSError | None:
    """None when the gRPC proxy at ``endpoint`` (HOST:PORT) accepts a TCP connection, else the
    error of the attempt: each caller says what it means for its own work."""
    host, _, port = endpoint.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        return exc
    return None


def route_refusal(client: Any, topic: str, timeout_s: float) -> str | None:
    """Why the proxy refuses ``client`` the route of ``topic`` (its code and message: 40100
    UNAUTHORIZED for credentials its ACL refuses, 40402 for no such topic), None when it answers.
    The client's own route lookup says only "failed to fetch route", whatever the cause."""
    proto = rocketmq_module().grpc_protocol
    req = proto.QueryRouteRequest()
    req.topic.name = topic
    config = client.client_configuration
    req.endpoints.CopyFrom(config.rpc_endpoints.endpoints)
    try:
        future = client.rpc_client.query_topic_route_async(
            config.rpc_endpoints, req, metadata=client.sign(), timeout=max(1, int(timeout_s))
        )
        res = future.result(timeout_s + 5)  # the client's deadline ends it first; the margin is for its threads
    except Exception as exc:  # grpc's AioRpcError (UNAVAILABLE, DEADLINE_EXCEEDED), a future timeout
        return f"{type(exc).__name__}: {exc}"
    code = res.status.code
    if code == proto.Code.OK:
        return None
    return f"code {code} {proto.Code.Name(code) if code in proto.Code.values() else ''}, {res.status.message}"
