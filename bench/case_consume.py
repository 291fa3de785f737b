"""Case 2: consume + ack throughput with a no-op handler.

orderflow's ``StreamWorker`` (burst mode: it drains the stream and returns) against a
minimal redis-py loop (XREADGROUP COUNT 100, one XACK per batch) and FastStream's
Redis Streams group subscriber, per message and in batches. Every contender reads the
same preloaded entries through a consumer group of its own, created at ``0``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import uuid
from typing import Any, cast

import redis.asyncio as aioredis

from bench.common import (
    STREAM,
    Figure,
    Stopwatch,
    Throughput,
    flat_fields,
    order_data,
    order_message,
    throughput_figure,
)
from orderflow.bus import Delivery, StreamWorker, WorkerConfig
from orderflow.bus.connection import connect
from orderflow.bus.message import decode
from orderflow.bus.streams import send_commands

CASE = "consume"
BATCH = 100
#: FastStream reads entries in its own wire format (a ``__data__`` field), so it gets a
#: stream of its own holding the same orders as FastStream's publisher writes them.
FASTSTREAM_STREAM = f"{STREAM}:faststream"


async def preload(redis: aioredis.Redis, count: int) -> None:
    """Fill the bench stream with ``count`` orderflow-encoded ``order.created`` entries."""
    await redis.delete(STREAM)
    for start in range(0, count, 1000):
        batch = range(start, min(count, start + 1000))
        await send_commands(
            redis, [("XADD", STREAM, "*", *flat_fields(order_message(i))) for i in batch]
        )


async def preload_faststream(redis: aioredis.Redis, count: int) -> None:
    """Fill FastStream's stream with the same orders, encoded as FastStream publishes them."""
    from faststream.redis.parser import BinaryMessageFormatV1

    await redis.delete(FASTSTREAM_STREAM)
    for start in range(0, count, 1000):
        commands = []
        for i in range(start, min(count, start + 1000)):
            body = await BinaryMessageFormatV1.encode(
                message={**order_data(i), "total": "123.45"},
                reply_to=None,
                headers={"content-type": "application/json"},
                correlation_id=str(uuid.uuid4()),
            )
            commands.append(("XADD", FASTSTREAM_STREAM, "*", "__data__", body))
        await send_commands(redis, commands)


async def _new_group(redis: aioredis.Redis, stream: str) -> str:
    group = f"g-{uuid.uuid4().hex[:8]}"
    await redis.xgroup_create(stream, group, id="0")
    return group


async def _pending(redis: aioredis.Redis, stream: str, group: str) -> int:
    summary: Any = await redis.xpending(stream, group)
    return int(summary["pending"])


async def _orderflow(redis: aioredis.Redis, count: int) -> Throughput:
    group = await _new_group(redis, STREAM)
    handled = 0

    async def handler(delivery: Delivery) -> None:
        nonlocal handled
        handled += 1

    worker = StreamWorker(redis, WorkerConfig(stream=STREAM, group=group, consumer="c"), handler)
    with Stopwatch() as watch:
        stats = await worker.run(burst=True)
    assert handled == count == stats.acked, (handled, count, stats)
    assert await _pending(redis, STREAM, group) == 0
    return watch.throughput(count)


async def _minimal(redis: aioredis.Redis, count: int, *, decoding: bool = False) -> Throughput:
    """The minimal loop; with ``decoding``, its handler decodes each entry as orderflow does."""
    group = await _new_group(redis, STREAM)
    handled = 0

    async def handler(entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        nonlocal handled
        if decoding:
            decode(fields, entry_id.decode())
        handled += 1

    with Stopwatch() as watch:
        while True:
            reply: Any = await redis.xreadgroup(group, "c", {STREAM: ">"}, count=BATCH)
            entries = reply[0][1] if reply else []
            if not entries:
                break
            for entry_id, fields in entries:
                await handler(entry_id, fields)
            await redis.xack(STREAM, group, *(entry_id for entry_id, _ in entries))
    assert handled == count
    assert await _pending(redis, STREAM, group) == 0
    return watch.throughput(count)


async def _faststream(url: str, redis: aioredis.Redis, count: int, *, batch: bool) -> Throughput:
    from faststream.redis import RedisBroker, StreamSub

    group = await _new_group(redis, FASTSTREAM_STREAM)
    # No per-message log lines: FastStream at its fastest, not at its default verbosity.
    broker = RedisBroker(url, logger=cast(Any, None))
    handled = 0
    done = asyncio.Event()

    def seen(n: int) -> None:
        nonlocal handled
        handled += n
        if handled >= count:
            done.set()

    source = StreamSub(
        FASTSTREAM_STREAM,
        group=group,
        consumer="c",
        max_records=BATCH,
        batch=batch,
        polling_interval=10,
    )

    async def handle_batch(body: list[Any]) -> None:
        seen(len(body))

    async def handle_one(body: Any) -> None:
        seen(1)

    # FastStream's decorator, called plainly: it is untyped, and mypy is strict here.
    subscriber: Any = broker.subscriber(stream=source)
    subscriber(handle_batch if batch else handle_one)

    with Stopwatch() as watch:
        await broker.start()
        await done.wait()
        # Done means acknowledged: wait for the last XACKs to reach Redis.
        # Polling Redis, the only place that knows (no event to wait on).
        while await _pending(redis, FASTSTREAM_STREAM, group):  # noqa: ASYNC110
            await asyncio.sleep(0.001)
    await broker.stop()
    assert handled == count, (handled, count)
    return watch.throughput(count)


async def run(url: str, *, count: int, repeats: int) -> list[Figure]:
    """Drain ``count`` entries per contender, ``repeats`` times; the median rate."""
    redis = connect(url)
    rates: dict[str, list[Throughput]] = {
        "orderflow": [],
        "minimal": [],
        "minimal-decode": [],
        "faststream": [],
        "faststream-batch": [],
    }
    faststream = importlib.util.find_spec("faststream") is not None
    try:
        await preload(redis, count)
        if faststream:
            await preload_faststream(redis, count)
        for _ in range(repeats):
            rates["orderflow"].append(await _orderflow(redis, count))
            rates["minimal"].append(await _minimal(redis, count))
            rates["minimal-decode"].append(await _minimal(redis, count, decoding=True))
        if faststream:
            # Once each, to keep the run short: FastStream is far from the others. Per
            # message it is an order of magnitude slower still, so it gets a twentieth of
            # the entries (its rate is steady long before).
            rates["faststream-batch"].append(await _faststream(url, redis, count, batch=True))
            await preload_faststream(redis, count // 20)
            rates["faststream"].append(await _faststream(url, redis, count // 20, batch=False))
        await redis.delete(STREAM, FASTSTREAM_STREAM)
    finally:
        await redis.aclose()
    return [
        throughput_figure(CASE, "orderflow StreamWorker", rates["orderflow"]),
        throughput_figure(CASE, "minimal redis-py loop", rates["minimal"]),
        throughput_figure(
            CASE,
            "minimal loop + orderflow decode()",
            rates["minimal-decode"],
            note="the same loop, its handler decoding each entry into a Message",
        ),
        _faststream_figure("FastStream per message", rates["faststream"], count // 20),
        _faststream_figure("FastStream batch", rates["faststream-batch"], count),
    ]


def _faststream_figure(name: str, rates: list[Throughput], count: int) -> Figure:
    if not rates:
        return Figure(
            CASE,
            name,
            float("nan"),
            "entries/s",
            note="FastStream not installed: pip install -e '.[bench]'",
        )
    return throughput_figure(CASE, name, rates, note=f"{count:,} entries")
