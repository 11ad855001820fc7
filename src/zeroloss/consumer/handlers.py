"""How a function registered with ``@consumer.handler`` becomes the one ``handler(msg, tx)`` the
handling loop calls.
The details: docs/design.md, "consumer/handlers.py"."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

from zeroloss import tracing
from zeroloss.errors import ConfigError
from zeroloss.received import Received


class RegisteredHandler:
    """``fn`` as registered, callable as ``handler(msg, tx)``."""

    def __init__(self, fn: Callable[..., Any], model: type[Any] | None = None, batch: bool = False) -> None:
        if not callable(fn):
            raise ConfigError(f"a handler must be a function, got {type(fn).__name__}")
        self.fn = fn
        self.model = model
        self.batch = batch
        self.is_async = inspect.iscoroutinefunction(fn)
        self._loop: asyncio.AbstractEventLoop | None = None

    def __call__(self, msg: Received, tx: Any) -> None:
        if self.batch:
            self.call_many([msg], tx)
            return
        with tracing.handling(msg.topic, msg.id, msg.headers):
            result = self.fn(msg if self.model is None else msg.decode(self.model), tx)
            if inspect.isawaitable(result):
                self._complete(result)

    def call_many(self, msgs: list[Received], tx: Any) -> None:
        """A batch handler's call; one message runs in its own trace context, more in one span
        linked to theirs."""
        assert self.batch
        # a list of its own: the handler may consume it (pop, clear) without touching the loop's
        values = list(msgs) if self.model is None else [m.decode(self.model) for m in msgs]
        if len(msgs) == 1:
            span = tracing.handling(msgs[0].topic, msgs[0].id, msgs[0].headers)
        else:
            # a consumer of several topics gets runs that mix them: then the span names none
            topic = msgs[0].topic if all(m.topic == msgs[0].topic for m in msgs) else None
            span = tracing.handling_batch(topic, [(m.id, m.headers) for m in msgs])
        with span:
            result = self.fn(values, tx)
            if inspect.isawaitable(result):
                self._complete(result)

    def check_can_run(self) -> None:
        """ConfigError, before any message is taken, where an async handler could not run."""
        if not self.is_async:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        raise ConfigError(
            "an async handler cannot run on a thread whose event loop is running: start the "
            "consumer in a thread of its own, e.g. await asyncio.to_thread(consumer.run)"
        )

    def _complete(self, awaitable: Any) -> None:
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()  # kept: making one per message would cost more
        self._loop.run_until_complete(awaitable)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.close()
            self._loop = None
