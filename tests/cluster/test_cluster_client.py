"""The cluster client that ``connect`` gives: transactions stay on the caller's event loop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.exceptions import RedisClusterException

from orderflow.bus import connect

pytestmark = pytest.mark.slow


async def test_transactions_while_the_slot_map_loads(cluster_url: str) -> None:
    # A fresh client loads the slot map on its first commands. redis-py 8.1's own
    # cluster transaction did that on a thread's event loop, and failed ("bound to a
    # different event loop") while the caller's loop was loading it too.
    client = connect(cluster_url)
    try:

        async def dead_letter(i: int) -> Any:
            pipe = client.pipeline(transaction=True)
            pipe.xadd("{t:1}:dlq", {"i": i})
            pipe.xadd("{t:1}", {"i": i})
            return await pipe.execute()

        results = await asyncio.gather(
            *(client.xadd("{t:2}", {"i": i}) for i in range(5)),
            *(dead_letter(i) for i in range(20)),
            return_exceptions=True,
        )
        assert [r for r in results if isinstance(r, BaseException)] == []
        assert await client.xlen("{t:1}") == await client.xlen("{t:1}:dlq") == 20
    finally:
        await client.aclose()


async def test_a_transaction_is_one_slot_and_atomic(cluster_url: str) -> None:
    client = connect(cluster_url)
    try:
        await client.set("{t:3}:flag", "x")
        pipe = client.pipeline(transaction=True)
        pipe.xadd("{t:3}", {"a": 1})
        pipe.incr("{t:3}:flag")  # fails inside EXEC: a string, not an integer
        with pytest.raises(Exception, match="not an integer"):
            await pipe.execute()
        assert await client.xlen("{t:3}") == 1  # MULTI/EXEC: no rollback, as in Redis

        cross = client.pipeline(transaction=True)
        cross.xadd("{t:4}", {"a": 1})
        cross.xadd("{t:5}", {"a": 1})
        with pytest.raises(RedisClusterException, match="same slot"):
            await cross.execute()
        assert not await client.exists("{t:4}", "{t:5}")

        watching = client.pipeline(transaction=True)
        with pytest.raises(RedisClusterException, match="WATCH is not supported"):
            watching.execute_command("WATCH", "{t:3}")
    finally:
        await client.aclose()
