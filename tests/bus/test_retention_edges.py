"""Retention and the publisher at their edges: the smallest bounds, when a trim runs,
what it reports and logs, and group creation (each test kills mutants the retention
tests let live: see docs/MUTATION.md)."""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from redis.exceptions import ResponseError

from orderflow.bus import Message, Retention, StreamPublisher, ensure_group
from orderflow.bus.streams import TrimResult


@pytest.fixture
def stream() -> str:
    # A name of this test's own: the Prometheus series are process-wide.
    return f"edges-{uuid.uuid4().hex[:8]}"


def test_the_smallest_bounds_are_accepted_and_zero_is_refused_by_name() -> None:
    assert Retention(maxlen=1, trim_every=1, scan_limit=1).maxlen == 1
    for field in ("maxlen", "trim_every", "scan_limit"):
        with pytest.raises(ValueError, match=rf"^Retention\.{field} must be at least 1, got 0$"):
            Retention(**{field: 0})  # type: ignore[arg-type]


async def test_a_publisher_without_retention_uses_the_default(aredis: aioredis.Redis) -> None:
    assert StreamPublisher(aredis).retention == Retention()


async def test_publish_returns_the_entry_id_and_counts_it(
    aredis: aioredis.Redis, stream: str
) -> None:
    publisher = StreamPublisher(aredis, retention=Retention(maxlen=None))
    entry_id = await publisher.publish(stream, Message(data={"n": 1}, id="m-1"))
    ((stored_id, fields),) = await aredis.xrange(stream)
    assert entry_id == stored_id.decode()
    assert fields[b"ce_id"] == b"m-1"
    await publisher.publish_many(stream, [Message(data={"n": 2}), Message(data={"n": 3})])
    assert REGISTRY.get_sample_value("orderflow_published_total", {"stream": stream}) == 3


async def test_publish_on_a_client_that_decodes_replies(redis_url: str, stream: str) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        entry_id = await StreamPublisher(client).publish(stream, Message(data={}))
        assert entry_id == (await client.xrange(stream))[0][0]
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("maxlen", "trim_every", "every"),
    [
        (10, 1000, 1),  # a tenth of the cap, at least 1
        (15, 1000, 1),  # a tenth, rounded down
        (20, 1000, 2),
        (1000, 5, 5),  # trim_every when it is smaller
    ],
)
async def test_a_trim_runs_after_every_nth_append(
    aredis: aioredis.Redis, stream: str, maxlen: int, trim_every: int, every: int
) -> None:
    publisher = StreamPublisher(aredis, retention=Retention(maxlen=maxlen, trim_every=trim_every))
    for cycle in range(2):
        for n in range(1, every + 1):
            publisher.last_trim.pop(stream, None)
            await publisher.appended(stream, 1)
            assert (stream in publisher.last_trim) is (n == every), (cycle, n)


async def test_without_a_cap_a_trim_only_reports_the_length(
    aredis: aioredis.Redis, stream: str
) -> None:
    publisher = StreamPublisher(aredis, retention=Retention(maxlen=None))
    await publisher.publish_many(stream, [Message(data={})] * 3)
    assert await publisher.trim(stream) == TrimResult(
        length=3, trimmed=0, over_cap=False, safe_id=None
    )


async def test_over_cap_is_logged_and_shown_then_cleared(
    aredis: aioredis.Redis, stream: str, caplog: pytest.LogCaptureFixture
) -> None:
    await ensure_group(aredis, stream, "lagging")
    publisher = StreamPublisher(aredis, retention=Retention(maxlen=None))
    ids = await publisher.publish_many(stream, [Message(data={})] * 5)
    trimmer = StreamPublisher(aredis, retention=Retention(maxlen=2, approximate=False))

    def gauge() -> float | None:
        return REGISTRY.get_sample_value("orderflow_stream_over_cap", {"stream": stream})

    with caplog.at_level(logging.WARNING, logger="orderflow.bus.streams"):
        held = await trimmer.trim(stream)
    assert held.over_cap
    assert held.safe_id is not None
    assert gauge() == 1
    assert caplog.messages == [
        f"stream {stream} holds 5 entries, over its cap of 2: a consumer group has not "
        f"acknowledged entries from {held.safe_id} on, so they are kept"
    ]
    # The group catches up: the cap applies and the gauge goes back to 0.
    await aredis.xreadgroup("lagging", "c", {stream: ">"})
    await aredis.xack(stream, "lagging", *ids)
    assert not (await trimmer.trim(stream)).over_cap
    assert gauge() == 0


async def test_ensure_group_creates_once_from_the_given_id(
    aredis: aioredis.Redis, stream: str
) -> None:
    first = await aredis.xadd(stream, {"data": "{}"})
    assert await ensure_group(aredis, stream, "from-start") is True
    assert await ensure_group(aredis, stream, "from-start") is False
    assert await ensure_group(aredis, stream, "from-now", start_id="$") is True
    read = await aredis.xreadgroup("from-start", "c", {stream: ">"})
    assert [entry_id for entry_id, _ in read[0][1]] == [first]
    assert await aredis.xreadgroup("from-now", "c", {stream: ">"}) == []


async def test_ensure_group_raises_other_errors(aredis: aioredis.Redis) -> None:
    await aredis.set("not-a-stream", "x")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await ensure_group(aredis, "not-a-stream", "g")


async def test_an_approximate_trim_that_cannot_free_a_node_stops(
    aredis: aioredis.Redis, stream: str
) -> None:
    # Each step may trim at most scan_limit (50) entries, less than one radix-tree node
    # (100): an approximate trim frees nothing, and must say so rather than loop.
    await StreamPublisher(aredis, retention=Retention(maxlen=None)).publish_many(
        stream, [Message(data={})] * 1000
    )
    trimmer = StreamPublisher(
        aredis, retention=Retention(maxlen=100, scan_limit=50, approximate=True)
    )
    result = await asyncio.wait_for(trimmer.trim(stream), timeout=10)
    assert (result.length, result.trimmed, result.over_cap) == (1000, 0, False)
