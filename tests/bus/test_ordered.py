"""Ordered mode in one process on one Redis: leases, shares, stats and failures.

The lease here is 1 s (renewed every 333 ms, not the default minute) so that a rebalance
takes a fraction of a second and a lease still outlives a renewal delayed by a loaded
machine or a coverage-traced run; nothing else is shortened.
``tests/cluster/test_ordered.py`` runs the same worker on a cluster, default timings.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from orderflow.bus import Delivery, Message, StreamPublisher, WorkerConfig
from orderflow.bus.consume import ordered as ordered_module
from orderflow.bus.consume.ordered import OrderedWorker, lease_key, members_key
from orderflow.bus.partitions import PartitionedPublisher, PartitionLayout
from tests.support import wait_until

GROUP = "email-service"
LEASE_MS = 1000
LAYOUT = PartitionLayout("orders", 4)


def _config(consumer: str, **options: Any) -> WorkerConfig:
    options.setdefault("block_ms", 50)
    options.setdefault("claim_idle_ms", LEASE_MS)
    return WorkerConfig(stream=LAYOUT.names[0], group=GROUP, consumer=consumer, **options)


async def _ignore(delivery: Delivery) -> None:
    pass


@asynccontextmanager
async def running(worker: OrderedWorker) -> AsyncIterator[asyncio.Task[Any]]:
    """``worker`` running in a task, stopped (and its result awaited) on the way out."""
    task = asyncio.create_task(worker.run())
    try:
        yield task
    finally:
        worker.stop()
        await asyncio.wait_for(asyncio.shield(task), 15)


async def _publish(redis: aioredis.Redis, keys: list[int]) -> None:
    """One event per key, each to its key's partition, ``n`` numbering them in order."""
    publisher = PartitionedPublisher(redis)
    await publisher.publish_keyed(
        LAYOUT,
        [(key, Message.event("order.step", {"n": n}, source="test")) for n, key in enumerate(keys)],
    )


def _indexes(worker: OrderedWorker) -> list[int]:
    return [LAYOUT.names.index(name) for name in worker.owned]


async def _lease_holders(redis: aioredis.Redis) -> dict[str, bytes | None]:
    return {name: await redis.get(lease_key(name, GROUP)) for name in LAYOUT.names}


async def _members(redis: aioredis.Redis) -> list[bytes]:
    members: list[bytes] = await redis.zrange(members_key(LAYOUT.stream, GROUP), 0, -1)  # type: ignore[assignment]
    return members


async def _members_are(redis: aioredis.Redis, names: list[bytes]) -> bool:
    return sorted(await _members(redis)) == names


def test_an_ordered_worker_reads_one_entry_at_a_time_within_a_third_of_the_lease(
    aredis: aioredis.Redis,
) -> None:
    worker = OrderedWorker(aredis, LAYOUT, _config("w1", concurrency=8, block_ms=1000), _ignore)
    assert worker.config.stream == LAYOUT.names[0]
    assert worker.config.concurrency == 1
    assert worker.config.block_ms == LEASE_MS // 3
    assert worker.lease_ms == LEASE_MS
    assert worker.consumer == "w1"
    assert worker.owned == []
    # A short read stays as asked; a tiny lease still reads for 10 ms at least.
    assert OrderedWorker(aredis, LAYOUT, _config("w1", block_ms=50), _ignore).config.block_ms == 50
    tiny = WorkerConfig(stream="orders", group=GROUP, claim_idle_ms=15, block_ms=1000)
    assert OrderedWorker(aredis, LAYOUT, tiny, _ignore).config.block_ms == 10
    # Given the stream's own name, the config is still the first partition's.
    assert OrderedWorker(aredis, LAYOUT, tiny, _ignore).config.stream == LAYOUT.names[0]


async def test_an_ordered_worker_refuses_a_burst_run(aredis: aioredis.Redis) -> None:
    worker = OrderedWorker(aredis, LAYOUT, _config("w1"), _ignore)
    with pytest.raises(ValueError, match=r"^ordered mode has no burst run: partitions are leased$"):
        await worker.run(burst=True)


