"""An async handler (docs/recipes/async.md): ``async def`` handlers, and a consumer inside an asyncio app.

An ``async def`` handler runs to completion on an event loop the consumer keeps for it, in the
consumer's thread and inside the inbox transaction, so it can ``await`` an async client (HTTP, a
cache) while ``tx`` stays the synchronous connection whose commit makes the effect exactly-once.
An app whose thread already runs an event loop (FastAPI, aiohttp) starts the consumer in a thread
of its own, ``asyncio.to_thread(consumer.run)``, and stops it with ``consumer.stop()``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, text

from zeroloss import Consumer


async def fetch_rate(currency: str) -> float:
    """Stands for an async client call (httpx.AsyncClient, an async cache, …)."""
    await asyncio.sleep(0)
    return {"EUR": 1.0, "USD": 0.9}[currency]


def async_billing(
    broker: str, inbox: Any, *, topic: str = "orders", group: str = "billing", **options: Any
) -> Consumer:
    consumer = Consumer(broker, group=group, topics=[topic], inbox=inbox, **options)

    # [recipe:bill]
    @consumer.handler
    async def bill(msg: Any, tx: Connection) -> None:
        order = msg.json()
        rate = await fetch_rate(order["currency"])  # an async client
        tx.execute(
            text("INSERT INTO invoices (order_id, total_eur) VALUES (:id, :t)"),
            {"id": order["id"], "t": order["total"] * rate},
        )

    # [/recipe]

    return consumer


# [recipe:main]
async def main(consumer: Consumer, run: Callable[[], None] | None = None) -> None:
    """An asyncio app: the consumer (``consumer.run`` unless told) in a thread of its own,
    stopped when the app stops."""
    task = asyncio.create_task(asyncio.to_thread(run or consumer.run))
    try:
        await task  # … the app's own work runs meanwhile on this loop
    finally:
        consumer.stop()  # finishes the message in flight, commits, leaves the group


# [/recipe]
