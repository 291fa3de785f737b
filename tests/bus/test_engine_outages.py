"""Each of the engine's loops on its own against a Redis that fails its commands.

Stopping Redis fails every loop of a worker at once, so no test could tell which loop
counted a failure, logged it or started its count again. Here the worker talks to Redis
through a proxy (tests/support/cutter.py) that cuts only the connections carrying one
command (XREADGROUP for the reader, XAUTOCLAIM for the claim loop, XACK for the ack
loop, the prune script's EVALSHA for the prune loop): that loop meets an outage, the
others go on. These tests came out of mutation testing (docs/MUTATION.md, engine).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from orderflow.bus import Delivery, Message, StreamPublisher, WorkerConfig
from orderflow.bus.consume.engine import Engine
from orderflow.bus.consume.policy import COMPETING, Policy
from tests.support import wait_until
from tests.support.cutter import CommandCutter

STREAM = "orders"
GROUP = "email-service"
LOGGER = "orderflow.bus.worker"

#: Reads and retries aside, never claims: the tests of the other loops want the claim
#: loop's commands out of the way.
NO_CLAIMS = Policy(claim_idle=False)


def config(**overrides: object) -> WorkerConfig:
    values: dict[str, object] = {
        "stream": STREAM,
        "group": GROUP,
        "block_ms": 50,
        "claim_idle_ms": 60_000,
        # A short ceiling: forty failures in a row take a second at most.
        "reconnect_max_s": 0.02,
        "shutdown_timeout_s": 5.0,
    }
    values.update(overrides)
    return WorkerConfig(**values)  # type: ignore[arg-type]


@pytest.fixture
async def cutter(redis_url: str) -> AsyncIterator[CommandCutter]:
    """A proxy to the shared (emptied) server that cuts the commands a test names."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    async with CommandCutter(port) as proxy:
        yield proxy