async def test_a_lone_worker_leases_every_partition_and_consumes_what_was_there_before(
    aredis: aioredis.Redis,
) -> None:
    # Published before any group exists: the groups start at the stream's beginning.
    await _publish(aredis, list(range(8)))
    seen: list[str] = []

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery.entry_id)

    worker = OrderedWorker(aredis, LAYOUT, _config("w1"), handler)
    async with running(worker) as task:
        await worker.wait_started()
        await wait_until(lambda: worker.owned == LAYOUT.names, what="every partition owned")
        assert await _lease_holders(aredis) == dict.fromkeys(LAYOUT.names, b"w1")
        for name in LAYOUT.names:
            assert 0 < await aredis.pttl(lease_key(name, GROUP)) <= LEASE_MS
        assert await _members(aredis) == [b"w1"]
        assert 0 < await aredis.pttl(members_key(LAYOUT.stream, GROUP)) <= LEASE_MS * 10
        await wait_until(lambda: len(seen) == 8, what="the 8 entries handled")
    stats = task.result()
    assert stats.handled == 8
    assert worker.stats.handled == 8
    # Stopping gave every lease up and left the membership set.
    assert await _lease_holders(aredis) == dict.fromkeys(LAYOUT.names)
    assert await _members(aredis) == []


async def test_two_workers_split_the_partitions_by_rank_and_the_survivor_takes_all_back(
    aredis: aioredis.Redis,
) -> None:
    first = OrderedWorker(aredis, LAYOUT, _config("w1"), _ignore)
    second = OrderedWorker(aredis, LAYOUT, _config("w2"), _ignore)
    async with running(first):
        await wait_until(lambda: first.owned == LAYOUT.names, what="w1 owning everything")
        async with running(second):

            def split() -> bool:
                return len(first.owned) == len(second.owned) == 2

            await wait_until(split, what="two partitions each")
            assert sorted(first.owned + second.owned) == sorted(LAYOUT.names)
            # Partition i belongs to the member i % 2: each keeps one parity.
            assert len({i % 2 for i in _indexes(first)}) == 1
            assert len({i % 2 for i in _indexes(second)}) == 1
            holders = await _lease_holders(aredis)
            assert {n for n, h in holders.items() if h == b"w1"} == set(first.owned)
            assert {n for n, h in holders.items() if h == b"w2"} == set(second.owned)
            await wait_until(lambda: _members_are(aredis, [b"w1", b"w2"]), what="2 members")
        # w2 left the set on its way out, not a lease later (w1's entry lives on).
        assert b"w2" not in await _members(aredis)
        await wait_until(lambda: _members_are(aredis, [b"w1"]), what="w1 the only member")
        await wait_until(lambda: first.owned == LAYOUT.names, what="w1 taking all back")


async def test_an_uneven_split_gives_the_first_by_name_one_more_and_leaves_none_unowned(
    aredis: aioredis.Redis,
) -> None:
    layout = PartitionLayout("orders", 3)

    def worker(name: str) -> OrderedWorker:
        config = WorkerConfig(
            stream=layout.names[0], group=GROUP, consumer=name, claim_idle_ms=LEASE_MS, block_ms=50
        )
        return OrderedWorker(aredis, layout, config, _ignore)

    # Started in the reverse of name order: rank is by name, not by who came first.
    second, first = worker("w2"), worker("w1")
    async with running(second):
        await wait_until(lambda: second.owned == layout.names, what="w2 owning everything")
        async with running(first):

            def settled() -> bool:
                return first.owned == [layout.names[0], layout.names[2]] and second.owned == [
                    layout.names[1]
                ]

            # Partition i belongs to member i % 2; w1 (rank 0) takes 3 // 2 + 1.
            await _settles(
                aredis,
                settled,
                layout,
                "w1 owning partitions 0 and 2, w2 partition 1",
                ["w1", "w2"],
            )


