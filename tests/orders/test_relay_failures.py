"""What the relay does after a failed pass: counts it, backs off (doubling, capped,
jittered) and logs only the first and every 20th failure in a row (each test kills
mutants the relay's end-to-end tests let live: see docs/MUTATION.md)."""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from redis.exceptions import ConnectionError as RedisConnectionError

from orderflow.config import Settings
from orderflow.orders import Database, OrderStore, OutboxRelay, RelayConfig
from orderflow.orders import outbox as outbox_module
from orderflow.orders import relay as relay_module


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Database]:
    db = Database(f"sqlite:///{tmp_path}/orders.db")
    db.migrate()
    yield db
    db.close()


@pytest.fixture
def jitter(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, float]]:
    """The bounds of every jitter draw; the draw itself is 0 (no wait at all)."""
    drawn: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        drawn.append((low, high))
        return 0.0

    monkeypatch.setattr(random, "uniform", uniform)
    return drawn


def _redis_errors() -> float:
    return REGISTRY.get_sample_value("orderflow_redis_errors_total", {"component": "relay"}) or 0


async def test_failures_are_counted_and_backed_off_doubling_up_to_the_cap(
    database: Database, aredis: aioredis.Redis, jitter: list[tuple[float, float]]
) -> None:
    relay = OutboxRelay(
        OrderStore(database, stream="orders"), aredis, config=RelayConfig(retry_max_s=2.0)
    )
    before = _redis_errors()
    for failures in (1, 2, 3, 10, 11, 30):
        await relay._failed(RedisConnectionError("down"), failures)
    await relay._failed(ValueError("not Redis"), 1)
    assert relay.stats.errors == 7
    assert _redis_errors() == before + 6
    assert jitter == [
        (0.05, 0.1),
        (0.1, 0.2),
        (0.2, 0.4),
        (1.0, 2.0),  # 0.05 * 2**10 = 51.2 s, capped at retry_max_s
        (1.0, 2.0),
        (1.0, 2.0),
        (0.05, 0.1),
    ]


async def test_the_exponent_stops_at_ten(
    database: Database, aredis: Any, jitter: list[tuple[float, float]]
) -> None:
    relay = OutboxRelay(
        OrderStore(database, stream="orders"), aredis, config=RelayConfig(retry_max_s=100.0)
    )
    await relay._failed(None, 10)
    await relay._failed(None, 11)
    assert jitter == [(25.6, 51.2), (25.6, 51.2)]


async def test_only_the_first_and_every_20th_failure_in_a_row_is_logged(
    database: Database,
    aredis: aioredis.Redis,
    jitter: list[tuple[float, float]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    relay = OutboxRelay(OrderStore(database, stream="orders"), aredis)
    logged_at: list[int] = []
    with caplog.at_level(logging.WARNING, logger="orderflow.orders.relay"):
        for failures in range(1, 42):
            caplog.clear()
            await relay._failed(RedisConnectionError("down"), failures)
            if caplog.records:
                logged_at.append(failures)
                (message,) = caplog.messages
                assert message.startswith("relay cannot publish (ConnectionError: down)")
        caplog.clear()
        await relay._failed(None, 1)  # a pass that failed without an exception
        assert caplog.records == []
    assert logged_at == [1, 20, 40]


async def test_the_lease_is_renewed_once_a_third_of_it_has_passed(
    database: Database,
    aredis: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = [1000.0]
    now = SimpleNamespace(time=lambda: clock[0], monotonic=lambda: clock[0])
    monkeypatch.setattr(relay_module, "time", now)
    monkeypatch.setattr(outbox_module, "time", now)
    store = OrderStore(database, stream="orders")
    asked: list[float] = []
    acquire = store.acquire_lease

    def counting(holder: str, ttl_s: float) -> bool:
        asked.append(clock[0])
        return acquire(holder, ttl_s)

    monkeypatch.setattr(store, "acquire_lease", counting)
    relay = OutboxRelay(store, aredis, config=RelayConfig(lease_ttl_s=15.0), name="a")
    with caplog.at_level(logging.INFO, logger="orderflow.orders.relay"):
        assert await relay._hold_lease()
        assert relay.is_leader
        clock[0] = 1004.9  # less than a third gone: no write
        assert await relay._hold_lease()
        clock[0] = 1005.0  # a third gone: renewed, not taken over (nothing logged)
        assert await relay._hold_lease()
        clock[0] = 1020.0  # exactly when the renewed lease ends: taken again, logged
        assert await relay._hold_lease()
    assert asked == [1000.0, 1005.0, 1020.0]
    assert caplog.messages == ["relay a holds the outbox lease"] * 2
    # Another relay holds it: this one is no leader.
    clock[0] = 1036.0
    assert store.acquire_lease("b", 15.0)
    assert not await relay._hold_lease()
    assert not relay.is_leader


def test_only_the_pubsub_transport_publishes_on_the_channel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [k for k in os.environ if k.startswith("ORDERFLOW_")]:
        monkeypatch.delenv(name)
    assert RelayConfig.from_settings(Settings(transport="streams")).channel is None
    assert RelayConfig.from_settings(Settings(transport="pubsub", channel="c")).channel == "c"
    assert RelayConfig.from_settings(Settings(), batch_size=7).batch_size == 7


async def test_a_relay_on_sqlite_runs_and_stops_cleanly(
    database: Database, aredis: aioredis.Redis
) -> None:
    relay = OutboxRelay(OrderStore(database, stream="orders"), aredis)
    task = asyncio.create_task(relay.run())
    await relay.wait_started()
    relay.stop()
    await asyncio.wait_for(task, timeout=10)  # raises what run() raised, if anything
    assert task.done()
    assert task.exception() is None


async def test_the_run_loop_counts_failures_in_a_row_and_logs_bugs_sparingly(
    database: Database,
    aredis: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    relay = OutboxRelay(OrderStore(database, stream="orders"), aredis)
    down = RedisConnectionError("down")
    # Two outage passes, a good one, then 21 passes hitting a bug, then stop.
    outcomes: list[BaseException | int] = [down, down, 1, *[RuntimeError("bug")] * 21]
    failed: list[tuple[BaseException | None, int]] = []

    async def publish_pending() -> int:
        outcome = outcomes.pop(0)
        if not outcomes:
            relay.stop()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    logged_at: list[int] = []

    async def record(exc: BaseException | None, failures: int) -> None:
        failed.append((exc, failures))
        if len(caplog.records) > len(logged_at):
            logged_at.append(failures)

    monkeypatch.setattr(relay, "publish_pending", publish_pending)
    monkeypatch.setattr(relay, "_failed", record)
    with caplog.at_level(logging.ERROR, logger="orderflow.orders.relay"):
        await asyncio.wait_for(relay.run(), timeout=10)
    assert failed == [(down, 1), (down, 2), *((None, n) for n in range(1, 22))]
    # A bug is logged with its traceback at the first and every 20th pass in a row.
    assert logged_at == [1, 20]
    assert caplog.messages == ["relay failed unexpectedly; retrying"] * 2
    assert all(r.exc_info for r in caplog.records)
