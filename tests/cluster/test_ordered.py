"""Ordered mode on the cluster: one leaseholder per partition, per-order order, rebalancing."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict

import pytest
import redis.asyncio as aioredis

from orderflow.bus import Delivery, Message, WorkerConfig
from orderflow.bus.consume import OrderedWorker
from orderflow.bus.partitions import PartitionedPublisher, PartitionLayout, resolve_layout
from tests.cluster.conftest import wait_until

pytestmark = pytest.mark.slow

GROUP = "email-service"


class Recorder:
    """A handler recording (order, seq) per order; fails some first deliveries on purpose."""

    def __init__(self, fail_every: int = 0) -> None:
        self.seen: dict[int, list[int]] = defaultdict(list)
        self.by_worker: dict[str, int] = defaultdict(int)
        self.fail_every = fail_every
        self.failed: set[tuple[int, int]] = set()
        self.running: dict[str, str] = {}
        self.overlaps = 0

    def handler(self, name: str) -> object:
        async def handle(delivery: Delivery) -> None:
            order, seq = int(delivery.message.data["order"]), int(delivery.message.data["seq"])
            # Never two handlers at once on one partition: that is what a lease is for.
            if self.running.get(delivery.stream, name) != name:
                self.overlaps += 1
            self.running[delivery.stream] = name
            try:
                await asyncio.sleep(random.uniform(0, 0.003))  # handlers that overlap in time
                chosen = self.fail_every and (order * 7 + seq) % self.fail_every == 0
                if chosen and (order, seq) not in self.failed:
                    self.failed.add((order, seq))
                    raise RuntimeError("transient, try again")
            finally:
                # A failed handler has stopped running too: the partition may then pass
                # to another worker (a lease that lapsed on a loaded machine) without
                # that being an overlap.
                self.running.pop(delivery.stream, None)
            self.seen[order].append(seq)
            self.by_worker[name] += 1

        return handle

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.seen.values())


def worker(
    redis: aioredis.Redis, layout: PartitionLayout, rec: Recorder, name: str
) -> OrderedWorker:
    config = WorkerConfig(
        stream=layout.names[0],
        group=GROUP,
        consumer=name,
        claim_idle_ms=900,
        retry_base_ms=5,
        retry_max_ms=20,
        block_ms=100,
        max_deliveries=5,
    )
    return OrderedWorker(redis, layout, config, rec.handler(name))  # type: ignore[arg-type]


async def publish(
    redis: aioredis.Redis, layout: PartitionLayout, orders: range, seqs: range
) -> None:
    """For each seq, one event of every order: the events of one order interleave with others."""
    publisher = PartitionedPublisher(redis)
    for seq in seqs:
        items = [
            (order, Message.event("order.step", {"order": order, "seq": seq}, source="test"))
            for order in orders
        ]
        await publisher.publish_keyed(layout, items)


def assert_in_order_once(rec: Recorder, orders: range, seqs: range) -> None:
    for order in orders:
        assert rec.seen[order] == list(seqs), (order, rec.seen[order])


async def test_per_order_order_with_several_workers(acluster: aioredis.Redis) -> None:
    layout = await resolve_layout(acluster, "orders", 6)
    rec = Recorder(fail_every=11)
    workers = [worker(acluster, layout, rec, f"w{i}") for i in range(3)]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        # Workers join one by one; they settle on 2 partitions each.
        await wait_until(lambda: sorted(len(w.owned) for w in workers) == [2, 2, 2])
        orders, seqs = range(1, 41), range(10)
        await publish(acluster, layout, orders, seqs)
        await wait_until(lambda: rec.total >= len(orders) * len(seqs))
    finally:
        for w in workers:
            w.stop()
        await asyncio.gather(*tasks)
    assert_in_order_once(rec, orders, seqs)
    assert rec.failed, "some deliveries should have failed and been retried in place"
    assert rec.overlaps == 0
    assert all(rec.by_worker[f"w{i}"] for i in range(3))


async def test_workers_joining_and_leaving_rebalance_without_loss(
    acluster: aioredis.Redis,
) -> None:
    layout = await resolve_layout(acluster, "orders", 6)
    rec = Recorder()
    orders = range(1, 31)
    first = worker(acluster, layout, rec, "first")
    first_task = asyncio.create_task(first.run())
    await wait_until(lambda: len(first.owned) == 6)
    await publish(acluster, layout, orders, range(0, 5))

    second = worker(acluster, layout, rec, "second")
    second_task = asyncio.create_task(second.run())
    # Joining: the partitions are shared out, 3 each, while events keep coming.
    await publish(acluster, layout, orders, range(5, 10))
    await wait_until(lambda: len(first.owned) == 3 and len(second.owned) == 3)
    assert not set(first.owned) & set(second.owned)
    await publish(acluster, layout, orders, range(10, 15))

    # Leaving: the first stops (its in-flight entry finishes); the second takes all.
    first.stop()
    await first_task
    await publish(acluster, layout, orders, range(15, 20))
    await wait_until(lambda: len(second.owned) == 6)
    await wait_until(lambda: rec.total >= len(orders) * 20)
    second.stop()
    await second_task
    assert_in_order_once(rec, orders, range(20))
    assert rec.by_worker["first"]
    assert rec.by_worker["second"]
    pending = [await acluster.xpending(name, GROUP) for name in layout.names]
    assert all(p["pending"] == 0 for p in pending)


async def test_a_dead_workers_partitions_move_after_the_lease(acluster: aioredis.Redis) -> None:
    layout = await resolve_layout(acluster, "orders", 6)
    rec = Recorder()
    a, b = worker(acluster, layout, rec, "a"), worker(acluster, layout, rec, "b")
    task_a, task_b = asyncio.create_task(a.run()), asyncio.create_task(b.run())
    await wait_until(lambda: len(a.owned) == 3 and len(b.owned) == 3)
    # "a" vanishes without giving its leases up (as a killed process would).
    task_a.cancel()
    await asyncio.gather(task_a, return_exceptions=True)
    orders = range(1, 21)
    await publish(acluster, layout, orders, range(5))
    await wait_until(lambda: len(b.owned) == 6, timeout=10)
    await wait_until(lambda: rec.total >= len(orders) * 5)
    b.stop()
    await task_b
    assert_in_order_once(rec, orders, range(5))