@pytest.mark.parametrize(
    ("others", "consumer", "expected"),
    [
        # Rank 1 of 3 on 3 partitions: a share of 1, partition 1 (1 % 3 == rank).
        (["a", "c"], "b", [1]),
        # Rank 0 of 2 on 3 partitions: a share of 2, partitions 0 and 2 (i % 2 == 0).
        (["z"], "b", [0, 2]),
    ],
)
async def test_a_worker_takes_its_share_of_its_own_partitions_and_leaves_the_rest_free(
    aredis: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
    others: list[str],
    consumer: str,
    expected: list[int],
) -> None:
    caplog.set_level(logging.INFO, logger="orderflow.bus.partition_workers")
    layout = PartitionLayout("orders", 3)
    # Members that hold nothing (as if just started), registered for a minute.
    now_ms = int(time.time() * 1000)
    await aredis.zadd(members_key(layout.stream, GROUP), dict.fromkeys(others, now_ms + 60000))
    config = WorkerConfig(
        stream=layout.names[0], group=GROUP, consumer=consumer, claim_idle_ms=LEASE_MS, block_ms=50
    )
    worker = OrderedWorker(aredis, layout, config, _ignore)
    async with running(worker):
        mine = [layout.names[i] for i in expected]
        await _settles(
            aredis, lambda: worker.owned == mine, layout, f"{consumer} owning {mine}", [consumer]
        )
        assert [await aredis.get(lease_key(n, GROUP)) for n in layout.names] == [
            consumer.encode() if n in mine else None for n in layout.names
        ]
    # Never one more, not even until its next rebalance gives it up again.
    prefix = f"worker {consumer} took partition "
    taken = [m.removeprefix(prefix) for m in caplog.messages if m.startswith(prefix)]
    assert taken == mine


async def test_three_workers_on_four_partitions_own_them_all(aredis: aioredis.Redis) -> None:
    workers = [OrderedWorker(aredis, LAYOUT, _config(f"w{i}"), _ignore) for i in range(3)]
    async with running(workers[0]), running(workers[1]), running(workers[2]):

        def settled() -> bool:
            owned = [n for w in workers for n in w.owned]
            shares = [len(w.owned) for w in workers]
            return shares == [2, 1, 1] and sorted(owned) == sorted(LAYOUT.names)

        await _settles(
            aredis, settled, LAYOUT, "2, 1 and 1 partitions, by rank", ["w0", "w1", "w2"]
        )


async def _settles(
    redis: aioredis.Redis,
    check: Callable[[], bool],
    layout: PartitionLayout,
    what: str,
    consumers: list[str],
) -> None:
    """Wait for ``check``, then see it still hold after each of ``consumers`` rebalanced
    twice more (an ownership that only passes through the state does not count)."""
    await wait_until(check, timeout=20, what=what)
    key = members_key(layout.stream, GROUP)
    for _ in range(2):
        for consumer in consumers:
            # Each rebalance registers the worker again, until a later time: a higher score.
            before = await redis.zscore(key, consumer)
            await wait_until(
                lambda c=consumer, b=before: _registered_after(redis, key, c, b),
                what=f"a rebalance of {consumer}",
            )
    assert check(), what


async def _registered_after(redis: aioredis.Redis, key: str, consumer: str, score: Any) -> bool:
    now = await redis.zscore(key, consumer)
    return now is not None and (score is None or now > score)


async def test_each_partition_is_handled_in_order_one_entry_at_a_time(
    aredis: aioredis.Redis,
) -> None:
    keys = [n % 4 for n in range(24)]
    await _publish(aredis, keys)
    in_flight: dict[str, int] = {}
    most: dict[str, int] = {}
    order: dict[str, list[int]] = {}

    async def handler(delivery: Delivery) -> None:
        stream = delivery.stream
        in_flight[stream] = in_flight.get(stream, 0) + 1
        most[stream] = max(most.get(stream, 0), in_flight[stream])
        await asyncio.sleep(0.005)  # work, so that a second lane would overlap this one
        order.setdefault(stream, []).append(delivery.message.data["n"])
        in_flight[stream] -= 1

    worker = OrderedWorker(aredis, LAYOUT, _config("w1", concurrency=8), handler)
    async with running(worker) as task:
        await wait_until(lambda: sum(map(len, order.values())) == 24, what="24 entries")
    assert task.result().handled == 24
    assert set(most.values()) == {1}
    for numbers in order.values():
        assert numbers == sorted(numbers)


