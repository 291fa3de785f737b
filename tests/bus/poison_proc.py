"""A consumer process whose handler hangs on a poison entry, for the poison-message tests.

Usage: python poison_proc.py REDIS_URL MODE CONSUMER_NAME CLAIM_IDLE_MS
(MODE: competing, partitioned or ordered). Each delivery of the poison entry is recorded
(``poison-started``, with its delivery count) before the handler hangs, so that the test
knows when to kill the process; every other entry is recorded in ``handled``.
"""

from __future__ import annotations

import asyncio
import sys

from orderflow.bus import Delivery, StreamWorker, WorkerConfig, connect
from orderflow.bus.consume import OrderedWorker, PartitionedWorker
from orderflow.bus.partitions import resolve_layout
from orderflow.cli.common import stop_on_signals

STREAM = "orders"
GROUP = "email-service"
PARTITIONS = 2
MAX_DELIVERIES = 3


async def main(url: str, mode: str, name: str, claim_idle_ms: int) -> None:
    redis = connect(url)

    async def handler(delivery: Delivery) -> None:
        if delivery.message.data.get("poison"):
            await redis.rpush("poison-started", f"{name}:{delivery.deliveries}")
            await asyncio.Event().wait()  # hangs until the process is killed
        await redis.rpush("handled", str(delivery.message.data["n"]))

    config = WorkerConfig(
        stream=STREAM,
        group=GROUP,
        consumer=name,
        block_ms=100,
        claim_idle_ms=claim_idle_ms,
        max_deliveries=MAX_DELIVERIES,
        retry_base_ms=10,
        retry_max_ms=50,
    )
    worker: StreamWorker | PartitionedWorker | OrderedWorker
    if mode == "competing":
        worker = StreamWorker(redis, config, handler)
    else:
        layout = await resolve_layout(redis, STREAM, PARTITIONS)
        kind = OrderedWorker if mode == "ordered" else PartitionedWorker
        worker = kind(redis, layout, config, handler)
    stop = asyncio.Event()
    stop_on_signals(stop)
    task = asyncio.create_task(worker.run())
    await stop.wait()
    worker.stop()
    await task
    await redis.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
