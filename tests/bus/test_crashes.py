"""Crashes: a consumer SIGKILLed mid-batch, Redis SIGKILLed and restarted mid-run."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from orderflow.bus import Delivery, Message, StreamPublisher, StreamWorker, WorkerConfig, connect
from orderflow.embedded.redis_server import RedisServer
from tests.support import wait_until

pytestmark = pytest.mark.chaos

CONSUMER = Path(__file__).with_name("consumer_proc.py")


def start_consumer(
    url: str, name: str, claim_idle_ms: int, seconds: float
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(CONSUMER), url, name, str(claim_idle_ms), str(seconds)],
        stdout=subprocess.DEVNULL,
    )


async def test_a_consumer_killed_mid_batch_is_finished_by_another(
    redis_url: str, aredis: aioredis.Redis
) -> None:
    total = 300
    await StreamPublisher(aredis).publish_many(
        "orders", [Message(data={"n": n}) for n in range(total)]
    )
    victim = start_consumer(redis_url, "victim", 60_000, 0.05)
    try:
        await wait_until(lambda: aredis.llen("finished"), timeout=20, what="the victim's progress")
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
    finally:
        victim.kill()
    killed_with_pending = int((await aredis.xpending("orders", "email-service"))["pending"])
    assert killed_with_pending > 0  # it died holding entries mid-batch

    survivor = start_consumer(redis_url, "survivor", 300, 0.0)
    try:
        await wait_until(
            lambda: _all_finished(aredis, total), timeout=30, what="every entry finished"
        )
        await wait_until(
            lambda: _nothing_pending(aredis), timeout=10, what="every entry acknowledged"
        )
    finally:
        survivor.send_signal(signal.SIGTERM)
        assert survivor.wait(15) == 0
    finished = [int(n) for n in await aredis.lrange("finished", 0, -1)]
    assert set(finished) == set(range(total))  # each handled to completion
    # Redeliveries only for what the victim held when it died.
    assert len(finished) - total <= killed_with_pending


async def _all_finished(redis: aioredis.Redis, total: int) -> bool:
    return len(set(await redis.lrange("finished", 0, -1))) == total


async def _nothing_pending(redis: aioredis.Redis) -> bool:
    return int((await redis.xpending("orders", "email-service"))["pending"]) == 0


async def test_redis_killed_and_restarted_mid_run_loses_nothing(
    redis_server: RedisServer,
) -> None:
    redis = connect(redis_server.url, socket_timeout=2)
    handled: set[int] = set()

    async def handler(delivery: Delivery) -> None:
        handled.add(int(delivery.message.data["n"]))

    config = WorkerConfig(
        stream="orders",
        group="email-service",
        block_ms=100,
        claim_idle_ms=500,
        reconnect_max_s=0.5,
        max_deliveries=20,
    )
    worker = StreamWorker(redis, config, handler)
    task = asyncio.create_task(worker.run())
    publisher = StreamPublisher(redis)
    accepted: list[int] = []

    async def produce(start: int, count: int) -> None:
        for n in range(start, start + count):
            while True:
                try:
                    await publisher.publish("orders", Message(data={"n": n}))
                    break
                except (RedisConnectionError, OSError):
                    await asyncio.sleep(0.05)  # a producer's retry pause while Redis is down
            accepted.append(n)

    await produce(0, 300)
    await wait_until(lambda: len(handled) > 100, what="some handled")
    redis_server.kill()
    restarter = asyncio.get_running_loop().run_in_executor(None, redis_server.start)
    await produce(300, 300)  # the publisher retries until Redis is back
    await restarter
    await wait_until(lambda: handled >= set(accepted), timeout=30, what="every accepted entry")
    worker.stop()
    stats = await task
    await redis.aclose()
    assert handled == set(range(600))
    assert stats.redis_errors > 0  # it did see Redis go away