async def test_the_stats_keep_what_partitions_given_up_did_and_held_counts_entries_in_hand(
    aredis: aioredis.Redis,
) -> None:
    await _publish(aredis, [0, 1, 2, 3])
    release = asyncio.Event()
    handled: list[str] = []

    async def handler(delivery: Delivery) -> None:
        if delivery.message.data["n"] >= 4:
            await release.wait()
        handled.append(delivery.entry_id)

    first = OrderedWorker(aredis, LAYOUT, _config("w1"), handler)
    second = OrderedWorker(aredis, LAYOUT, _config("w2"), handler)
    async with running(first) as first_task:
        await wait_until(lambda: first.stats.handled == 4, what="w1 handling 4")
        async with running(second):
            await wait_until(lambda: len(second.owned) == 2, what="w2 taking two partitions")
            # Two partitions were given up: what their workers did still counts.
            assert first.stats.handled == 4
            assert first.held == second.held == 0
            # One entry that waits for ``release`` in each partition.
            publisher = StreamPublisher(aredis)
            for name in LAYOUT.names:
                await publisher.publish(name, Message.event("order.step", {"n": 4}, source="t"))
            await wait_until(lambda: first.held + second.held == 4, what="4 entries in hand")
            assert first.held == second.held == 2
            release.set()
            await wait_until(lambda: len(handled) == 8, what="every entry handled")
        assert second.stats.handled == 2
    assert first_task.result().handled == 6


async def test_a_lease_lost_stops_its_partition_and_leaves_the_new_holder_alone(
    aredis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="orderflow.bus.partition_workers")
    worker = OrderedWorker(aredis, LAYOUT, _config("w1"), _ignore)
    stolen = LAYOUT.names[1]
    async with running(worker):
        await wait_until(lambda: worker.owned == LAYOUT.names, what="every partition owned")
        await aredis.set(lease_key(stolen, GROUP), "intruder", px=60_000)
        await wait_until(lambda: stolen not in worker.owned, what="the lost partition stopped")
        assert f"lease of partition {stolen} lost; stopping it" in caplog.messages
        await wait_until(
            lambda: f"worker w1 gave partition {stolen} up" in caplog.messages,
            what="its worker stopped",
        )
        assert f"worker w1 took partition {stolen}" in caplog.messages
        # The rebalances after it cannot take it back while the other holder's lease runs.
        key = members_key(LAYOUT.stream, GROUP)
        before = await aredis.zscore(key, "w1")
        await wait_until(lambda: _registered_after(aredis, key, "w1", before), what="a rebalance")
        assert stolen not in worker.owned
    assert await aredis.get(lease_key(stolen, GROUP)) == b"intruder"


class FailingScripts(aioredis.Redis):
    """A client whose Lua scripts (the membership and the leases) fail while ``failing``."""

    failing = False
    calls = 0

    async def evalsha(self, *args: Any, **kwargs: Any) -> Any:
        if self.failing:
            self.calls += 1
            raise RedisConnectionError("Connection refused (planted)")
        return await super().evalsha(*args, **kwargs)


class _LoggedAt(logging.Handler):
    """Records ``client.calls`` (failures so far) at each "cannot rebalance" warning."""

    def __init__(self, client: FailingScripts) -> None:
        super().__init__()
        self.client = client
        self.at: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "ordered worker cannot rebalance: Connection refused (planted)":
            self.at.append(self.client.calls)


async def test_rebalance_failures_are_waited_out_and_logged_first_and_every_20th_in_a_row(
    redis_url: str,
) -> None:
    client = FailingScripts.from_url(redis_url)
    assert isinstance(client, FailingScripts)
    client.failing = True
    # No lease is held while the scripts fail: a short one only makes the rounds quicker.
    worker = OrderedWorker(client, LAYOUT, _config("w1", claim_idle_ms=150), _ignore)
    logged = _LoggedAt(client)
    logger = logging.getLogger("orderflow.bus.partition_workers")
    logger.addHandler(logged)
    try:
        async with running(worker):
            # A worker that could not rebalance yet has still started.
            await asyncio.wait_for(worker.wait_started(), 10)
            await wait_until(lambda: client.calls >= 41, what="41 failed rebalances")
            assert logged.at[:3] == [1, 20, 40]
            assert worker.owned == []
            client.failing = False
            await wait_until(lambda: worker.owned == LAYOUT.names, what="partitions taken")
            # A good rebalance starts the count again: the next failure is a 1st.
            client.calls = 0
            logged.at.clear()
            client.failing = True
            await wait_until(lambda: client.calls >= 1, what="a failure after the good ones")
            assert logged.at == [1]
        # Stopping while Redis fails still ends the run.
    finally:
        logger.removeHandler(logged)
        await client.aclose()


