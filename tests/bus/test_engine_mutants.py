"""The consuming engine's limits and bookkeeping, pinned one behaviour at a time.

These tests came out of mutation testing (docs/MUTATION.md, the engine target): each pins
something the worker tests relied on without checking it, such as how many handlers run
at once, or how a worker behaves while Redis cannot be reached.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from orderflow.bus import Delivery, Message, StreamPublisher, StreamWorker, WorkerConfig
from tests.support import wait_until

STREAM = "orders"
GROUP = "email-service"


def config(**overrides: object) -> WorkerConfig:
    values: dict[str, object] = {
        "stream": STREAM,
        "group": GROUP,
        "block_ms": 50,
        "retry_base_ms": 100,
        "claim_idle_ms": 60_000,
        "max_deliveries": 3,
        "shutdown_timeout_s": 5.0,
    }
    values.update(overrides)
    return WorkerConfig(**values)  # type: ignore[arg-type]


async def publish(redis: aioredis.Redis, count: int, start: int = 0) -> list[str]:
    messages = [Message(data={"n": n}) for n in range(start, start + count)]
    return await StreamPublisher(redis).publish_many(STREAM, messages)


async def test_no_more_handlers_run_at_once_than_the_concurrency_allows(
    aredis: aioredis.Redis,
) -> None:
    running = 0
    peak = 0
    done: list[int] = []

    async def handler(delivery: Delivery) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        # Handlers that wait: every queued entry could have a lane of its own if the
        # limit let it (40 entries are read in one batch, far more than the limit).
        await asyncio.sleep(0.005)
        running -= 1
        done.append(delivery.message.data["n"])

    await publish(aredis, 40)
    stats = await StreamWorker(aredis, config(concurrency=3), handler).run(burst=True)
    assert sorted(done) == list(range(40))
    assert stats.handled == 40
    assert peak == 3  # the limit reached, never passed


def _closed_port() -> int:
    # A port nothing listens on: every connection to it is refused at once.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _redis_errors() -> float:
    return REGISTRY.get_sample_value("orderflow_redis_errors_total", {"component": "worker"}) or 0


async def test_a_worker_started_without_redis_keeps_trying_logs_sparingly_and_stops_on_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="orderflow.bus.worker")
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{_closed_port()}")
    errors_before = _redis_errors()
    # A short reconnect ceiling, so forty failures in a row take a second at most.
    worker = StreamWorker(client, config(reconnect_max_s=0.02), _never_called)
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: worker.stats.redis_errors >= 41, what="41 failed attempts")
        worker.stop()
        # Stopped while Redis is away: run() returns (it does not wait for Redis).
        await asyncio.wait_for(task, 5)
    finally:
        task.cancel()
        await client.aclose()
    failures = worker.stats.redis_errors
    lines = [r.getMessage() for r in caplog.records if "Redis unavailable" in r.getMessage()]
    # Logged at the first failure and every 20th: 1, 20, 40, ...
    assert len(lines) == 1 + failures // 20, (failures, lines)
    assert lines[0].startswith("Redis unavailable (group: Error 111 connecting to")
    assert "; retrying in 0.0" in lines[0]
    assert _redis_errors() - errors_before == failures  # each failure counted in Prometheus
    assert worker.stats.handled == 0


async def _never_called(delivery: Delivery) -> None:
    raise AssertionError("no entry can be read without Redis")
