"""The retry policy: how long to wait, and taking an entry back for its next delivery.

A failed entry is held by the consumer that failed it (in process: a timer, or in
place in ordered mode) and then claimed back, which makes Redis count the delivery in
the group's pending entries list. That count, not a counter of the process, decides
when the entry is dead-lettered, so it survives crashes, restarts and new owners.
"""

from __future__ import annotations

import random
from typing import Any

import redis.asyncio as aioredis

from orderflow.bus.streams import flat_fields

__all__ = ["backoff_s", "claim_back", "reconnect_delay_s"]


def backoff_s(deliveries: int, base_ms: int, max_ms: int) -> float:
    """Delay before delivery ``deliveries + 1``: doubling from ``base_ms`` up to
    ``max_ms``, drawn from its upper half (jitter, so failed entries spread out)."""
    ceiling = min(max_ms, base_ms * 2 ** (deliveries - 1))
    return random.uniform(ceiling / 2, ceiling) / 1000


def reconnect_delay_s(attempt: int, max_s: float) -> float:
    """Wait before trying Redis again after ``attempt`` failures in a row: doubling
    from 50 ms up to ``max_s``, with jitter."""
    delay = min(max_s, 0.05 * 2 ** min(attempt, 10))
    return random.uniform(delay / 2, delay)


async def claim_back(
    redis: aioredis.Redis, stream: str, group: str, consumer: str, entry_id: str
) -> tuple[list[bytes], int] | None:
    """Claim ``entry_id`` for ``consumer`` again (Redis counts one more delivery).

    Returns its fields (flat, as Redis replies them) and Redis's delivery count, or
    None when the entry is gone from the stream or was acknowledged elsewhere.
    """
    pipe = redis.pipeline(transaction=False)
    pipe.xclaim(stream, group, consumer, 0, [entry_id])
    pipe.xpending_range(stream, group, entry_id, entry_id, 1, consumername=consumer)
    claimed, pending = await pipe.execute()
    entries: list[Any] = [(i, f) for i, f in claimed if i is not None and f is not None]
    if not entries:
        return None
    deliveries = int(pending[0]["times_delivered"]) if pending else 1
    return flat_fields(entries[0][1]), deliveries