class FailingGroups(aioredis.Redis):
    """A client whose XGROUP CREATE fails ``failures`` times (or always, with -1)."""

    failures = 0
    calls = 0

    async def xgroup_create(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.failures:
            self.failures -= 1
            raise RedisConnectionError("Connection refused (planted)")
        return await super().xgroup_create(*args, **kwargs)


async def test_creating_the_groups_is_retried_until_redis_answers(redis_url: str) -> None:
    client = FailingGroups.from_url(redis_url)
    assert isinstance(client, FailingGroups)
    client.failures = 2
    seen: list[str] = []

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery.entry_id)

    try:
        worker = OrderedWorker(client, LAYOUT, _config("w1"), handler)
        async with running(worker):
            await wait_until(lambda: worker.owned == LAYOUT.names, what="every partition owned")
            await _publish(client, [0, 1, 2, 3])
            await wait_until(lambda: len(seen) == 4, what="4 entries handled")
        assert client.failures == 0
    finally:
        await client.aclose()


async def test_a_worker_stopped_while_it_cannot_create_its_groups_raises_the_error(
    redis_url: str,
) -> None:
    client = FailingGroups.from_url(redis_url)
    assert isinstance(client, FailingGroups)
    client.failures = -1
    try:
        worker = OrderedWorker(client, LAYOUT, _config("w1"), _ignore)
        task = asyncio.create_task(worker.run())
        await wait_until(lambda: client.calls >= 2, what="a retry")
        worker.stop()
        with pytest.raises(RedisConnectionError, match="planted"):
            await asyncio.wait_for(task, 10)
    finally:
        await client.aclose()


async def test_a_partition_whose_handler_hangs_past_the_shutdown_timeout_is_cancelled(
    aredis: aioredis.Redis,
) -> None:
    await _publish(aredis, [0])
    started = asyncio.Event()

    async def hang(delivery: Delivery) -> None:
        started.set()
        await asyncio.Event().wait()

    worker = OrderedWorker(aredis, LAYOUT, _config("w1", shutdown_timeout_s=0.1), hang)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(started.wait(), 10)
    finally:
        worker.stop()
        stats = await asyncio.wait_for(task, 10)
    assert stats.handled == 0
    assert worker.owned == []
    assert await _lease_holders(aredis) == dict.fromkeys(LAYOUT.names)


async def test_a_partition_worker_that_does_not_stop_in_time_is_cancelled_and_awaited(
    aredis: aioredis.Redis,
) -> None:
    await _publish(aredis, [0])
    started = asyncio.Event()

    async def stubborn(delivery: Delivery) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            # Ignores the engine's own cancel at its shutdown deadline: the engine then
            # waits for it, and only the ordered worker's timeout ends the partition.
            await asyncio.Event().wait()

    worker = OrderedWorker(aredis, LAYOUT, _config("w1", shutdown_timeout_s=0.1), stubborn)

    async def run_then_look() -> list[str]:
        await worker.run()
        return [
            t.get_name()
            for t in asyncio.all_tasks()
            if t.get_name().startswith("orderflow-ordered-")
        ]

    task = asyncio.create_task(run_then_look())
    try:
        await asyncio.wait_for(started.wait(), 10)
        names = {t.get_name() for t in asyncio.all_tasks()}
        assert {f"orderflow-ordered-{name}" for name in LAYOUT.names} <= names
    finally:
        worker.stop()
        left = await asyncio.wait_for(task, 15)
    # Every partition's task is over (the stubborn one cancelled) when run() returns.
    assert left == []
    assert worker.owned == []


class _Waits:
    """``asyncio`` for the ordered module, recording the waits it is asked for: ``sleep``
    (the group-creation back-off) returns at once, ``wait_for`` (the pause between
    rebalances) and ``wait`` (for a partition given up) are the real ones, unless
    ``time_out`` makes ``wait`` return at once as if its timeout passed."""

    def __init__(self, *, time_out: bool = False) -> None:
        self.sleeps: list[float] = []
        self.wait_for_timeouts: list[float] = []
        self.wait_timeouts: list[float] = []
        self.time_out = time_out
        self.on_sleep: Callable[[int], None] = lambda count: None

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        self.on_sleep(len(self.sleeps))
        if len(self.sleeps) > 1000:
            raise AssertionError("retried without bound")
        await asyncio.sleep(0)

    async def wait_for(self, awaitable: Any, timeout: float) -> Any:
        self.wait_for_timeouts.append(timeout)
        return await asyncio.wait_for(awaitable, timeout)

    async def wait(self, tasks: Any, *, timeout: float) -> Any:
        self.wait_timeouts.append(timeout)
        if self.time_out:
            return set(), set(tasks)
        return await asyncio.wait(tasks, timeout=timeout)


