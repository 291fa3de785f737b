"""The whole flow on a Redis Cluster: API -> relay -> partitions -> email workers -> SMTP."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from orderflow.bus.partitions import (
    DEFAULT_CLUSTER_PARTITIONS,
    PartitionCountError,
    resolve_layout,
)
from orderflow.config import Settings
from orderflow.email import EmailService, SmtpSender
from orderflow.email.journey import SENT, read_journey
from tests.cluster.conftest import wait_until
from tests.email.conftest import FAST_WORKER, SmtpFixture
from tests.orders.conftest import running_api
from tests.support import order_body

pytestmark = pytest.mark.slow


async def test_connect_detects_the_cluster(acluster: aioredis.Redis) -> None:
    assert isinstance(acluster, RedisCluster)
    layout = await resolve_layout(acluster, "orders")
    assert layout.count == DEFAULT_CLUSTER_PARTITIONS
    assert layout.names[0] == "{orders:0}"
    assert layout.keys(0).dlq == "{orders:0}:dlq"


async def test_every_order_is_emailed_exactly_once(
    cluster_settings: Settings, acluster: aioredis.Redis, smtp: SmtpFixture
) -> None:
    count = 60
    senders = [SmtpSender(smtp.url, pool_size=4) for _ in range(2)]
    services = [
        EmailService(cluster_settings, acluster, s, concurrency=8, worker_options=FAST_WORKER)
        for s in senders
    ]
    tasks = [asyncio.create_task(s.run()) for s in services]
    try:
        async with running_api(cluster_settings, run_relay=True, run_email_status=True) as api:
            for service in services:
                await service.wait_started()
            ids = []
            for n in range(count):
                response = await api.post(order_body(n))
                assert response.status_code == 201, response.text
                ids.append(response.json()["id"])
            await wait_until(lambda: len(smtp.handler.received) >= count)

            async def all_sent() -> bool:
                pages = [(await api.client.get(f"/orders/{i}")).json() for i in ids]
                return all(p["email_status"] == "sent" for p in pages)

            await wait_until(all_sent)
    finally:
        for service in services:
            service.stop()
        await asyncio.gather(*tasks)
        for s in senders:
            await s.close()
    per_order = Counter(r.message["Message-ID"] for r in smtp.handler.received)
    assert len(per_order) == count
    assert set(per_order.values()) == {1}
    # The orders were spread over every partition, and each was served.
    layout = await resolve_layout(acluster, "orders")
    lengths = [int(await acluster.xlen(name)) for name in layout.names]
    assert sum(lengths) == count
    assert all(lengths), lengths
    handled = sum(s.worker.stats.handled for s in services)
    assert handled == count
    # Each order's journey was recorded too (on a cluster: a pipeline over the slots).
    for order_id in ids:
        assert [step.outcome for step in await read_journey(acluster, order_id)] == [SENT]


async def test_changing_the_count_is_refused_while_entries_are_unfinished(
    acluster: aioredis.Redis,
) -> None:
    from orderflow.bus import Message
    from orderflow.bus.partitions import PartitionedPublisher
    from orderflow.bus.streams import ensure_group

    layout = await resolve_layout(acluster, "orders", 4)
    for name in layout.names:
        await ensure_group(acluster, name, "email-service")
    await PartitionedPublisher(acluster).publish_keyed(
        layout, [(i, Message.event("order.created", {"id": i}, source="test")) for i in range(8)]
    )
    with pytest.raises(PartitionCountError, match="refusing to change while 8 entries"):
        await resolve_layout(acluster, "orders", 6)
    # Drained (read and acknowledged): the change is allowed.
    for name in layout.names:
        reply = await acluster.xreadgroup("email-service", "c", {name: ">"})
        for _, entries in reply:
            await acluster.xack(name, "email-service", *[i for i, _ in entries])
    assert (await resolve_layout(acluster, "orders", 6)).count == 6
    assert (await resolve_layout(acluster, "orders")).count == 6
