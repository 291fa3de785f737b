"""A consumer process for crash tests: records each entry it starts and finishes in Redis.

Usage: python consumer_proc.py REDIS_URL CONSUMER_NAME CLAIM_IDLE_MS HANDLER_SECONDS
"""

from __future__ import annotations

import asyncio
import sys

from orderflow.bus import Delivery, StreamWorker, WorkerConfig, connect
from orderflow.cli.common import stop_on_signals


async def main(url: str, name: str, claim_idle_ms: int, handler_seconds: float) -> None:
    redis = connect(url)

    async def handler(delivery: Delivery) -> None:
        n = str(delivery.message.data["n"])
        await redis.sadd("started", n)
        await asyncio.sleep(handler_seconds)  # the work whose interruption is under test
        await redis.rpush("finished", n)

    config = WorkerConfig(
        stream="orders",
        group="email-service",
        consumer=name,
        concurrency=16,
        block_ms=100,
        claim_idle_ms=claim_idle_ms,
        max_deliveries=10,
    )
    worker = StreamWorker(redis, config, handler)
    stop = asyncio.Event()
    stop_on_signals(stop)
    task = asyncio.create_task(worker.run())
    await stop.wait()
    worker.stop()
    await task
    await redis.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
