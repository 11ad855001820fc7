"""A private asyncio event loop on its own thread: the sync face of an async-only client.

The relay and the consumer are synchronous (STYLE §8). An adapter built on an asyncio client
(aio-pika, nats-py) owns one :class:`LoopThread` and calls :meth:`LoopThread.run` with a
coroutine; the calling thread blocks until the coroutine finishes or ``timeout_s`` passes. The
client's connection lives on the loop thread for its whole life (asyncio objects are not
thread-safe), so every call into the client goes through ``run``.

A timeout cancels the coroutine and raises :class:`TimeoutError`; what the cancelled work had
already sent is unknown, so adapters treat it as "send again" (the consumer's dedup absorbs the
copy), never as "assume sent".
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    """One event loop running forever on a daemon thread, until :meth:`close`."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()
        self._closed = False

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._ready.set)
        self._loop.run_forever()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run ``coro`` on the loop and return its result (or raise its exception). After
        ``timeout_s`` the coroutine is cancelled and TimeoutError raised."""
        if self._closed:
            coro.close()
            raise RuntimeError("the event loop thread is closed")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("LoopThread.run called from its own loop: that would deadlock")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout_s)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            with contextlib.suppress(Exception):  # let the cancellation run before returning
                fut.result(5.0)
            raise TimeoutError(f"no answer within {timeout_s}s") from None

    def close(self, timeout_s: float = 5.0) -> None:
        """Cancel whatever still runs on the loop, stop it and join the thread (idempotent)."""
        if self._closed:
            return
        self._closed = True

        async def _cancel_all() -> None:
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._loop.shutdown_asyncgens()

        with contextlib.suppress(Exception):  # a task that refuses to die must not keep us alive
            asyncio.run_coroutine_threadsafe(_cancel_all(), self._loop).result(timeout_s)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self._loop.close()
