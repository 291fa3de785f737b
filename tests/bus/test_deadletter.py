"""Dead letters and retries at their edges: the record's every field, the capped and
atomic move, claiming an entry back, and the reconnect backoff's bounds (each test kills
mutants the worker tests let live: see docs/MUTATION.md)."""

from __future__ import annotations

import asyncio
import logging
import random
from datetime import datetime, timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from orderflow.bus import (
    Delivery,
    Message,
    PermanentError,
    Retention,
    StreamPublisher,
    StreamWorker,
    WorkerConfig,
    ensure_group,
)
from orderflow.bus.consume.deadletter import (
    REASON_LIMIT,
    dead_letter_record,
    move_to_dead_letters,
)
from orderflow.bus.consume.retry import backoff_s, claim_back, reconnect_delay_s
from tests.support import wait_until

STREAM = "dl-orders"
GROUP = "g"


def test_a_record_keeps_the_fields_and_says_why_where_and_when() -> None:
    record = dead_letter_record(
        [(b"data", b"{}"), (b"dlq_reason", b"an earlier one"), ("ce_id", "e-1")],
        reason="x" * (REASON_LIMIT + 5),
        stream="orders",
        group="email",
        consumer="c-1",
        entry_id="1-0",
        deliveries=6,
    )
    at = datetime.fromisoformat(str(record.pop("dlq_time")))
    assert at.utcoffset() == timedelta(0)
    assert abs(datetime.now(at.tzinfo) - at) < timedelta(minutes=1)
    assert record == {
        b"data": b"{}",
        "ce_id": "e-1",
        "dlq_reason": "x" * REASON_LIMIT,
        "dlq_stream": "orders",
        "dlq_group": "email",
        "dlq_consumer": "c-1",
        "dlq_deliveries": "6",
        "dlq_source_id": "1-0",
    }


async def _commands(redis: aioredis.Redis) -> dict[str, int]:
    stats: dict[str, Any] = await redis.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


async def _pending_entry(redis: aioredis.Redis, consumer: str = "c") -> str:
    await ensure_group(redis, STREAM, GROUP)
    entry_id = (await redis.xadd(STREAM, {"data": "{}"})).decode()
    await redis.xreadgroup(GROUP, consumer, {STREAM: ">"})
    return entry_id


async def test_the_move_is_one_script_that_adds_then_acks(aredis: aioredis.Redis) -> None:
    entry_id = await _pending_entry(aredis)
    await aredis.config_resetstat()
    record: dict[bytes | str, bytes | str] = {"data": "{}", "dlq_reason": "why"}
    await move_to_dead_letters(aredis, STREAM, GROUP, entry_id, record, maxlen=10)
    calls = await _commands(aredis)
    # Inside the script (EVALSHA; the first time on a server also NOSCRIPT, SCRIPT LOAD).
    assert calls.get("evalsha", 0) + calls.get("eval", 0) >= 1
    assert (calls.get("xadd"), calls.get("xack"), calls.get("multi")) == (1, 1, None)
    assert (await aredis.xpending(STREAM, GROUP))["pending"] == 0
    [(_, fields)] = await aredis.xrange(f"{STREAM}:dlq")
    assert fields == {b"data": b"{}", b"dlq_reason": b"why"}


async def test_a_refused_dead_letter_leaves_the_entry_pending(aredis: aioredis.Redis) -> None:
    """An error reply to the XADD (here WRONGTYPE; OOM the same) must not be followed
    by the XACK: in a MULTI it was, and the entry was acknowledged with no dead letter."""
    entry_id = await _pending_entry(aredis)
    await aredis.set(f"{STREAM}:dlq", "not a stream")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await move_to_dead_letters(aredis, STREAM, GROUP, entry_id, {"data": "{}"}, maxlen=10)
    assert (await aredis.xpending(STREAM, GROUP))["pending"] == 1
    # Once Redis takes it, the same move goes through.
    await aredis.delete(f"{STREAM}:dlq")
    await move_to_dead_letters(aredis, STREAM, GROUP, entry_id, {"data": "{}"}, maxlen=10)
    assert (await aredis.xpending(STREAM, GROUP))["pending"] == 0
    assert await aredis.xlen(f"{STREAM}:dlq") == 1


