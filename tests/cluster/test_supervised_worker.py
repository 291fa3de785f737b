"""SupervisedStreamWorker, which the partitioned workers use to ride out a failover."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis

from orderflow.bus import Delivery, WorkerConfig, connect
from orderflow.bus.consume import SupervisedStreamWorker
from tests.support import wait_until


class FailingOnce(aioredis.Redis):
    """A client whose first XAUTOCLAIM (the worker's claim loop) fails as redis-py's
    cluster client did when a node died under it."""

    failures = 0

    async def xautoclaim(self, *args: Any, **kwargs: Any) -> Any:
        if FailingOnce.failures == 0:
            FailingOnce.failures += 1
            raise AttributeError("'NoneType' object has no attribute 'writelines'")
        return await super().xautoclaim(*args, **kwargs)


async def test_a_failed_loop_restarts_the_worker_and_stop_still_stops_it(
    redis_url: str, aredis: aioredis.Redis
) -> None:
    client = FailingOnce.from_url(redis_url)
    handled: list[str] = []

    async def handle(delivery: Delivery) -> None:
        handled.append(delivery.entry_id)

    config = WorkerConfig(stream="orders", group="g", block_ms=50, claim_interval_ms=10)
    worker = SupervisedStreamWorker(client, config, handle, restart_delay_s=0.05)
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: worker.restarts == 1)
        entry = (await aredis.xadd("orders", {"data": "{}"})).decode()
        await wait_until(lambda: handled == [entry])
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)
        await client.aclose()
    assert FailingOnce.failures == 1
    assert task.done()


async def test_stop_during_a_run_is_for_good(redis_url: str) -> None:
    client = connect(redis_url)

    async def handle(delivery: Delivery) -> None:
        pass

    worker = SupervisedStreamWorker(
        client, WorkerConfig(stream="orders", group="g", block_ms=50), handle
    )
    task = asyncio.create_task(worker.run())
    try:
        await worker.wait_started()
        worker.stop()
        await asyncio.wait_for(task, 10)
        assert worker.restarts == 0
    finally:
        await client.aclose()
