"""An entry waiting for its retry belongs to that retry, even when the heartbeat lags.

The heartbeat keeps the idle time of held entries (in flight or waiting for a retry)
below the claim threshold. When it falls behind (a stalled event loop, a slow Redis),
the entry grows idle, and the consumer's own claim loop must not take it back: the
retry timer will, after its backoff. Taking it counted a delivery at every claim pass
(XAUTOCLAIM counts one) until the retry found it "delivered too often" and
dead-lettered an entry that had failed once.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from orderflow.bus import Delivery, Message, StreamPublisher, StreamWorker, WorkerConfig
from orderflow.bus.consume.engine import Engine
from tests.support import wait_until

STREAM = "retry-own"
GROUP = "g"


async def test_the_own_claim_loop_leaves_an_entry_waiting_for_its_retry(
    aredis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def lagging(self: Engine) -> None:
        await asyncio.Event().wait()  # never beats: the held entries grow idle

    monkeypatch.setattr(Engine, "_heartbeat_loop", lagging)
    await StreamPublisher(aredis).publish_many(STREAM, [Message(data={})])
    calls: list[float] = []
    deliveries: list[int] = []

    async def handler(delivery: Delivery) -> None:
        calls.append(time.monotonic())
        deliveries.append(delivery.deliveries)
        if len(calls) == 1:
            raise RuntimeError("try again later")

    # The entry is idle past claim_idle_ms (100 ms) long before its retry (1 to 2 s).
    config = WorkerConfig(
        stream=STREAM,
        group=GROUP,
        block_ms=50,
        claim_idle_ms=100,
        retry_base_ms=2000,
        retry_max_ms=2000,
    )
    worker = StreamWorker(aredis, config, handler)
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: worker.stats.handled == 1, timeout=10, what="the retry handled")
    finally:
        worker.stop()
        await task
    assert worker.stats.claimed == 0
    # Redis counted two deliveries, not one per claim pass.
    assert deliveries == [1, 2]
    # The second call is the retry: not before the smallest backoff (half of 2 s).
    assert calls[1] - calls[0] >= 1.0