async def test_a_dead_letter_with_no_fields_is_refused_by_name(aredis: aioredis.Redis) -> None:
    entry_id = await _pending_entry(aredis)
    with pytest.raises(ValueError, match=f"dead letter of {entry_id} has no fields"):
        await move_to_dead_letters(aredis, STREAM, GROUP, entry_id, {}, maxlen=10)
    assert (await aredis.xpending(STREAM, GROUP))["pending"] == 1


async def test_a_worker_whose_dead_letter_is_refused_keeps_the_entry_for_a_later_claim(
    aredis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the engine: a permanent failure whose dead letter Redis refuses is logged
    and stays pending; once Redis takes dead letters again, a claim moves it."""
    (entry_id,) = await StreamPublisher(aredis).publish_many(STREAM, [Message(data={})])
    await ensure_group(aredis, STREAM, GROUP)
    await aredis.set(f"{STREAM}:dlq", "not a stream")

    async def handler(delivery: Delivery) -> None:
        raise PermanentError("bad order")

    first = WorkerConfig(stream=STREAM, group=GROUP, consumer="c1", block_ms=50)
    with caplog.at_level(logging.ERROR, logger="orderflow.bus.worker"):
        stats = await StreamWorker(aredis, first, handler).run(burst=True)
    assert (stats.failed, stats.dead_lettered) == (1, 0)
    assert any(f"processing entry {entry_id}" in m for m in caplog.messages), caplog.messages
    assert (await aredis.xpending(STREAM, GROUP))["pending"] == 1

    await aredis.delete(f"{STREAM}:dlq")
    second = WorkerConfig(stream=STREAM, group=GROUP, consumer="c2", block_ms=50, claim_idle_ms=100)
    worker = StreamWorker(aredis, second, handler)
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: aredis.xlen(f"{STREAM}:dlq"), what="the dead letter")
    finally:
        worker.stop()
        await task
    assert (await aredis.xpending(STREAM, GROUP))["pending"] == 0
    [(_, fields)] = await aredis.xrange(f"{STREAM}:dlq")
    assert fields[b"dlq_source_id"] == entry_id.encode()


async def test_the_dead_letters_are_capped_in_whole_nodes(aredis: aioredis.Redis) -> None:
    entry_id = await _pending_entry(aredis)
    for _ in range(350):
        await move_to_dead_letters(aredis, STREAM, GROUP, entry_id, {"data": "{}"}, maxlen=10)
    # Approximate trimming (cheap: whole radix-tree nodes of 100 entries) keeps a
    # little more than the cap, never everything.
    assert 10 < await aredis.xlen(f"{STREAM}:dlq") < 350


async def test_claim_back_counts_a_delivery_without_a_transaction(
    aredis: aioredis.Redis,
) -> None:
    entry_id = await _pending_entry(aredis, consumer="first")
    await aredis.config_resetstat()
    claimed = await claim_back(aredis, STREAM, GROUP, "second", entry_id)
    assert claimed is not None
    fields, deliveries = claimed
    assert (fields, deliveries) == ([b"data", b"{}"], 2)
    assert "multi" not in await _commands(aredis)
    await aredis.xack(STREAM, GROUP, entry_id)
    assert await claim_back(aredis, STREAM, GROUP, "second", entry_id) is None


@pytest.mark.parametrize(
    ("attempt", "max_s", "ceiling"),
    [(0, 10.0, 0.05), (3, 10.0, 0.4), (10, 100.0, 51.2), (30, 100.0, 51.2), (30, 1.0, 1.0)],
)
def test_the_reconnect_delay_is_jittered_in_the_upper_half_of_its_ceiling(
    attempt: int, max_s: float, ceiling: float
) -> None:
    rng = random.Random(7)
    state = random.getstate()
    random.setstate(rng.getstate())
    try:
        delays = [reconnect_delay_s(attempt, max_s) for _ in range(400)]
    finally:
        random.setstate(state)
    assert ceiling / 2 <= min(delays) < ceiling * 0.55
    assert ceiling * 0.95 < max(delays) <= ceiling


@pytest.mark.parametrize(
    ("deliveries", "base_ms", "max_ms", "ceiling_s"),
    [(1, 100, 10_000, 0.1), (2, 100, 10_000, 0.2), (4, 100, 10_000, 0.8), (9, 100, 5_000, 5.0)],
)
def test_the_retry_backoff_doubles_up_to_its_cap_drawn_from_the_upper_half(
    monkeypatch: pytest.MonkeyPatch, deliveries: int, base_ms: int, max_ms: int, ceiling_s: float
) -> None:
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    assert backoff_s(deliveries, base_ms, max_ms) == pytest.approx(ceiling_s)
    monkeypatch.setattr(random, "uniform", lambda low, high: low)
    assert backoff_s(deliveries, base_ms, max_ms) == pytest.approx(ceiling_s / 2)


async def test_the_worker_caps_its_dead_letters_at_dlq_maxlen(aredis: aioredis.Redis) -> None:
    await StreamPublisher(aredis, retention=Retention(maxlen=None)).publish_many(
        STREAM, [Message(data={"n": n}) for n in range(350)]
    )

    async def handler(delivery: Delivery) -> None:
        raise PermanentError("no")

    config = WorkerConfig(stream=STREAM, group=GROUP, block_ms=50, dlq_maxlen=10)
    stats = await StreamWorker(aredis, config, handler).run(burst=True)
    assert (stats.failed, stats.dead_lettered) == (350, 350)
    # Approximately: whole nodes of 100 entries go, so a little more than 10 stays.
    assert 10 < await aredis.xlen(f"{STREAM}:dlq") < 350


async def test_a_retry_is_logged_with_its_entry_delivery_reason_and_delay(
    aredis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    (entry_id,) = await StreamPublisher(aredis).publish_many(STREAM, [Message(data={})])
    failed: list[int] = []

    async def handler(delivery: Delivery) -> None:
        if not failed:
            failed.append(1)
            raise RuntimeError("try later")

    config = WorkerConfig(
        stream=STREAM, group=GROUP, block_ms=50, retry_base_ms=20, retry_max_ms=20
    )
    with caplog.at_level(logging.INFO, logger="orderflow.bus.worker"):
        stats = await StreamWorker(aredis, config, handler).run(burst=True)
    assert (stats.retried, stats.handled) == (1, 1)
    retries = [m for m in caplog.messages if "retrying in" in m]
    # backoff drawn from 10-20 ms, printed to the centisecond
    expected = {
        f"entry {entry_id} of {STREAM} failed (delivery 1): RuntimeError: try later; "
        f"retrying in {delay}s"
        for delay in ("0.01", "0.02")
    }
    assert len(retries) == 1
    assert retries[0] in expected


async def test_claimed_idle_entries_are_logged_with_their_count_and_stream(
    aredis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    await ensure_group(aredis, STREAM, GROUP)
    await StreamPublisher(aredis).publish_many(STREAM, [Message(data={})] * 3)
    await aredis.xreadgroup(GROUP, "dead-consumer", {STREAM: ">"})
    handled: list[int] = []

    async def handler(delivery: Delivery) -> None:
        handled.append(delivery.deliveries)

    config = WorkerConfig(stream=STREAM, group=GROUP, block_ms=50, claim_idle_ms=100)
    worker = StreamWorker(aredis, config, handler)
    with caplog.at_level(logging.INFO, logger="orderflow.bus.worker"):
        task = asyncio.create_task(worker.run())
        await wait_until(lambda: len(handled) == 3, what="the claims")
        worker.stop()
        stats = await task
    assert (stats.claimed, handled) == (3, [2, 2, 2])
    assert f"claimed 3 idle entries of {STREAM}" in caplog.messages
