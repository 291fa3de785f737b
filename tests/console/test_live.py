"""Live updates: the ticker publishes snapshots on Pub/Sub; SSE streams forward them."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import redis.asyncio as aioredis

from orderflow.console.live import RateTracker, sse
from tests.support import wait_until

from .conftest import Console


def events_of(body: bytes) -> list[tuple[str, Any]]:
    """The (event, JSON data) pairs of an SSE body."""
    found = []
    for block in body.decode().split("\n\n"):
        lines = block.splitlines()
        names = [line[7:] for line in lines if line.startswith("event: ")]
        data = "\n".join(line[6:] for line in lines if line.startswith("data: "))
        if names:
            found.append((names[0], orjson.loads(data)))
    return found


async def test_ticker_publishes_snapshots_while_someone_listens(
    console: Console, aredis: aioredis.Redis
) -> None:
    await console.client.post("/orders", json={"email": "a@example.com", "total": "1"})
    await aredis.xadd("orders", {"data": b"{}"})
    pubsub = aredis.pubsub()
    await pubsub.subscribe("orderflow:console")
    try:
        message = await wait_until(
            lambda: pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5), timeout=10
        )
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    snap = orjson.loads(message["data"])
    assert [order["email"] for order in snap["orders"]] == ["a@example.com"]
    assert snap["orders"][0]["email_status"] == "pending"
    (orders, events) = snap["flow"]
    assert orders["name"] == "orders"
    assert orders["length"] == 1
    assert events["name"] == "email-events"
    assert snap["dead_letters"] == {
        "orders": {"count": 0, "newest": ""},
        "email-events": {"count": 0, "newest": ""},
    }
    assert snap["inbox"] == {"count": 0, "newest": ""}


async def test_no_tick_costs_anything_when_nobody_listens(console: Console) -> None:
    # Under test is an absence over time: a tick would have come within 1.5 periods.
    await asyncio.sleep(console.feed.options.tick_s * 1.5)
    assert console.feed.ticks == 0


async def test_sse_stream_sends_a_snapshot_then_the_ticks(
    console: Console, aredis: aioredis.Redis
) -> None:
    console.feed.options.stream_max_s = 1.5
    await console.client.post("/orders", json={"email": "b@example.com", "total": "2"})

    async def tick_soon() -> None:
        # Publish a tick by hand once the stream has subscribed.
        await wait_until(lambda: _subscribers(aredis), timeout=5)
        await aredis.publish("orderflow:console", b'{"hello": "<b>tick</b>"}')

    ticker = asyncio.create_task(tick_soon())
    response = await console.client.get("/console/events")
    await ticker

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-store"
    assert response.content.startswith(b"retry: 500\n\n")
    found = events_of(response.content)
    assert found[0][0] == "snapshot"
    assert found[0][1]["orders"][0]["email"] == "b@example.com"
    assert ("snapshot", {"hello": "<b>tick</b>"}) in found


async def _subscribers(redis: aioredis.Redis) -> bool:
    reply: Any = await redis.pubsub_numsub("orderflow:console")
    return bool(reply and int(reply[0][1]))


def test_sse_framing_keeps_lines_apart() -> None:
    assert sse("snapshot", b'{"a":1}') == b'event: snapshot\ndata: {"a":1}\n\n'
    assert sse("x", "one\ntwo\r\nthree") == b"event: x\ndata: one\ndata: two\ndata: three\n\n"


def test_rate_is_entries_per_second_over_the_window() -> None:
    rates = RateTracker(window_s=10)
    assert rates.observe("orders", 100, now=0.0) is None
    assert rates.observe("orders", 150, now=5.0) == 10.0
    assert rates.observe("orders", 250, now=10.0) == 15.0
    assert rates.observe("orders", None, now=11.0) is None