class DownLines(logging.Handler):
    """Each "Redis unavailable" line of the worker, as written: what failed, and the
    worker's count of Redis errors at that moment."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(logging.WARNING)
        self.engine = engine
        self.seen: list[tuple[str, int]] = []
        #: The error each line names.
        self.errors: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        found = re.fullmatch(r"Redis unavailable \((.+): (.*)\); retrying in \d+\.\d\ds", line)
        if found:
            self.seen.append((found[1], self.engine.stats.redis_errors))
            self.errors.add(found[2])

    def __enter__(self) -> DownLines:
        logging.getLogger(LOGGER).addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger(LOGGER).removeHandler(self)


async def publish(redis: aioredis.Redis, count: int, start: int = 0) -> list[str]:
    messages = [Message(data={"n": n}) for n in range(start, start + count)]
    return await StreamPublisher(redis).publish_many(STREAM, messages)


async def _one_outage_after_another(
    cutter: CommandCutter, command: bytes, engine: Engine, lines: DownLines, what: str
) -> int:
    """Cut ``command`` until the engine counted 41 failures, then heal; returns the
    count of errors at the heal. Checks the lines: at failures 1, 20 and 40 only."""
    cutter.cut = {command}
    await wait_until(lambda: engine.stats.redis_errors >= 41, what=f"41 failed {what}s")
    cutter.cut = set()
    # Each failure counted once (a command cut may still be on its way back).
    await wait_until(
        lambda: engine.stats.redis_errors == cutter.cuts[command], what="each cut counted"
    )
    # All by this loop, logged at the 1st and every 20th.
    assert lines.seen == [(what, 1), (what, 20), (what, 40)], lines.seen
    assert lines.errors == {"Connection closed by server."}
    return engine.stats.redis_errors


async def _next_outage_logs_at_once(
    cutter: CommandCutter,
    command: bytes,
    engine: Engine,
    lines: DownLines,
    what: str,
    trigger: Callable[[], Awaitable[object]] | None = None,
) -> None:
    """Cut ``command`` again after a success (then ``trigger`` the loop): the first
    failure of the new outage is logged, as the first of the last one was."""
    healed_at = engine.stats.redis_errors
    assert (healed_at + 1) % 20 != 0  # else the line would come anyway
    cutter.cut = {command}
    if trigger is not None:
        await trigger()
    await wait_until(lambda: len(lines.seen) == 4, what="the next outage's first line")
    cutter.cut = set()
    assert lines.seen[3] == (what, healed_at + 1)


async def test_a_reader_cut_off_counts_its_failures_in_a_row_and_starts_again_after_a_read(
    aredis: aioredis.Redis, cutter: CommandCutter
) -> None:
    seen: list[int] = []

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery.message.data["n"])

    redis = cutter.client()
    engine = Engine(redis, config(), handler, NO_CLAIMS)
    with DownLines(engine) as lines:
        task = asyncio.create_task(engine.run())
        try:
            await engine.wait_started()
            await _one_outage_after_another(cutter, b"XREADGROUP", engine, lines, "read")
            await publish(aredis, 1)
            await wait_until(lambda: seen == [0], what="the entry read once Redis answers")
            await _next_outage_logs_at_once(cutter, b"XREADGROUP", engine, lines, "read")
            await publish(aredis, 1, start=1)
            await wait_until(lambda: engine.stats.acked == 2, what="both acknowledged")
            engine.stop()
            stats = await asyncio.wait_for(task, 10)
        finally:
            task.cancel()
            await redis.aclose()
    assert seen == [0, 1]
    # Each cut counted once (the second outage may fail a read or two more before it
    # heals: the line is logged at its first).
    assert stats.redis_errors == cutter.cuts[b"XREADGROUP"]


async def test_a_claim_loop_cut_off_counts_its_failures_in_a_row_and_starts_again_after_a_claim(
    aredis: aioredis.Redis, cutter: CommandCutter
) -> None:
    # An entry another consumer left idle for a minute: the claim loop's to take.
    await aredis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    [left] = await publish(aredis, 1)
    await aredis.xreadgroup(GROUP, "gone", {STREAM: ">"})
    seen: list[tuple[str, int]] = []

    async def handler(delivery: Delivery) -> None:
        seen.append((delivery.entry_id, delivery.deliveries))

    redis = cutter.client()
    engine = Engine(redis, config(claim_idle_ms=50, claim_interval_ms=20), handler, COMPETING)
    with DownLines(engine) as lines:
        # Cut from the start: the entry cannot be claimed before the outage.
        cutter.cut = {b"XAUTOCLAIM"}
        task = asyncio.create_task(engine.run())
        try:
            await _one_outage_after_another(cutter, b"XAUTOCLAIM", engine, lines, "claim")
            await wait_until(lambda: seen == [(left, 2)], what="the idle entry claimed")
            await _next_outage_logs_at_once(cutter, b"XAUTOCLAIM", engine, lines, "claim")
            await wait_until(lambda: engine.stats.acked == 1, what="the claimed entry acked")
            engine.stop()
            stats = await asyncio.wait_for(task, 10)
        finally:
            task.cancel()
            await redis.aclose()
    assert (stats.claimed, stats.handled) == (1, 1)


async def test_an_ack_loop_cut_off_counts_its_failures_in_a_row_and_starts_again_after_an_ack(
    aredis: aioredis.Redis, cutter: CommandCutter
) -> None:
    handled: list[int] = []

    async def handler(delivery: Delivery) -> None:
        handled.append(delivery.message.data["n"])

    redis = cutter.client()
    engine = Engine(redis, config(), handler, NO_CLAIMS)
    with DownLines(engine) as lines:
        task = asyncio.create_task(engine.run())
        try:
            await engine.wait_started()
            cutter.cut = {b"XACK"}
            await publish(aredis, 1)
            await _one_outage_after_another(cutter, b"XACK", engine, lines, "ack")
            # Healed: the ack loop tries again by itself (nothing else wakes it).
            await wait_until(lambda: engine.stats.acked == 1, what="the entry acknowledged")
            await _next_outage_logs_at_once(
                cutter, b"XACK", engine, lines, "ack", lambda: publish(aredis, 1, start=1)
            )
            await wait_until(lambda: engine.stats.acked == 2, what="both acknowledged")
            engine.stop()
            stats = await asyncio.wait_for(task, 10)
        finally:
            task.cancel()
            await redis.aclose()
    assert handled == [0, 1]
    assert stats.handled == 2
    assert int((await aredis.xpending(STREAM, GROUP))["pending"]) == 0


async def test_a_prune_pass_that_fails_is_waited_out_and_the_next_one_prunes(
    aredis: aioredis.Redis, cutter: CommandCutter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    # A consumer with nothing pending, idle longer than the prune limit (100 ms).
    await aredis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    await aredis.xgroup_createconsumer(STREAM, GROUP, "idle")

    async def handler(delivery: Delivery) -> None:
        pass

    redis = cutter.client()
    cfg = config(claim_idle_ms=100, prune_idle_ms=100)
    engine = Engine(redis, cfg, handler, NO_CLAIMS)
    # Nothing held, no claims: the prune script is the worker's only EVALSHA.
    cutter.cut = {b"EVALSHA"}
    task = asyncio.create_task(engine.run())
    try:
        # The first pass (after a second) fails: the worker goes on.
        await wait_until(lambda: cutter.cuts.get(b"EVALSHA"), what="a failed prune pass")
        assert not task.done()
        cutter.cut = set()
        await wait_until(
            lambda: "removed idle consumers ['idle']" in caplog.messages,
            what="the next pass pruning",
        )
        engine.stop()
        await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
        await redis.aclose()
    consumers = [c["name"] for c in await aredis.xinfo_consumers(STREAM, GROUP)]
    assert b"idle" not in consumers


async def test_a_reader_stuck_on_a_redis_that_does_not_answer_is_cancelled_on_stop(
    aredis: aioredis.Redis, cutter: CommandCutter
) -> None:
    async def handler(delivery: Delivery) -> None:
        pass

    redis = cutter.client()
    # The reader's XREADGROUP gets no reply: the stop waits for its BLOCK (50 ms) and a
    # second, then cancels it.
    engine = Engine(redis, config(), handler, NO_CLAIMS)
    cutter.hold = {b"XREADGROUP"}

    async def stop_once_held() -> None:
        await wait_until(lambda: cutter.held.get(b"XREADGROUP"), what="a read held")
        engine.stop()

    stopper = asyncio.create_task(stop_once_held())
    try:
        async with asyncio.timeout(10):
            stats = await engine.run()
        # Returned (no error), with the reader over: nothing of the worker left running.
        assert [
            task.get_name()
            for task in asyncio.all_tasks()
            if task.get_name().startswith("orderflow-") and not task.done()
        ] == []
    finally:
        stopper.cancel()
        await redis.aclose()
    # Cancelled, not failed: a reader left to wait gets an error after some seconds
    # (redis-py gives up on the read), which the worker would count and log.
    assert (stats.handled, stats.redis_errors) == (0, 0)


async def _errors_of(redis: aioredis.Redis, code: str) -> int:
    """How many error replies of ``code`` (``NOGROUP`` …) the server has sent."""
    stats = await redis.info("errorstats")
    return int(stats.get(f"errorstat_{code}", {}).get("count", 0))


async def test_a_claim_loop_that_finds_the_group_deleted_creates_it_again(
    aredis: aioredis.Redis, cutter: CommandCutter
) -> None:
    async def handler(delivery: Delivery) -> None:
        pass

    redis = cutter.client()
    engine = Engine(redis, config(claim_interval_ms=20), handler, COMPETING)
    # The reader's read gets no reply: the claim loop is the one to meet the deletion.
    cutter.hold = {b"XREADGROUP"}
    task = asyncio.create_task(engine.run())
    try:
        await engine.wait_started()
        await wait_until(lambda: cutter.held.get(b"XREADGROUP"), what="the read held")
        before = await _errors_of(aredis, "NOGROUP")
        await aredis.xgroup_destroy(STREAM, GROUP)

        async def group_back_or_ended() -> bool:
            groups = [g["name"] for g in await aredis.xinfo_groups(STREAM)]
            return task.done() or GROUP.encode() in groups

        await wait_until(group_back_or_ended, what="the group created again")
        # By the claim loop, which goes on (a NOGROUP is not an error to stop for).
        assert not task.done()
        assert await _errors_of(aredis, "NOGROUP") > before
        engine.stop()
        stats = await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
        await redis.aclose()
    assert stats.redis_errors == 0


async def test_a_prune_pass_answered_with_an_error_is_waited_out(
    aredis: aioredis.Redis, cutter: CommandCutter
) -> None:
    async def handler(delivery: Delivery) -> None:
        pass

    redis = cutter.client()
    engine = Engine(redis, config(claim_idle_ms=100, prune_idle_ms=100), handler, NO_CLAIMS)
    # Nothing read (the read gets no reply), nothing held, no claims: once the group
    # is gone, the only command that fails is the prune pass's (every second).
    cutter.hold = {b"XREADGROUP"}
    task = asyncio.create_task(engine.run())
    try:
        await engine.wait_started()
        await wait_until(lambda: cutter.held.get(b"XREADGROUP"), what="the read held")
        before = await _errors_of(aredis, "NOGROUP")
        await aredis.xgroup_destroy(STREAM, GROUP)

        async def second_pass_failed() -> bool:
            return task.done() or await _errors_of(aredis, "NOGROUP") >= before + 2

        # Two passes answered NOGROUP: the worker went on after the first.
        await wait_until(second_pass_failed, what="two failed prune passes")
        assert not task.done()
        engine.stop()
        await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
        await redis.aclose()


async def test_an_ack_queued_while_a_flush_fails_is_sent_with_the_flush_put_back(
    aredis: aioredis.Redis, cutter: CommandCutter
) -> None:
    # The ack loop's XACK of the first entry is held on its way; the second entry is
    # handled meanwhile, its ack queued behind. The held XACK is then lost (and its
    # retries): the flush puts its ids back in front of the queued one, and once Redis
    # answers again one XACK acknowledges both; none is left pending.
    async def handler(delivery: Delivery) -> None:
        pass

    redis = cutter.client()
    engine = Engine(redis, config(), handler, NO_CLAIMS)
    cutter.hold = {b"XACK"}
    task = asyncio.create_task(engine.run())
    try:
        await engine.wait_started()
        await publish(aredis, 1)
        await wait_until(lambda: cutter.held.get(b"XACK"), what="the first XACK held")
        await publish(aredis, 1, start=1)
        await wait_until(lambda: engine.stats.handled == 2, what="the second entry handled")
        cutter.cut = {b"XACK"}
        cutter.hold = set()
        cutter.release(cut=True)
        await wait_until(lambda: engine.stats.redis_errors, what="the flush failed")
        cutter.cut = set()
        await wait_until(lambda: engine.stats.acked, what="a flush after the outage")
        assert engine.stats.acked == 2
        assert int((await aredis.xpending(STREAM, GROUP))["pending"]) == 0
        engine.stop()
        await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
        await redis.aclose()
