"""A message whose delivery kills its consumer is dead-lettered after max_deliveries.

Each round a fresh consumer process takes the poison entry over (claimed after the
claim timeout, or with the partition's lease) and is SIGKILLed while its handler hangs
on it. Redis's delivery count survives the kills, so the consumer that finds it
delivered more than ``max_deliveries`` times dead-letters it, in every mode, and the
entries published behind it (in ordered mode: blocked behind it in its partition) are
handled.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from orderflow.bus import Message, StreamPublisher
from orderflow.bus.partitions import PartitionedPublisher, resolve_layout
from tests.bus.poison_proc import MAX_DELIVERIES, PARTITIONS, STREAM
from tests.support import wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

CONSUMER = Path(__file__).with_name("poison_proc.py")
CLAIM_IDLE_MS = 500
#: Entries published behind the poison one (in its partition, when partitioned).
FOLLOWERS = 5


def start(url: str, mode: str, name: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(CONSUMER), url, mode, name, str(CLAIM_IDLE_MS)],
        stdout=subprocess.DEVNULL,
    )


async def publish(redis: aioredis.Redis, mode: str, messages: list[Message]) -> str:
    """Publish ``messages`` keyed alike (one partition, when partitioned); returns the stream."""
    if mode == "competing":
        await StreamPublisher(redis).publish_many(STREAM, messages)
        return STREAM
    layout = await resolve_layout(redis, STREAM, PARTITIONS)
    await PartitionedPublisher(redis).publish_keyed(layout, [(42, m) for m in messages])
    return layout.for_key(42)


async def dead_letters(redis: aioredis.Redis, stream: str) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in await redis.xrange(stream + ":dlq")]


@pytest.mark.parametrize("mode", ["competing", "partitioned", "ordered"])
async def test_a_message_that_kills_its_consumer_is_dead_lettered(
    redis_url: str, aredis: aioredis.Redis, mode: str
) -> None:
    stream = await publish(aredis, mode, [Message(data={"n": 0, "poison": True})])
    consumers: list[subprocess.Popen[bytes]] = []
    try:
        for round_ in range(1, MAX_DELIVERIES + 1):
            consumer = start(redis_url, mode, f"c{round_}")
            consumers.append(consumer)
            await wait_until(
                lambda n=round_: _llen(aredis, "poison-started", n),
                timeout=30,
                what=f"delivery {round_} of the poison entry",
            )
            consumer.send_signal(signal.SIGKILL)
            consumer.wait(10)
        # Behind the poison entry (in ordered mode, blocked behind it). Published only
        # now: a competing consumer killed while handling them would count them too.
        followers = [Message(data={"n": n}) for n in range(1, FOLLOWERS + 1)]
        await publish(aredis, mode, followers)
        # Delivered max_deliveries times, never acknowledged: the next consumer
        # dead-letters it instead of handing it over again.
        survivor = start(redis_url, mode, f"c{MAX_DELIVERIES + 1}")
        consumers.append(survivor)
        await wait_until(lambda: dead_letters(aredis, stream), timeout=30, what="the dead letter")
        await wait_until(
            lambda: _llen(aredis, "handled", FOLLOWERS),
            timeout=30,
            what="the entries behind the poison one",
        )
        survivor.send_signal(signal.SIGTERM)
        assert survivor.wait(15) == 0
    finally:
        for consumer in consumers:
            consumer.kill()
            consumer.wait(10)

    started = [s.decode() for s in await aredis.lrange("poison-started", 0, -1)]
    # One delivery per consumer, counted by Redis across the kills.
    assert started == [f"c{n}:{n}" for n in range(1, MAX_DELIVERIES + 1)]
    [record] = await dead_letters(aredis, stream)
    assert record[b"dlq_reason"].startswith(b"delivered 4 times without success")
    assert record[b"dlq_deliveries"] == str(MAX_DELIVERIES + 1).encode()
    assert record[b"dlq_stream"] == stream.encode()
    handled = [int(n) for n in await aredis.lrange("handled", 0, -1)]
    assert sorted(handled) == list(range(1, FOLLOWERS + 1))
    assert int((await aredis.xpending(stream, "email-service"))["pending"]) == 0


async def _llen(redis: aioredis.Redis, key: str, at_least: int) -> bool:
    return int(await redis.llen(key)) >= at_least
