"""Case 4: latency from XADD to the start of the handler, open loop at fixed rates.

A load generator in another process appends entries at a fixed rate whatever the
consumer does (open loop), stamping each with ``time.monotonic_ns()`` just before its
XADD leaves; the consumer takes the clock again as its handler starts. Both processes
read the same monotonic clock of this host. orderflow's ``StreamWorker`` is compared
with a minimal loop (XREADGROUP BLOCK COUNT 100, handler, XACK per batch).
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import time
from typing import Any, cast

import orjson
import redis
import redis.asyncio as aioredis

from bench.common import (
    CLIENT_CPU,
    SERVER_CPU,
    STREAM,
    Figure,
    can_pin,
    flat_fields,
    percentile,
)
from orderflow.bus import Delivery, StreamWorker, WorkerConfig
from orderflow.bus.connection import connect
from orderflow.bus.message import Message

CASE = "latency"
GROUP = "latency"
RATES = (1_000, 10_000)
#: A fixed-width stand-in for the send time, replaced in the encoded JSON at send time,
#: so the stamp is taken after the entry was encoded, right before it is sent.
PLACEHOLDER = b"0" * 19
#: The first part of each run is warm-up (connections, caches), left out of the figures.
WARMUP_SHARE = 0.1


def _generate(url: str, rate: int, seconds: float, lag_out: Any) -> None:
    """The load generator (a child process): XADD at ``rate``/s for ``seconds``."""
    if can_pin():
        # With the server, which these rates leave mostly idle; the consumer has the other core.
        os.sched_setaffinity(0, {SERVER_CPU})
    client = redis.Redis.from_url(url)
    total = int(rate * seconds)
    templates = []
    for i in range(total):
        message = Message.event(
            "order.created", {"id": i, "sent_ns": PLACEHOLDER.decode()}, source="bench"
        )
        templates.append(flat_fields(message))
    data_index = templates[0].index("data") + 1
    interval = 1e9 / rate
    start = time.monotonic_ns()
    sent = 0
    lags = []
    while sent < total:
        now = time.monotonic_ns()
        due = min(total, int((now - start) / interval) + 1)
        if due > sent:
            lags.append((now - (start + int(sent * interval))) / 1e6)
            pipe: Any = client.pipeline(transaction=False)
            stamp = str(time.monotonic_ns()).zfill(19).encode()
            for fields in templates[sent:due]:
                fields[data_index] = cast(bytes, fields[data_index]).replace(PLACEHOLDER, stamp)
                pipe.execute_command("XADD", STREAM, "*", *fields)
            pipe.execute()
            sent = due
        else:
            time.sleep(max(0.0, (start + sent * interval - now) / 1e9))
    client.close()
    lag_out.put(lags)


def _sent_ns(data: Any) -> int:
    return int(data["sent_ns"])


async def _orderflow(
    redis_client: aioredis.Redis, total: int, latencies: list[float], ready: asyncio.Event
) -> None:
    done = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        latencies.append((time.monotonic_ns() - _sent_ns(delivery.message.data)) / 1e6)
        if len(latencies) >= total:
            done.set()

    worker = StreamWorker(
        redis_client, WorkerConfig(stream=STREAM, group=GROUP, consumer="c"), handler
    )
    running = asyncio.create_task(worker.run())
    await worker.wait_started()
    ready.set()
    await done.wait()
    worker.stop()
    await running


async def _minimal(
    redis_client: aioredis.Redis, total: int, latencies: list[float], ready: asyncio.Event
) -> None:
    await redis_client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    ready.set()
    while len(latencies) < total:
        reply: Any = await redis_client.xreadgroup(GROUP, "c", {STREAM: ">"}, count=100, block=1000)
        entries = reply[0][1] if reply else []
        for _entry_id, fields in entries:
            started = time.monotonic_ns()
            latencies.append((started - _sent_ns(orjson.loads(fields[b"data"]))) / 1e6)
        if entries:
            await redis_client.xack(STREAM, GROUP, *(entry_id for entry_id, _ in entries))


#: One round's samples after its warm-up: latencies, generator lateness, sleeper lateness.
Round = tuple[list[float], list[float], list[float]]


async def _round(url: str, contender: Any, rate: int, seconds: float) -> Round:
    # The earlier cases' objects stay out of the collector's way (a worker process would
    # not hold them): frozen, a full collection only walks what this case allocates.
    gc.collect()
    gc.freeze()
    try:
        return await _round_unfrozen(url, contender, rate, seconds)
    finally:
        gc.unfreeze()


async def _round_unfrozen(url: str, contender: Any, rate: int, seconds: float) -> Round:
    ready = asyncio.Event()
    redis_client = connect(url)
    await redis_client.delete(STREAM)
    total = int(rate * seconds)
    latencies: list[float] = []
    consuming = asyncio.create_task(contender(redis_client, total, latencies, ready))
    await ready.wait()
    context = multiprocessing.get_context("spawn")
    lag_out, wake_out = context.Queue(), context.Queue()
    generator = context.Process(target=_generate, args=(url, rate, seconds, lag_out))
    sleeper = context.Process(target=_wakeups, args=(seconds, wake_out))
    generator.start()
    sleeper.start()
    try:
        await asyncio.wait_for(consuming, timeout=seconds + 30)
        lags: list[float] = await asyncio.to_thread(lag_out.get, True, 30)
        wakeups: list[float] = await asyncio.to_thread(wake_out.get, True, 30)
    finally:
        await asyncio.to_thread(generator.join, 30)
        await asyncio.to_thread(sleeper.join, 30)
        await redis_client.delete(STREAM)
        await redis_client.aclose()
    return (
        latencies[int(total * WARMUP_SHARE) :],
        lags[int(len(lags) * WARMUP_SHARE) :],
        wakeups[int(len(wakeups) * WARMUP_SHARE) :],
    )


def _figure(contender: Any, rate: int, rounds: int, measured: Round) -> Figure:
    samples, lags, wakeups = measured
    name = "orderflow StreamWorker" if contender is _orderflow else "minimal redis-py loop"
    floor = {
        "generator late p99": percentile(lags, 99),
        "generator late max": max(lags),
        "client core late p99": percentile(wakeups, 99),
        "client core late max": max(wakeups),
    }
    return Figure(
        CASE,
        f"{name} @ {rate:,}/s",
        percentile(samples, 99),
        "ms p99",
        note=(
            f"{len(samples):,} samples in {rounds} round{'s' if rounds > 1 else ''}; "
            f"meanwhile the generator was late p99 {floor['generator late p99']:.2f} ms "
            f"(max {floor['generator late max']:.2f}), a 1 ms sleeper on the client core "
            f"p99 {floor['client core late p99']:.2f} ms (max "
            f"{floor['client core late max']:.2f})"
        ),
        extra={
            "p50": percentile(samples, 50),
            "p99": percentile(samples, 99),
            "p99.9": percentile(samples, 99.9),
            "max": max(samples),
            **floor,
        },
    )


def _wakeups(seconds: float, out: Any) -> None:
    """A 1 ms sleeper on the client core, beside a contender: how late it wakes, in ms.

    No Redis, no work: what the scheduler alone adds on that core during the run.
    """
    if can_pin():
        os.sched_setaffinity(0, {CLIENT_CPU})
    interval = 1_000_000
    start = time.monotonic_ns()
    late = []
    for k in range(1, int(seconds * 1000) + 1):
        due = start + k * interval
        time.sleep(max(0, due - time.monotonic_ns()) / 1e9)
        late.append((time.monotonic_ns() - due) / 1e6)
    out.put(late)


async def run(url: str, *, seconds: float, rounds: int = 1) -> list[Figure]:
    """Each contender at each rate for ``seconds``; p50/p99/p99.9 in milliseconds.

    The seconds are split into ``rounds`` that alternate between the contenders (who
    goes first alternates too), so that a burst of load from other processes on this
    shared machine falls on both rather than on whichever ran at the time.
    """
    figures = []
    contenders = (_orderflow, _minimal)
    for rate in RATES:
        measured: dict[Any, Round] = {c: ([], [], []) for c in contenders}
        for index in range(rounds):
            for contender in contenders if index % 2 == 0 else contenders[::-1]:
                got = await _round(url, contender, rate, seconds / rounds)
                for into, part in zip(measured[contender], got, strict=True):
                    into.extend(part)
        figures += [_figure(c, rate, rounds, measured[c]) for c in contenders]
    return figures
