"""The consumer-group worker against a real Redis: retries, dead letters, claims, stops."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from orderflow.bus import (
    Delivery,
    Message,
    PermanentError,
    StreamPublisher,
    StreamWorker,
    WorkerConfig,
    ensure_group,
)
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


async def pending_count(redis: aioredis.Redis) -> int:
    return int((await redis.xpending(STREAM, GROUP))["pending"])


async def test_a_group_deleted_while_an_entry_waits_for_its_retry_is_recreated(
    aredis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    failed_once = asyncio.Event()
    release = asyncio.Event()
    handled: list[int] = []

    async def handler(delivery: Delivery) -> None:
        n = delivery.message.data["n"]
        if n == 0 and not failed_once.is_set():
            failed_once.set()
            raise RuntimeError("try later")
        if n == 1:
            await release.wait()
        handled.append(n)

    # Room for two entries: entry 0 waiting for its retry and entry 1 in its handler
    # fill it, so the read loop stops reading (and cannot re-create the group first).
    # The retry comes 1.5 to 3 s later: the group is gone by then even on a busy machine
    # (with 250 to 500 ms, a retry before the XGROUP DESTROY was seen under load).
    cfg = config(concurrency=1, batch_size=1, retry_base_ms=3000, retry_max_ms=3000)
    worker = StreamWorker(aredis, cfg, handler)
    task = asyncio.create_task(worker.run())
    await publish(aredis, 2)
    await failed_once.wait()
    await wait_until(lambda: worker.held >= 2, what="both entries held")
    # The operator deletes the group while entry 0 waits for its retry.
    await aredis.xgroup_destroy(STREAM, GROUP)
    await wait_until(lambda: "vanished before entry" in caplog.text, what="retry saw NOGROUP")
    release.set()
    # The read loop creates the group again from the start: entry 0 is read again.
    await wait_until(lambda: 0 in handled, what="entry 0 handled after the group came back")
    await wait_until(lambda: _pending_is_zero(aredis), what="nothing pending")
    worker.stop()
    await task
    assert "Task exception was never retrieved" not in caplog.text


async def _pending_is_zero(redis: aioredis.Redis) -> bool:
    return await pending_count(redis) == 0


async def test_a_handler_failing_twice_is_retried_with_backoff_without_holding_up_others(
    aredis: aioredis.Redis,
) -> None:
    finished: dict[int, float] = {}
    attempts: list[tuple[int, int, float]] = []

    async def handler(delivery: Delivery) -> None:
        n = delivery.message.data["n"]
        attempts.append((n, delivery.deliveries, time.monotonic()))
        if n == 0 and delivery.deliveries < 3:
            raise RuntimeError("SMTP said 451, try later")
        finished[n] = time.monotonic()

    worker = StreamWorker(aredis, config(), handler)
    task = asyncio.create_task(worker.run())
    await publish(aredis, 50)
    await wait_until(lambda: len(finished) == 50, what="all 50 handled")
    worker.stop()
    stats = await task

    tries_of_0 = [(d, t) for n, d, t in attempts if n == 0]
    assert [d for d, _ in tries_of_0] == [1, 2, 3]  # Redis's delivery count, per attempt
    gaps = [b - a for (_, a), (_, b) in itertools.pairwise(tries_of_0)]
    assert gaps[0] >= 0.05  # backoff: at least half of the 100 ms base
    assert gaps[1] >= 0.1  # and it grows: at least half of 200 ms
    assert max(t for n, t in finished.items() if n != 0) < finished[0]  # others not delayed
    assert stats.retried == 2
    assert stats.handled == 50
    assert await pending_count(aredis) == 0


async def test_a_poison_entry_is_dead_lettered_with_its_reason_and_the_flow_goes_on(
    aredis: aioredis.Redis,
) -> None:
    handled: list[int] = []

    async def handler(delivery: Delivery) -> None:
        if delivery.message.data["n"] == 1:
            raise ValueError("cannot render order 1")
        handled.append(delivery.message.data["n"])

    worker = StreamWorker(aredis, config(retry_base_ms=10), handler)
    task = asyncio.create_task(worker.run())
    ids = await publish(aredis, 3)
    await wait_until(lambda: aredis.xlen(f"{STREAM}:dlq"), what="a dead letter")
    await publish(aredis, 1, start=3)
    await wait_until(lambda: 3 in handled, what="the entry after the poison one")
    worker.stop()
    await task

    [(_dlq_id, fields)] = await aredis.xrange(f"{STREAM}:dlq")
    assert fields[b"dlq_reason"] == b"ValueError: cannot render order 1"
    assert fields[b"dlq_deliveries"] == b"3"
    assert fields[b"dlq_source_id"] == ids[1].encode()
    assert fields[b"dlq_group"] == GROUP.encode()
    assert fields[b"dlq_stream"] == STREAM.encode()
    assert fields[b"data"] == b'{"n":1}'  # the original fields, untouched
    assert sorted(handled) == [0, 2, 3]
    assert await pending_count(aredis) == 0


async def test_permanent_errors_and_malformed_entries_are_dead_lettered_at_once(
    aredis: aioredis.Redis,
) -> None:
    calls: list[int] = []

    async def handler(delivery: Delivery) -> None:
        calls.append(delivery.message.data["n"])
        raise PermanentError("mailbox does not exist")

    await aredis.xadd(STREAM, {"data": b"{not json"})
    await aredis.xadd(STREAM, {"no-data": b"1"})
    await aredis.xadd(STREAM, {"data": b"\x00\xff\xfe binary junk"})
    await publish(aredis, 1)
    stats = await StreamWorker(aredis, config(), handler).run(burst=True)

    dead: list[Any] = list(await aredis.xrange(f"{STREAM}:dlq") or [])
    dead.sort(key=lambda e: e[1][b"dlq_source_id"])
    reasons = [fields[b"dlq_reason"].decode() for _, fields in dead]
    assert reasons[0].startswith("malformed entry: data is not valid UTF-8 JSON")
    assert reasons[1] == "malformed entry: entry has no 'data' field"
    assert reasons[2].startswith("malformed entry: data is not valid UTF-8 JSON")
    assert reasons[3] == "permanent failure: mailbox does not exist"
    assert all(fields[b"dlq_deliveries"] == b"1" for _, fields in dead)
    assert dead[2][1][b"data"] == b"\x00\xff\xfe binary junk"
    assert calls == [0]
    assert stats.dead_lettered == 4
    assert await pending_count(aredis) == 0


def sample(name: str, group: str) -> float:
    return REGISTRY.get_sample_value(name, {"stream": STREAM, "group": group}) or 0.0


async def test_deliveries_and_handler_times_reach_prometheus(aredis: aioredis.Redis) -> None:
    # The worker counts per delivery itself and adds to Prometheus in bulk: every
    # delivery, failed ones too, must be there once the worker stopped.
    # A group of this run's own: the counters are process-wide and outlive a test run
    # (a second run in one process, as a mutation tester does, must start at zero).
    group = f"metrics-check-{uuid.uuid4().hex[:8]}"
    await publish(aredis, 30)

    async def handler(delivery: Delivery) -> None:
        if delivery.message.data["n"] % 10 == 0:
            raise PermanentError("no")
        await asyncio.sleep(0.002)  # a handler time the metrics below must show

    stats = await StreamWorker(aredis, config(group=group), handler).run(burst=True)
    assert (stats.handled, stats.dead_lettered, stats.acked) == (27, 3, 27)
    assert sample("orderflow_consumed_total", group) == 30
    assert sample("orderflow_acked_total", group) == 27
    assert sample("orderflow_handler_seconds_count", group) == 30
    # 27 handlers slept 2 ms each (the event loop may wake a sleeper up to its clock
    # resolution early, hence the margin); the 3 that raised took next to nothing.
    assert 27 * 0.0015 <= sample("orderflow_handler_seconds_sum", group) < 30
    # 27 handlers slept 2 ms: none is in a bucket below 1 ms.
    assert sample_le("orderflow_handler_seconds_bucket", group, "0.001") <= 3
    assert sample_le("orderflow_handler_seconds_bucket", group, "+Inf") == 30


def sample_le(name: str, group: str, le: str) -> float:
    labels = {"stream": STREAM, "group": group, "le": le}
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize(
    "options",
    [{"protocol": 3}, {"single_connection_client": True}],
    ids=["resp3", "single-connection"],
)
async def test_the_worker_reads_on_any_client_redis_py_offers(
    redis_url: str, aredis: aioredis.Redis, options: dict[str, Any]
) -> None:
    # The worker reads XREADGROUP's reply raw on a pooled client (RESP2 or RESP3 shapes),
    # and through redis-py's own commands on a client bound to one connection.
    await publish(aredis, 5)
    await aredis.xadd(STREAM, {"data": b"{not json"})
    client = aioredis.Redis.from_url(redis_url, **options)
    seen: list[int] = []

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery.message.data["n"])

    try:
        stats = await StreamWorker(client, config(), handler).run(burst=True)
    finally:
        await client.aclose()
    assert sorted(seen) == [0, 1, 2, 3, 4]
    assert (stats.acked, stats.dead_lettered) == (5, 1)
    assert await pending_count(aredis) == 0


async def test_graceful_stop_leaves_no_finished_entry_unacknowledged(
    aredis: aioredis.Redis,
) -> None:
    finished: list[str] = []
    started = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        started.set()
        await asyncio.sleep(0.02)  # work that takes time, so the stop finds some unfinished
        finished.append(delivery.entry_id)

    await publish(aredis, 500)
    worker = StreamWorker(aredis, config(concurrency=8), handler)
    task = asyncio.create_task(worker.run())
    await started.wait()
    await wait_until(lambda: len(finished) >= 50, what="some progress")
    worker.stop()
    stats = await task

    pending = await aredis.xpending_range(STREAM, GROUP, "-", "+", 1000)
    pending_ids = {row["message_id"].decode() for row in pending}
    assert not pending_ids & set(finished)
    assert stats.acked == len(finished)
    assert 50 <= len(finished) < 500
    # What was read but not started is left pending for other consumers, not lost.
    assert len(pending_ids) + len(finished) <= 500


async def test_graceful_stop_gives_up_on_a_hung_handler_after_the_deadline(
    aredis: aioredis.Redis,
) -> None:
    running = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        running.set()
        await asyncio.Event().wait()  # hangs forever

    await publish(aredis, 1)
    worker = StreamWorker(aredis, config(shutdown_timeout_s=0.2), handler)
    task = asyncio.create_task(worker.run())
    await running.wait()
    worker.stop()
    await asyncio.wait_for(task, 5)
    assert await pending_count(aredis) == 1  # still there for another consumer


async def test_entries_of_a_dead_consumer_are_claimed_and_counted(aredis: aioredis.Redis) -> None:
    await ensure_group(aredis, STREAM, GROUP)
    ids = await publish(aredis, 5)
    # A consumer reads the entries and dies without acknowledging them.
    await aredis.xreadgroup(GROUP, "dead-consumer", {STREAM: ">"}, count=5)
    seen: list[tuple[str, int]] = []

    async def handler(delivery: Delivery) -> None:
        seen.append((delivery.entry_id, delivery.deliveries))

    worker = StreamWorker(aredis, config(claim_idle_ms=200), handler)
    task = asyncio.create_task(worker.run())
    await wait_until(lambda: len(seen) == 5, what="the claims")
    worker.stop()
    stats = await task
    assert sorted(seen) == sorted((i, 2) for i in ids)
    assert stats.claimed == 5
    assert await pending_count(aredis) == 0


async def test_a_long_handler_keeps_its_entry_while_its_worker_lives(
    aredis: aioredis.Redis,
) -> None:
    runs: list[str] = []

    async def slow(delivery: Delivery) -> None:
        runs.append(f"slow:{delivery.deliveries}")
        await asyncio.sleep(1.2)  # under test: a handler running four claim timeouts

    async def thief(delivery: Delivery) -> None:
        runs.append("thief")

    await publish(aredis, 1)
    owner = StreamWorker(aredis, config(claim_idle_ms=300, consumer="owner"), slow)
    owner_task = asyncio.create_task(owner.run())
    await wait_until(lambda: runs == ["slow:1"], what="the slow handler")
    other = StreamWorker(aredis, config(claim_idle_ms=300, consumer="other"), thief)
    other_task = asyncio.create_task(other.run())
    await wait_until(lambda: owner.stats.handled == 1, timeout=5, what="the slow handler")
    other.stop()
    owner.stop()
    await asyncio.gather(owner_task, other_task)
    assert runs == ["slow:1"]
    assert other.stats.claimed == 0


async def test_retries_survive_in_redis_counts_and_another_worker_finishes_them(
    aredis: aioredis.Redis,
) -> None:
    deliveries: list[int] = []

    async def failing(delivery: Delivery) -> None:
        deliveries.append(delivery.deliveries)
        raise RuntimeError("down")

    await publish(aredis, 1)
    first = StreamWorker(aredis, config(retry_base_ms=10_000, max_deliveries=5), failing)
    task = asyncio.create_task(first.run())
    await wait_until(lambda: deliveries == [1], what="the first failure")
    first.stop()  # stops while the retry waits: the entry stays pending
    await task
    assert await pending_count(aredis) == 1

    async def working(delivery: Delivery) -> None:
        deliveries.append(delivery.deliveries)

    second = StreamWorker(aredis, config(claim_idle_ms=100, max_deliveries=5), working)
    task = asyncio.create_task(second.run())
    await wait_until(lambda: len(deliveries) == 2, what="the claim")
    second.stop()
    await task
    assert deliveries == [1, 2]
    assert await pending_count(aredis) == 0


async def test_the_group_is_recreated_when_redis_lost_it(aredis: aioredis.Redis) -> None:
    handled: list[int] = []

    async def handler(delivery: Delivery) -> None:
        handled.append(delivery.message.data["n"])

    worker = StreamWorker(aredis, config(), handler)
    task = asyncio.create_task(worker.run())
    await publish(aredis, 1)
    await wait_until(lambda: handled == [0], what="first entry")
    await aredis.delete(STREAM)  # as after a restart without persistence
    await wait_until(lambda: aredis.exists(STREAM), what="the group to be recreated")
    await publish(aredis, 1, start=1)
    await wait_until(lambda: handled == [0, 1], what="the entry after the loss")
    worker.stop()
    await task


async def test_the_start_id_defaults_to_the_beginning(aredis: aioredis.Redis) -> None:
    await publish(aredis, 3)  # before any consumer group exists
    seen: list[int] = []

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery.message.data["n"])

    await StreamWorker(aredis, config(), handler).run(burst=True)
    assert seen == [0, 1, 2]


async def test_entries_deleted_while_pending_are_cleared(aredis: aioredis.Redis) -> None:
    await ensure_group(aredis, STREAM, GROUP)
    ids = await publish(aredis, 2)
    await aredis.xreadgroup(GROUP, "dead-consumer", {STREAM: ">"}, count=2)
    await aredis.xdel(STREAM, ids[0])
    seen: list[str] = []

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery.entry_id)

    worker = StreamWorker(aredis, config(claim_idle_ms=100), handler)
    task = asyncio.create_task(worker.run())
    await wait_until(lambda: seen == [ids[1]], what="the surviving entry")
    await wait_until(lambda: _pending_is_empty(aredis), what="the deleted entry to leave the PEL")
    worker.stop()
    await task


async def _pending_is_empty(redis: aioredis.Redis) -> bool:
    return await pending_count(redis) == 0


async def test_idle_consumers_with_nothing_pending_are_removed(
    aredis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="orderflow.bus.worker")
    await ensure_group(aredis, STREAM, GROUP)
    await publish(aredis, 1)
    await aredis.xreadgroup(GROUP, "idle-with-pending", {STREAM: ">"}, count=1)
    # Made explicitly: an XREADGROUP that reads nothing creates no consumer (Redis 7),
    # and this test once waited for the removal of a consumer that never existed.
    assert await aredis.xgroup_createconsumer(STREAM, GROUP, "idle-empty") == 1

    handled: list[str] = []

    async def handler(delivery: Delivery) -> None:
        handled.append(delivery.entry_id)  # checked below: a raise here would be retried

    worker = StreamWorker(aredis, config(claim_idle_ms=100_000, prune_idle_ms=100_000), handler)
    # Make the prune threshold reachable without waiting: consumers idle > 0 ms qualify.
    object.__setattr__(worker.config, "prune_idle_ms", 1)
    task = asyncio.create_task(worker.run())

    async def names() -> set[str]:
        return {c["name"].decode() for c in await aredis.xinfo_consumers(STREAM, GROUP)}

    assert await names() >= {"idle-empty", "idle-with-pending"}
    await wait_until(
        lambda: _lacks(names, "idle-empty"), timeout=5, what="the idle consumer removed"
    )
    worker.stop()
    await task
    assert "idle-with-pending" in await names()
    # The whole line, naming the consumer as Redis has it.
    assert "removed idle consumers ['idle-empty']" in [r.getMessage() for r in caplog.records]
    assert handled == []  # the one entry stays the idle consumer's: nothing to claim


async def _lacks(names: object, name: str) -> bool:
    return name not in await names()  # type: ignore[operator]


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"concurrency": 0}, "concurrency must be a positive integer"),
        ({"max_deliveries": 0}, "max_deliveries must be a positive integer"),
        ({"group": ""}, "group must be non-empty"),
        ({"consumer": "a b"}, "consumer must be non-empty without spaces"),
        ({"stream": ""}, "stream name"),
        ({"shutdown_timeout_s": -1}, r"^WorkerConfig\.shutdown_timeout_s must not be negative$"),
        (
            {"prune_idle_ms": 10, "claim_idle_ms": 1000},
            r"^WorkerConfig\.prune_idle_ms must be at least claim_idle_ms$",
        ),
        (
            {"retry_base_ms": 500, "retry_max_ms": 100},
            r"retry_max_ms \(100\) must be at least retry_base_ms \(500\): the longest "
            "retry delay cannot be shorter than the first",
        ),
        ({"batch_size": 0}, r"WorkerConfig\.batch_size must be a positive integer, got 0"),
        ({"block_ms": 0}, r"WorkerConfig\.block_ms must be a positive integer"),
        ({"claim_idle_ms": 0}, r"WorkerConfig\.claim_idle_ms must be a positive integer"),
        ({"retry_base_ms": 0}, r"WorkerConfig\.retry_base_ms must be a positive integer"),
        ({"retry_max_ms": 0}, r"WorkerConfig\.retry_max_ms must be a positive integer"),
        ({"dlq_maxlen": 0}, r"WorkerConfig\.dlq_maxlen must be a positive integer"),
        ({"claim_interval_ms": 0}, r"^WorkerConfig\.claim_interval_ms must be positive$"),
    ],
)
def test_bad_worker_configuration_is_refused_by_name(
    overrides: dict[str, object], error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        config(**overrides)


def test_the_smallest_settings_are_accepted() -> None:
    # One of each, the smallest allowed: the bounds above are "at least 1", not more.
    cfg = config(
        concurrency=1,
        batch_size=1,
        block_ms=1,
        claim_idle_ms=1,
        claim_interval_ms=1,
        retry_base_ms=1,
        retry_max_ms=1,
        dlq_maxlen=1,
        max_deliveries=1,
        shutdown_timeout_s=0,
        prune_idle_ms=1,
    )
    assert cfg.claim_interval_s == 0.001


async def test_consumer_names_are_unique() -> None:
    names = {config().consumer for _ in range(100)}
    assert len(names) == 100


async def test_an_entry_taken_over_by_another_consumer_is_given_up_by_the_heartbeat(
    aredis: aioredis.Redis,
) -> None:
    failed = asyncio.Event()

    async def failing(delivery: Delivery) -> None:
        failed.set()
        raise RuntimeError("down")

    ids = await publish(aredis, 1)
    worker = StreamWorker(aredis, config(claim_idle_ms=300, retry_base_ms=60_000), failing)
    task = asyncio.create_task(worker.run())
    await failed.wait()
    assert worker.held == 1  # waiting for its retry
    # Another consumer takes the entry over, as it would after a long pause of this one.
    await aredis.xclaim(STREAM, GROUP, "other", 0, list[Any](ids))
    await wait_until(lambda: worker.held == 0, timeout=5, what="the retry to be given up")
    worker.stop()
    await task
    [row] = await aredis.xpending_range(STREAM, GROUP, "-", "+", 10)
    assert row["consumer"] == b"other"  # never stolen back


async def test_the_heartbeat_keeps_entries_waiting_for_a_retry_from_being_claimed(
    aredis: aioredis.Redis,
) -> None:
    failed = asyncio.Event()

    async def failing(delivery: Delivery) -> None:
        failed.set()
        raise RuntimeError("down")

    stolen: list[str] = []

    async def thief(delivery: Delivery) -> None:
        stolen.append(delivery.entry_id)  # recorded: an assert here would only be retried

    await publish(aredis, 1)
    owner = StreamWorker(
        aredis, config(claim_idle_ms=200, retry_base_ms=60_000, consumer="owner"), failing
    )
    owner_task = asyncio.create_task(owner.run())
    await failed.wait()
    other = StreamWorker(aredis, config(claim_idle_ms=200, consumer="other"), thief)
    other_task = asyncio.create_task(other.run())
    # The time is what is under test: four claim timeouts pass, with the other consumer
    # looking every 50 ms, and the entry stays the owner's all along.
    until = time.monotonic() + 0.8
    while time.monotonic() < until:
        rows = await aredis.xpending_range(STREAM, GROUP, "-", "+", 10)
        assert [row["consumer"] for row in rows] == [b"owner"], stolen
        await asyncio.sleep(0.05)
    other.stop()
    owner.stop()
    await asyncio.gather(owner_task, other_task)
    rows = await aredis.xpending_range(STREAM, GROUP, "-", "+", 10)
    # Refreshed by XCLAIM JUSTID only: a claim by the other would have counted one more.
    assert [(row["consumer"], row["times_delivered"]) for row in rows] == [(b"owner", 1)]
    assert stolen == []
    assert other.stats.claimed == 0
