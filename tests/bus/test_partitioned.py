"""PartitionedWorker on one Redis: a competing consumer on every partition of a stream."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis

from orderflow.bus import Delivery, Message, StreamPublisher, WorkerConfig
from orderflow.bus.consume import PartitionedWorker
from orderflow.bus.consume import supervised as supervised_module
from orderflow.bus.partitions import PartitionLayout
from tests.support import wait_until
from tests.support.wait import TimedOutWaits

LAYOUT = PartitionLayout("orders", 4)


def _config(concurrency: int = 64) -> WorkerConfig:
    return WorkerConfig(
        stream="orders", group="g", consumer="c1", block_ms=50, concurrency=concurrency
    )


async def _ignore(delivery: Delivery) -> None:
    pass


async def _one_per_partition(redis: aioredis.Redis, layout: PartitionLayout) -> None:
    publisher = StreamPublisher(redis)
    for name in layout.names:
        await publisher.publish(name, Message.event("order.step", {}, source="test"))


def test_the_concurrency_is_shared_out_over_the_partitions_at_least_4_each(
    aredis: aioredis.Redis,
) -> None:
    worker = PartitionedWorker(aredis, LAYOUT, _config(20), _ignore)
    assert worker.layout is LAYOUT
    assert worker.config.stream == LAYOUT.names[0]
    assert worker.config.concurrency == 5
    assert worker.consumer == "c1"
    assert [w.config.stream for w in worker.workers] == LAYOUT.names
    assert {w.config.concurrency for w in worker.workers} == {5}
    assert {w.consumer for w in worker.workers} == {"c1"}
    # Rounded up, and never below 4.
    assert (
        PartitionedWorker(
            aredis, PartitionLayout("orders", 3), _config(13), _ignore
        ).config.concurrency
        == 5
    )
    assert PartitionedWorker(aredis, LAYOUT, _config(10), _ignore).config.concurrency == 4


async def test_a_burst_run_drains_every_partition_and_adds_their_stats_up(
    aredis: aioredis.Redis,
) -> None:
    await _one_per_partition(aredis, LAYOUT)
    await _one_per_partition(aredis, LAYOUT)
    seen: list[str] = []

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery.stream)

    worker = PartitionedWorker(aredis, LAYOUT, _config(), handler)
    stats = await asyncio.wait_for(worker.run(burst=True), 10)
    assert stats.handled == 8
    assert worker.stats.handled == 8
    assert sorted(seen) == sorted(LAYOUT.names * 2)


async def test_entries_in_hand_are_counted_over_every_partition_until_stop(
    aredis: aioredis.Redis,
) -> None:
    release = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        await release.wait()

    worker = PartitionedWorker(aredis, LAYOUT, _config(), handler)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.wait_started(), 10)
        await _one_per_partition(aredis, LAYOUT)
        await wait_until(lambda: worker.held == 4, what="an entry in hand per partition")
        release.set()
        await wait_until(lambda: worker.stats.handled == 4, what="the 4 handled")
    finally:
        release.set()
        worker.stop()
        stats = await asyncio.wait_for(task, 10)
    assert stats.handled == 4
    assert worker.held == 0


class FailingClaims(aioredis.Redis):
    """A client whose first XAUTOCLAIM (a claim loop's) fails."""

    failed = 0

    async def xautoclaim(self, *args: Any, **kwargs: Any) -> Any:
        if not self.failed:
            self.failed += 1
            raise AttributeError("planted")
        return await super().xautoclaim(*args, **kwargs)


async def test_a_failed_partition_worker_starts_again_after_the_restart_delay_given(
    redis_url: str,
) -> None:
    client = FailingClaims.from_url(redis_url)
    assert isinstance(client, FailingClaims)
    config = WorkerConfig(stream="orders", group="g", block_ms=50, claim_interval_ms=10)
    worker = PartitionedWorker(client, LAYOUT, config, _ignore, restart_delay_s=0.05)
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: sum(w.restarts for w in worker.workers) == 1, what="a restart")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)
        await client.aclose()


@pytest.mark.parametrize(("given", "expected"), [({}, 0.5), ({"restart_delay_s": 0.05}, 0.05)])
async def test_the_partitions_workers_wait_the_restart_delay_given_or_half_a_second(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, given: dict[str, float], expected: float
) -> None:
    client = FailingClaims.from_url(redis_url)
    assert isinstance(client, FailingClaims)
    waits = TimedOutWaits()
    monkeypatch.setattr(supervised_module, "asyncio", waits)
    config = WorkerConfig(stream="orders", group="g", block_ms=50, claim_interval_ms=10)
    worker = PartitionedWorker(client, LAYOUT, config, _ignore, **given)
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: sum(w.restarts for w in worker.workers) == 1, what="a restart")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)
        await client.aclose()
    assert waits.timeouts == [expected]
