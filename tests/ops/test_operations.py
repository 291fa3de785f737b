"""The operations themselves: replays never double an entry, snapshots bound --all."""

from __future__ import annotations

import asyncio

import redis
import redis.asyncio as aioredis

from orderflow.bus import admin as ops


def _dead_letters(client: redis.Redis, n: int) -> list[str]:
    pipe = client.pipeline()
    for i in range(n):
        pipe.xadd("orders:dlq", {"data": f'{{"id": {i}}}', "dlq_stream": "orders"})
    return [i.decode() for i in pipe.execute()]


async def test_concurrent_replays_move_each_dead_letter_once(
    aredis: aioredis.Redis, sync_redis: redis.Redis
) -> None:
    ids = _dead_letters(sync_redis, 50)

    results = await asyncio.gather(
        ops.replay_dead_letters(aredis, "orders", ids),
        ops.replay_dead_letters(aredis, "orders", list(reversed(ids))),
        ops.replay_dead_letters(aredis, "orders", None),
    )

    replayed = [i for r in results for i in r.replayed]
    assert sorted(replayed) == sorted(ids)
    assert sync_redis.xlen("orders") == 50
    assert sync_redis.xlen("orders:dlq") == 0


async def test_replay_all_leaves_dead_letters_that_arrive_meanwhile(
    aredis: aioredis.Redis, sync_redis: redis.Redis
) -> None:
    _dead_letters(sync_redis, ops.BATCH_SIZE + 50)
    late: list[str] = []

    def arrive_during_replay(done: int) -> None:
        # A worker dead-letters a new entry while the replay runs (between batches).
        if not late:
            late.extend(_dead_letters(sync_redis, 1))

    result = await ops.replay_dead_letters(aredis, "orders", None, progress=arrive_during_replay)

    assert len(result.replayed) == ops.BATCH_SIZE + 50
    assert [i.decode() for i, _ in sync_redis.xrange("orders:dlq")] == late


async def test_purge_all_keeps_dead_letters_newer_than_its_snapshot(
    aredis: aioredis.Redis, sync_redis: redis.Redis
) -> None:
    old = _dead_letters(sync_redis, 3)
    snapshot = await ops.last_dead_letter_id(aredis, "orders")
    new = _dead_letters(sync_redis, 2)

    result = await ops.purge_all_dead_letters(aredis, "orders", up_to=snapshot)

    assert snapshot == old[-1]
    assert result.deleted == 3
    assert [i.decode() for i, _ in sync_redis.xrange("orders:dlq")] == new


async def test_a_dead_letter_without_original_fields_is_reported_not_lost(
    aredis: aioredis.Redis, sync_redis: redis.Redis
) -> None:
    (entry_id,) = [sync_redis.xadd("orders:dlq", {"dlq_reason": "nothing else"}).decode()]

    result = await ops.replay_dead_letters(aredis, "orders", [entry_id])

    assert list(result.failed) == [entry_id]
    assert "no original fields" in result.failed[entry_id]
    assert sync_redis.xlen("orders:dlq") == 1
    assert not sync_redis.exists("orders")
