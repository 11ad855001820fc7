"""A TCP proxy for tests that holds every byte from the server back by ``delay_s`` (and can cut
every connection): a broker whose round trip is slow, deterministically, without touching the
broker or the client. Each round trip through it takes at least ``delay_s``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from zeroloss.brokers._loop import LoopThread


class DelayProxy:
    def __init__(self, upstream_port: int, delay_s: float, host: str = "127.0.0.1") -> None:
        self.upstream = (host, upstream_port)
        self.delay_s = delay_s
        self._loop = LoopThread("delay-proxy")
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.AbstractServer | None = None
        self.port = 0
        self.connections = 0  # accepted so far; tests read it

    def start(self) -> DelayProxy:
        async def listen() -> int:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            return int(self._server.sockets[0].getsockname()[1])

        self.port = self._loop.run(listen(), 10)
        return self

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            server_r, server_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.close()
            return
        self._writers |= {client_w, server_w}
        loop = asyncio.get_running_loop()
        # (due time, bytes) from the server, forwarded in order once due
        later: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while chunk := await r.read(65536):
                    w.write(chunk)
                    await w.drain()
            w.close()

        async def hold_back() -> None:
            with contextlib.suppress(OSError):
                while chunk := await server_r.read(65536):
                    later.put_nowait((loop.time() + self.delay_s, chunk))
            later.put_nowait((loop.time() + self.delay_s, b""))

        async def deliver() -> None:
            with contextlib.suppress(OSError):
                while True:
                    due, chunk = await later.get()
                    await asyncio.sleep(max(0.0, due - loop.time()))  # the injected latency
                    if not chunk:
                        break
                    client_w.write(chunk)
                    await client_w.drain()
            client_w.close()

        await asyncio.gather(pump(client_r, server_w), hold_back(), deliver(), return_exceptions=True)
        self._writers -= {client_w, server_w}

    def cut(self) -> None:
        """Close every connection now (both sides), as a network failure would; keep listening."""

        async def close_all() -> None:
            for w in list(self._writers):
                with contextlib.suppress(Exception):
                    w.transport.abort()

        self._loop.run(close_all(), 10)

    def close(self) -> None:
        async def shut() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                with contextlib.suppress(Exception):
                    w.transport.abort()

        with contextlib.suppress(Exception):
            self._loop.run(shut(), 10)
        self._loop.close()


@contextlib.contextmanager
def delay_proxy(upstream_port: int, delay_s: float) -> Iterator[DelayProxy]:
    proxy = DelayProxy(upstream_port, delay_s).start()
    try:
        yield proxy
    finally:
        proxy.close()