async def test_creating_the_groups_is_tried_101_times_backing_off_up_to_1_s_then_raises(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = FailingGroups.from_url(redis_url)
    assert isinstance(client, FailingGroups)
    client.failures = -1
    waits = _Waits()
    monkeypatch.setattr(ordered_module, "asyncio", waits)
    try:
        worker = OrderedWorker(client, LAYOUT, _config("w1"), _ignore)
        with pytest.raises(RedisConnectionError, match="planted"):
            await worker.run()
    finally:
        await client.aclose()
    # 0.05 s more after each failure up to 1 s, 100 waits: the 101st failure is raised.
    assert client.calls == 101
    assert waits.sleeps == pytest.approx([min(1.0, 0.05 * n) for n in range(1, 101)])
    assert waits.sleeps[-81:] == [1.0] * 81


async def test_a_stop_while_the_groups_cannot_be_created_raises_at_the_next_failure(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = FailingGroups.from_url(redis_url)
    assert isinstance(client, FailingGroups)
    client.failures = -1
    waits = _Waits()
    monkeypatch.setattr(ordered_module, "asyncio", waits)
    try:
        worker = OrderedWorker(client, LAYOUT, _config("w1"), _ignore)
        waits.on_sleep = lambda count: worker.stop() if count == 3 else None
        with pytest.raises(RedisConnectionError, match="planted"):
            await worker.run()
    finally:
        await client.aclose()
    assert client.calls == 4
    assert waits.sleeps == pytest.approx([0.05, 0.1, 0.15])


async def test_the_rebalances_come_every_third_of_the_lease(
    aredis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    waits = _Waits()
    monkeypatch.setattr(ordered_module, "asyncio", waits)
    worker = OrderedWorker(aredis, LAYOUT, _config("w1"), _ignore)
    async with running(worker):
        await wait_until(lambda: worker.owned == LAYOUT.names, what="every partition owned")
        await wait_until(lambda: len(waits.wait_for_timeouts) >= 2, what="two rebalances")
    assert set(waits.wait_for_timeouts) == {LEASE_MS / 3000}


async def test_a_partition_given_up_gets_shutdown_plus_block_plus_1_s_then_is_cancelled_and_awaited(
    aredis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="orderflow.bus.partition_workers")
    # Every wait for a partition's worker "times out" at once: each is cancelled.
    waits = _Waits(time_out=True)
    monkeypatch.setattr(ordered_module, "asyncio", waits)
    over: dict[str, bool] = {}

    class GaveUp(logging.Handler):
        """At each "gave partition up" line: is that partition's task over by then?"""

        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("worker w1 gave partition "):
                name = str(record.args[1])
                running_names = {t.get_name() for t in asyncio.all_tasks() if not t.done()}
                over[name] = f"orderflow-ordered-{name}" not in running_names

    logger = logging.getLogger("orderflow.bus.partition_workers")
    handler = GaveUp()
    logger.addHandler(handler)
    stolen = LAYOUT.names[1]
    config = _config("w1", shutdown_timeout_s=2.0, block_ms=250)
    try:
        worker = OrderedWorker(aredis, LAYOUT, config, _ignore)
        async with running(worker):
            await wait_until(lambda: worker.owned == LAYOUT.names, what="every partition owned")
            # One given up for a lost lease (no release), the others at the stop.
            await aredis.set(lease_key(stolen, GROUP), "intruder", px=60_000)
            await wait_until(lambda: stolen in over, what="the lost partition given up")
    finally:
        logger.removeHandler(handler)
    assert over == dict.fromkeys(LAYOUT.names, True)
    assert waits.wait_timeouts == pytest.approx([2.0 + 0.25 + 1] * 4, rel=1e-9)
