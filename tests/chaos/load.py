"""The load generator: orders POSTed as a client that retries with the same id does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx


def order_body(order_id: int) -> dict[str, Any]:
    """A valid order with an explicit id."""
    return {
        "id": order_id,
        "email": f"buyer{order_id}@example.com",
        "total": "10.00",
        "items": [{"name": "Book", "quantity": 1}],
    }


class OrderRefused(AssertionError):
    """The API refused an order with a 4xx: a bug in the scenario or in the API."""


async def submit(
    api_url: str,
    ids: list[int],
    *,
    rate: float | None = None,
    concurrency: int = 4,
    body: Callable[[int], dict[str, Any]] | None = None,
    give_up_s: float = 120.0,
    retry_pause_s: float = 0.05,
    transport: httpx.AsyncBaseTransport | None = None,
) -> list[int]:
    """POST each order (explicit id) until it is accepted with 201, retrying on a 5xx or
    a failed connection with the same id; at most ``rate`` per second. Returns the ids
    accepted. A 4xx raises :class:`OrderRefused`; an order never accepted within
    ``give_up_s`` raises AssertionError.

    Few concurrent clients: on SQLite the API takes more orders per second with 4 than
    with 64 (its writers queue for the one database lock).
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    make = body or order_body
    queue: asyncio.Queue[int] = asyncio.Queue()
    for order_id in ids:
        queue.put_nowait(order_id)
    accepted: list[int] = []
    started = time.monotonic()
    issued = 0

    async def one(client: httpx.AsyncClient) -> None:
        nonlocal issued
        while not queue.empty():
            order_id = queue.get_nowait()
            if rate is not None:
                issued += 1
                await asyncio.sleep(max(0.0, started + issued / rate - time.monotonic()))
            deadline = time.monotonic() + give_up_s
            while True:
                try:
                    response: httpx.Response | None = await client.post(
                        "/orders", json=make(order_id)
                    )
                except httpx.HTTPError:
                    response = None
                if response is not None and response.status_code == 201:
                    accepted.append(order_id)
                    break
                if response is not None and response.status_code < 500:
                    raise OrderRefused(f"order {order_id}: {response.status_code} {response.text}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"order {order_id} never accepted")
                await asyncio.sleep(retry_pause_s)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=api_url, timeout=10, limits=limits, transport=transport
    ) as client:
        await asyncio.gather(*(one(client) for _ in range(concurrency)))
    return accepted
