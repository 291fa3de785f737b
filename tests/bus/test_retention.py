"""Retention: a length cap that never trims an entry some consumer group still needs."""

from __future__ import annotations

import logging

import pytest
import redis.asyncio as aioredis

from orderflow.bus import Message, Retention, StreamPublisher, ensure_group

STREAM = "orders"


def exact(maxlen: int, **kw: int) -> Retention:
    return Retention(maxlen=maxlen, trim_every=1, approximate=False, **kw)


async def fill(publisher: StreamPublisher, count: int) -> list[str]:
    return await publisher.publish_many(STREAM, [Message(data={"n": n}) for n in range(count)])


async def ack_first(redis: aioredis.Redis, group: str, read: int, ack: int) -> list[str]:
    """A consumer of ``group`` reads ``read`` entries and acknowledges the first ``ack``."""
    reply = await redis.xreadgroup(group, "c1", {STREAM: ">"}, count=read)
    ids = [entry_id.decode() for entry_id, _ in reply[0][1]]
    if ack:
        await redis.xack(STREAM, group, *ids[:ack])
    return ids


async def remaining(redis: aioredis.Redis) -> list[str]:
    return [entry_id.decode() for entry_id, _ in await redis.xrange(STREAM)]


async def test_without_groups_the_stream_is_cut_to_its_cap(aredis: aioredis.Redis) -> None:
    publisher = StreamPublisher(aredis, retention=exact(10))
    ids = await fill(publisher, 100)
    assert await remaining(aredis) == ids[-10:]
    assert publisher.last_trim[STREAM].over_cap is False


async def test_a_caught_up_group_lets_the_cap_apply(aredis: aioredis.Redis) -> None:
    await ensure_group(aredis, STREAM, "g")
    publisher = StreamPublisher(aredis, retention=Retention(maxlen=10, trim_every=10**6))
    ids = await fill(publisher, 100)
    await ack_first(aredis, "g", 100, 100)
    result = await StreamPublisher(aredis, retention=exact(10)).trim(STREAM)
    assert await remaining(aredis) == ids[-10:]
    assert result.over_cap is False
    assert result.trimmed == 90


async def test_pending_and_unread_entries_are_never_trimmed(aredis: aioredis.Redis) -> None:
    await ensure_group(aredis, STREAM, "g")
    ids = await fill(StreamPublisher(aredis, retention=Retention(maxlen=None)), 100)
    await ack_first(aredis, "g", read=30, ack=20)  # 20 acked, 10 pending, 70 unread

    result = await StreamPublisher(aredis, retention=exact(10)).trim(STREAM)

    assert await remaining(aredis) == ids[20:]  # from the oldest pending entry on
    assert result.over_cap is True
    assert result.safe_id == ids[20]
    assert result.length == 80


async def test_the_slowest_of_several_groups_decides(aredis: aioredis.Redis) -> None:
    await ensure_group(aredis, STREAM, "fast")
    await ensure_group(aredis, STREAM, "slow")
    ids = await fill(StreamPublisher(aredis, retention=Retention(maxlen=None)), 50)
    await ack_first(aredis, "fast", read=50, ack=50)
    await ack_first(aredis, "slow", read=15, ack=15)  # nothing pending, 35 unread

    await StreamPublisher(aredis, retention=exact(5)).trim(STREAM)

    assert await remaining(aredis) == ids[15:]


async def test_publishing_past_the_cap_while_a_group_lags_is_reported_not_dropped(
    aredis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    await ensure_group(aredis, STREAM, "email-service")  # the Email Service is down
    publisher = StreamPublisher(aredis, retention=Retention(maxlen=50, trim_every=25))
    with caplog.at_level(logging.WARNING, logger="orderflow.bus.streams"):
        ids = await fill(publisher, 500)
    assert await remaining(aredis) == ids  # nothing lost
    assert publisher.last_trim[STREAM].over_cap is True
    assert "over its cap of 50" in caplog.text


async def test_a_large_trim_is_done_in_bounded_steps(aredis: aioredis.Redis) -> None:
    publisher = StreamPublisher(aredis, retention=Retention(maxlen=None))
    ids = await fill(publisher, 1000)
    trimmer = StreamPublisher(aredis, retention=exact(100, scan_limit=64))
    result = await trimmer.trim(STREAM)
    assert await remaining(aredis) == ids[-100:]
    assert result.trimmed == 900


async def test_approximate_trimming_keeps_at_least_the_needed_entries(
    aredis: aioredis.Redis,
) -> None:
    await ensure_group(aredis, STREAM, "g")
    ids = await fill(StreamPublisher(aredis, retention=Retention(maxlen=None)), 2000)
    await ack_first(aredis, "g", read=1500, ack=1000)
    await StreamPublisher(aredis, retention=Retention(maxlen=100, trim_every=1)).trim(STREAM)
    left = await remaining(aredis)
    assert left[-1000:] == ids[1000:]  # everything from the oldest pending entry on
    assert len(left) < 2000  # whole macro nodes before it were released


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"maxlen": 0}, "maxlen must be at least 1"),
        ({"trim_every": 0}, "trim_every must be at least 1"),
        ({"scan_limit": 0}, "scan_limit must be at least 1"),
    ],
)
def test_bad_retention_is_refused_by_name(kwargs: dict[str, int], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        Retention(**kwargs)  # type: ignore[arg-type]


async def test_an_oversized_message_is_refused_before_anything_is_sent(
    aredis: aioredis.Redis,
) -> None:
    publisher = StreamPublisher(aredis)
    with pytest.raises(ValueError, match="over the"):
        await publisher.publish_many(
            STREAM, [Message(data={"n": 1}), Message(data={"x": "y" * 300_000})]
        )
    assert await aredis.exists(STREAM) == 0
