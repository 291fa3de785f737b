"""Bench case 3's latency runs start on empty consumer groups: the backlog a saturation
run leaves is skipped, what the consumers hold is acknowledged first, entries a relay
still appends are skipped too, and a backlog that stays is a BacklogError, not a
silent start (which gave latency NaN: no order of the run was emailed in time)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bench import case_end_to_end
from bench.backlog import BacklogError, Group

from tests.support import wait_until

STREAM = "orders"
GROUP = "email-service"
#: Left by a saturation run: minutes of work for the slow consumer below.
BACKLOG = 3_000


@dataclass
class FakeStack:
    """What the case's phases need of a stack; no API, a Maildir the consumer fills."""

    redis_url: str
    mail_dir: Path
    api_url: str = "http://127.0.0.1:1"


class SlowConsumer:
    """One consumer of the group, emailing (a Maildir file) 5 entries per read, slowly;
    with ``hold`` cleared it keeps what it read unacknowledged until it is set."""

    def __init__(self, aredis: Any, mail_dir: Path) -> None:
        self.aredis = aredis
        self.new = mail_dir / "new"
        self.new.mkdir(parents=True)
        self.seen: list[bytes] = []
        self.hold = asyncio.Event()
        self.hold.set()
        #: Set while it waits for ``hold`` with entries read and unacknowledged.
        self.holding = asyncio.Event()

    async def run(self) -> None:
        """Read, 'send', ack, until cancelled."""
        while True:
            reply = await self.aredis.xreadgroup(GROUP, "c1", {STREAM: ">"}, count=5, block=50)
            entries = reply[0][1] if reply else []
            for entry_id, fields in entries:
                self.seen.append(fields[b"n"])
                (self.new / entry_id.decode()).write_bytes(fields[b"n"])
            if entries and not self.hold.is_set():
                self.holding.set()
                await self.hold.wait()
            if entries:
                # The SMTP transaction's time: a backlog of BACKLOG takes minutes.
                await asyncio.sleep(0.05)
                await self.aredis.xack(STREAM, GROUP, *[entry_id for entry_id, _ in entries])


@pytest.fixture
async def consumer(aredis: Any, tmp_path: Path) -> AsyncIterator[SlowConsumer]:
    await aredis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    async with aredis.pipeline(transaction=False) as pipe:
        for n in range(BACKLOG):
            pipe.xadd(STREAM, {"n": str(n)})
        await pipe.execute()
    slow = SlowConsumer(aredis, tmp_path / "mail")
    task = asyncio.create_task(slow.run())
    await wait_until(lambda: len(slow.seen) >= 10, what="the consumer under way")
    yield slow
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _group(aredis: Any) -> dict[str, Any]:
    (info,) = await aredis.xinfo_groups(STREAM)
    return dict(info)


async def test_the_latency_run_starts_behind_no_backlog(
    consumer: SlowConsumer, aredis: Any, redis_url: str, tmp_path: Path
) -> None:
    stack = FakeStack(redis_url, tmp_path / "mail")
    await case_end_to_end._drain(stack, [Group(STREAM, GROUP)], within_s=10)

    group = await _group(aredis)
    stream = await aredis.xinfo_stream(STREAM)
    assert group["pending"] == 0
    assert group["last-delivered-id"] == stream["last-generated-id"]
    # The next order is the next one emailed, not one behind thousands.
    handled = len(consumer.seen)
    await aredis.xadd(STREAM, {"n": b"latency"})
    await wait_until(lambda: b"latency" in consumer.seen, timeout=5, what="the new entry")
    assert consumer.seen[handled:] == [b"latency"]
    assert handled < BACKLOG / 2


async def test_what_the_consumers_hold_is_acknowledged_before_it_returns(
    consumer: SlowConsumer, aredis: Any, redis_url: str, tmp_path: Path
) -> None:
    consumer.hold.clear()
    await asyncio.wait_for(consumer.holding.wait(), 5)
    stack = FakeStack(redis_url, tmp_path / "mail")
    drain = asyncio.create_task(case_end_to_end._drain(stack, [Group(STREAM, GROUP)], within_s=10))

    async def skipped() -> bool:
        stream = await aredis.xinfo_stream(STREAM)
        return bool((await _group(aredis))["last-delivered-id"] == stream["last-generated-id"])

    await wait_until(skipped, what="the group moved past the backlog")
    assert not drain.done()
    consumer.hold.set()
    await asyncio.wait_for(drain, 5)
    assert (await _group(aredis))["pending"] == 0


async def test_entries_a_relay_still_appends_are_skipped_too(
    consumer: SlowConsumer, aredis: Any, redis_url: str, tmp_path: Path
) -> None:
    # The outbox still has rows: each look finds the relay appending another batch.
    batches = iter(range(5))

    async def outbox_empty() -> bool:
        batch = next(batches, None)
        if batch is None:
            return True
        async with aredis.pipeline(transaction=False) as pipe:
            for n in range(200):
                pipe.xadd(STREAM, {"n": f"relayed-{batch}-{n}"})
            await pipe.execute()
        return False

    stack = FakeStack(redis_url, tmp_path / "mail")
    await case_end_to_end._drain(stack, [Group(STREAM, GROUP)], settled=outbox_empty, within_s=10)

    group = await _group(aredis)
    stream = await aredis.xinfo_stream(STREAM)
    assert group["pending"] == 0
    assert group["last-delivered-id"] == stream["last-generated-id"]
    assert sum(n.startswith(b"relayed-") for n in consumer.seen) < 5 * 200 / 2


async def test_a_backlog_that_stays_is_an_error_naming_the_group(
    consumer: SlowConsumer, aredis: Any, redis_url: str, tmp_path: Path
) -> None:
    consumer.hold.clear()  # a consumer that never acknowledges (a stuck worker)
    await asyncio.wait_for(consumer.holding.wait(), 5)
    stack = FakeStack(redis_url, tmp_path / "mail")
    with pytest.raises(BacklogError, match=r"orders/email-service: \d+ pending"):
        await case_end_to_end._drain(stack, [Group(STREAM, GROUP)], within_s=0.5)


async def test_a_group_nobody_made_is_an_error(aredis: Any, redis_url: str, tmp_path: Path) -> None:
    await aredis.xadd(STREAM, {"n": "1"})
    stack = FakeStack(redis_url, tmp_path / "mail")
    with pytest.raises(BacklogError, match="orders/email-service"):
        await case_end_to_end._drain(stack, [Group(STREAM, GROUP)], within_s=1)
