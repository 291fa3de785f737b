"""Case 1: publish throughput.

orderflow's ``StreamPublisher.publish_many`` in batches of 100, against a minimal
redis-py + hiredis loop of pipelined XADD batches of 100 sending the same fields,
and ``redis-benchmark -P 16`` XADD (the server's own ceiling).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

import orjson
import redis.asyncio as aioredis

from bench.common import (
    CLIENT_CPU,
    STREAM,
    Figure,
    Stopwatch,
    Throughput,
    can_pin,
    flat_fields,
    median,
    order_message,
    throughput_figure,
)
from orderflow.bus.connection import connect
from orderflow.bus.message import Message
from orderflow.bus.streams import StreamPublisher

BATCH = 100
CASE = "publish"


async def _orderflow(redis: aioredis.Redis, messages: list[Message]) -> Throughput:
    # The default retention, as users run it: a trim check every 1000 entries.
    publisher = StreamPublisher(redis)
    with Stopwatch() as watch:
        for start in range(0, len(messages), BATCH):
            await publisher.publish_many(STREAM, messages[start : start + BATCH])
    return watch.throughput(len(messages))


async def _minimal(redis: aioredis.Redis, messages: list[Message]) -> Throughput:
    # What a careful hand-written producer does: encode the same fields, pipeline XADD.
    with Stopwatch() as watch:
        for start in range(0, len(messages), BATCH):
            pipe: Any = redis.pipeline(transaction=False)
            for message in messages[start : start + BATCH]:
                pipe.execute_command(
                    "XADD",
                    STREAM,
                    "*",
                    "data",
                    orjson.dumps(message.data, default=str),
                    *_header_args(message),
                )
            await pipe.execute()
    return watch.throughput(len(messages))


def _header_args(message: Message) -> list[str]:
    args: list[str] = []
    for key, value in message.headers.items():
        args += [key, value]
    return args


def _redis_benchmark(url_port: int, fields: list[bytes | str], count: int) -> float | None:
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return None
    command = [
        binary,
        "-h",
        "127.0.0.1",
        "-p",
        str(url_port),
        "-n",
        str(count),
        "-P",
        "16",
        "-c",
        "4",
        "--csv",
        "XADD",
        STREAM,
        "*",
        *(f.decode() if isinstance(f, bytes) else f for f in fields),
    ]
    if can_pin():
        command = ["taskset", "-c", str(CLIENT_CPU), *command]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120).stdout
    # CSV: a header, then "<command>","rps","avg_latency_ms", ... 5 more latencies. The
    # command is not escaped (the JSON's quotes break the CSV), so count from the end.
    numbers = re.findall(r'"([0-9.]+)"', out.strip().splitlines()[-1])
    return float(numbers[-7])


async def run(url: str, port: int, *, count: int, repeats: int) -> list[Figure]:
    """Publish ``count`` entries per contender, ``repeats`` times; the median rate."""
    redis = connect(url)
    messages = [order_message(i) for i in range(count)]
    rates: dict[str, list[Throughput]] = {"orderflow": [], "minimal": []}
    ceilings: list[float] = []
    try:
        for _ in range(repeats):
            for name, contender in (("orderflow", _orderflow), ("minimal", _minimal)):
                await redis.delete(STREAM)
                rates[name].append(await contender(redis, messages))
            await redis.delete(STREAM)
            ceiling = _redis_benchmark(port, flat_fields(messages[0]), count * 2)
            if ceiling is not None:
                ceilings.append(ceiling)
        await redis.delete(STREAM)
    finally:
        await redis.aclose()
    figures = [
        throughput_figure(CASE, "orderflow publish_many", rates["orderflow"]),
        throughput_figure(CASE, "minimal redis-py loop", rates["minimal"]),
    ]
    if ceilings:
        figures.append(
            Figure(
                CASE,
                "redis-benchmark -P 16",
                median(ceilings),
                "entries/s",
                note="4 connections, C client: the server's ceiling",
            )
        )
    else:
        figures.append(
            Figure(
                CASE,
                "redis-benchmark -P 16",
                float("nan"),
                "entries/s",
                note="redis-benchmark not found on PATH",
            )
        )
    return figures
