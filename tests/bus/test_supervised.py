"""SupervisedStreamWorker on one Redis: restarts, their stats and log, and stopping.

``tests/cluster/test_supervised_worker.py`` has the restart that a failover causes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from orderflow.bus import Delivery, WorkerConfig
from orderflow.bus.consume import SupervisedStreamWorker
from orderflow.bus.consume import supervised as supervised_module
from tests.support import wait_until
from tests.support.wait import TimedOutWaits

CONFIG = WorkerConfig(stream="orders", group="g", block_ms=50, claim_interval_ms=10)


class FailingClaims(aioredis.Redis):
    """A client whose next XAUTOCLAIM (the claim loop's) fails once ``fail_next`` is set;
    with ``hold``, that call waits for the event before it fails."""

    fail_next = False
    failed = 0
    hold: asyncio.Event | None = None

    async def xautoclaim(self, *args: Any, **kwargs: Any) -> Any:
        if self.fail_next:
            self.fail_next = False
            self.failed += 1
            if self.hold is not None:
                await self.hold.wait()
            raise AttributeError("planted")
        return await super().xautoclaim(*args, **kwargs)


async def _ignore(delivery: Delivery) -> None:
    pass


def _worker_errors() -> float:
    value = REGISTRY.get_sample_value("orderflow_redis_errors_total", {"component": "worker"})
    return value or 0.0


async def test_a_restarted_worker_counts_what_every_run_did_and_reports_the_failure(
    redis_url: str, aredis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    client = FailingClaims.from_url(redis_url)
    assert isinstance(client, FailingClaims)
    handled: list[str] = []

    async def handle(delivery: Delivery) -> None:
        handled.append(delivery.entry_id)

    worker = SupervisedStreamWorker(client, CONFIG, handle, restart_delay_s=0.05)
    task = asyncio.create_task(worker.run())
    try:
        await worker.wait_started()
        first = (await aredis.xadd("orders", {"data": "{}"})).decode()
        await wait_until(lambda: handled == [first], what="the first entry")
        errors = _worker_errors()
        client.fail_next = True
        await wait_until(lambda: worker.restarts == 1, what="a restart")
        assert "worker of orders failed (AttributeError: planted); starting it again" in (
            caplog.messages
        )
        assert _worker_errors() == errors + 1
        second = (await aredis.xadd("orders", {"data": "{}"})).decode()
        await wait_until(lambda: handled == [first, second], what="the second entry")
        assert worker.stats.handled == 2
        client.fail_next = True
        await wait_until(lambda: worker.restarts == 2, what="a second restart")
    finally:
        worker.stop()
        stats = await asyncio.wait_for(task, 10)
        await client.aclose()
    assert stats.handled == 2
    assert worker.restarts == 2


async def test_a_stop_during_the_restart_delay_is_for_good(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = FailingClaims.from_url(redis_url)
    assert isinstance(client, FailingClaims)
    client.fail_next = True

    async def handle(delivery: Delivery) -> None:
        pass

    worker = SupervisedStreamWorker(client, CONFIG, handle, restart_delay_s=60)
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(
            lambda: any(m.endswith("starting it again") for m in caplog.messages),
            what="the failure",
        )
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)
        await client.aclose()
    assert worker.restarts == 0


async def test_a_failure_while_stopping_ends_the_run_with_what_was_done(
    redis_url: str, aredis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    client = FailingClaims.from_url(redis_url)
    assert isinstance(client, FailingClaims)
    client.hold = asyncio.Event()
    handled: list[str] = []

    async def handle(delivery: Delivery) -> None:
        handled.append(delivery.entry_id)

    worker = SupervisedStreamWorker(client, CONFIG, handle, restart_delay_s=0.05)
    task = asyncio.create_task(worker.run())
    try:
        await worker.wait_started()
        await aredis.xadd("orders", {"data": "{}"})
        await wait_until(lambda: len(handled) == 1, what="an entry handled")
        client.fail_next = True
        await wait_until(lambda: client.failed == 1, what="a claim about to fail")
    finally:
        worker.stop()
        client.hold.set()
        stats = await asyncio.wait_for(task, 10)
        await client.aclose()
    assert "worker of orders failed while stopping: planted" in caplog.messages
    assert not any(m.endswith("starting it again") for m in caplog.messages)
    assert worker.restarts == 0
    assert stats.handled == 1


async def test_a_burst_run_returns_once_the_stream_is_drained(
    redis_url: str, aredis: aioredis.Redis
) -> None:
    for _ in range(3):
        await aredis.xadd("orders", {"data": "{}"})

    async def handle(delivery: Delivery) -> None:
        pass

    worker = SupervisedStreamWorker(aredis, CONFIG, handle)
    stats = await asyncio.wait_for(worker.run(burst=True), 10)
    assert stats.handled == 3


async def test_the_default_restart_delay_is_half_a_second(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = FailingClaims.from_url(redis_url)
    assert isinstance(client, FailingClaims)
    waits = TimedOutWaits()
    monkeypatch.setattr(supervised_module, "asyncio", waits)
    worker = SupervisedStreamWorker(client, CONFIG, _ignore)
    task = asyncio.create_task(worker.run())
    try:
        await worker.wait_started()
        client.fail_next = True
        await wait_until(lambda: worker.restarts == 1, what="a restart")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)
        await client.aclose()
    assert waits.timeouts == [0.5]
