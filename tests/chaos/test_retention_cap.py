"""The retention cap holds for small caps too (found by the backlog scenario)."""

from __future__ import annotations

import redis.asyncio as aioredis

from orderflow.bus import Delivery, Message, Retention, StreamPublisher, StreamWorker, WorkerConfig


async def _ignore(delivery: Delivery) -> None:
    """A handler that accepts everything."""


async def test_a_cap_smaller_than_the_trim_interval_is_still_kept(aredis: aioredis.Redis) -> None:
    # A cap of 50 with the default "trim every 1000 entries" let the stream grow to
    # 1050 entries, twenty times its cap, although every entry was acknowledged.
    cap = 50
    publisher = StreamPublisher(aredis, retention=Retention(maxlen=cap))
    worker = StreamWorker(aredis, WorkerConfig(stream="orders", group="g", block_ms=50), _ignore)
    for n in range(6):
        await publisher.publish_many("orders", [Message({"id": n * 100 + i}) for i in range(100)])
        await worker.run(burst=True)
        worker = StreamWorker(aredis, worker.config, _ignore)
    await publisher.publish("orders", Message({"id": 0}))
    # Approximate trimming removes whole stream nodes (100 entries each by default).
    assert await aredis.xlen("orders") <= cap + cap // 10 + 100
