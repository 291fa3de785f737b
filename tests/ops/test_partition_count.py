"""Changing a stream's partition count on one server: refused while anything would be stranded."""

from __future__ import annotations

import pytest
import redis
import redis.asyncio as aioredis

from orderflow.bus.partitions import (
    PartitionCountError,
    PartitionLayout,
    layout_key,
    resolve_layout,
)

GROUP = "email-service"


async def test_the_plain_stream_is_split_only_once_drained(
    aredis: aioredis.Redis, sync_redis: redis.Redis
) -> None:
    # The contract's plain stream, in use: one entry read, one not yet.
    sync_redis.xgroup_create("orders", GROUP, id="0", mkstream=True)
    sync_redis.xadd("orders", {"data": "{}"})
    sync_redis.xadd("orders", {"data": "{}"})
    ((_, rows),) = sync_redis.xreadgroup(GROUP, "c", {"orders": ">"}, count=1)

    with pytest.raises(
        PartitionCountError, match="is one plain stream, not 3: refusing to change while 2 entries"
    ):
        await resolve_layout(aredis, "orders", 3)
    assert not sync_redis.exists(layout_key("orders"))

    sync_redis.xack("orders", GROUP, rows[0][0])
    ((_, rows),) = sync_redis.xreadgroup(GROUP, "c", {"orders": ">"})
    sync_redis.xack("orders", GROUP, rows[0][0])
    layout = await resolve_layout(aredis, "orders", 3)

    assert layout.names == ["{orders:0}", "{orders:1}", "{orders:2}"]
    assert sync_redis.get(layout_key("orders")) == b"3"


async def test_dead_letters_the_new_count_would_hide_are_refused(
    aredis: aioredis.Redis, sync_redis: redis.Redis
) -> None:
    sync_redis.xadd("orders:dlq", {"data": "{}"})
    with pytest.raises(
        PartitionCountError, match="1 dead letters are in partitions that would be dropped"
    ):
        await resolve_layout(aredis, "orders", 2)
    sync_redis.delete("orders:dlq")
    await resolve_layout(aredis, "orders", 3)

    # 3 -> 2 drops {orders:2}: its dead letters block; {orders:0}'s stay found.
    old = PartitionLayout("orders", 3)
    sync_redis.xadd(old.keys(0).dlq, {"data": "{}"})
    sync_redis.xadd(old.keys(2).dlq, {"data": "{}"})
    with pytest.raises(PartitionCountError, match="1 dead letters") as refused:
        await resolve_layout(aredis, "orders", 2)
    assert "orderflow dlq" in str(refused.value)
    assert sync_redis.get(layout_key("orders")) == b"3"

    sync_redis.delete(old.keys(2).dlq)
    assert (await resolve_layout(aredis, "orders", 2)).count == 2
    # Back to one plain stream: {orders:0} and {orders:1} are dropped.
    with pytest.raises(PartitionCountError, match="has 2 partitions, not 1"):
        await resolve_layout(aredis, "orders", 1)
