"""Starting a client object of rocketmq-python-client (producer, consumer) on the calling thread.

The client opens part of its gRPC traffic (the telemetry stream every client starts with) from the
thread that calls ``startup()``, where grpc.aio takes asyncio's current event loop. The client sets
its own I/O loop there when it creates a connection, but an ``asyncio.run()`` in that thread since
(the RocketMQ publisher's own, or the application's) leaves the thread without one; while a
connection to the same proxy is still open, ``startup()`` then fails with "There is no current
event loop" and a consumer never receives (seen in the test suite)."""

from __future__ import annotations

import asyncio
import warnings
from typing import Any


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
