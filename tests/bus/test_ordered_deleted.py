"""Ordered mode: an entry deleted while pending leaves the PEL (on Redis 6.2 too)."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from orderflow.bus import Delivery, Message, StreamPublisher, WorkerConfig
from orderflow.bus.consume.ordered import OrderedWorker
from orderflow.bus.partitions import PartitionLayout
from tests.support import wait_until

GROUP = "email-service"


async def test_entries_deleted_while_pending_are_cleared_in_ordered_mode(
    aredis: aioredis.Redis,
) -> None:
    layout = PartitionLayout("orders", 1)
    (name,) = layout.names
    publisher = StreamPublisher(aredis)
    ids = [
        await publisher.publish(name, Message.event("order.step", {"n": n}, source="test"))
        for n in range(2)
    ]
    await aredis.xgroup_create(name, GROUP, id="0")
    await aredis.xreadgroup(GROUP, "dead-consumer", {name: ">"}, count=2)
    await aredis.xdel(name, ids[0])
    seen: list[str] = []

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery.entry_id)

    config = WorkerConfig(stream=name, group=GROUP, consumer="w1", claim_idle_ms=600, block_ms=50)
    worker = OrderedWorker(aredis, layout, config, handler)
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: seen == [ids[1]], what="the surviving entry")

        async def pel_empty() -> bool:
            return int((await aredis.xpending(name, GROUP))["pending"]) == 0

        await wait_until(pel_empty, what="the deleted entry to leave the PEL")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)
