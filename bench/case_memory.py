"""Case 5: memory. Redis bytes per retained entry, and the worker's RSS over many entries.

Bytes per entry: ``used_memory`` before and after appending the same orders, once as
orderflow encodes them (``data`` plus the CloudEvents headers of wire format v1), once
as a raw single-field ``XADD orders * data <json>``, and in between, to show what each
header costs. Worker RSS: a ``StreamWorker`` in a child process handles ``rss_count``
entries with a no-op handler; its resident set is read at start, after a warm-up and
at the end.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from typing import Any, cast

import redis.asyncio as aioredis
from hiredis import pack_command

from bench.common import CLIENT_CPU, STREAM, Figure, can_pin, data_bytes
from orderflow.bus.connection import connect
from orderflow.bus.message import Message, encode

CASE = "memory"
GROUP = "rss"
CHUNK = 50_000
#: The entry share after which the worker counts as warm (caches, pools, metric children).
WARMUP = 0.1


def _fields(i: int, headers: Sequence[str], template: dict[str, bytes | str]) -> list[bytes]:
    """Entry ``i`` with ``data`` and the named wire-format headers, as orderflow encodes it.

    ``template`` is one encoded message; each entry gets its own ``ce_id`` and payload.
    Formatted from templates (the same bytes as ``data_bytes(i)`` and a UUID-shaped id
    per entry): a million entries are fed to the worker, so the feeding stays cheap.
    """
    flat = [b"data", _DATA % (100_000 + i, i)]
    for name in headers:
        value = _UUID % i if name == "ce_id" else template[name]
        flat += [name.encode(), value if isinstance(value, bytes) else value.encode()]
    return flat


#: ``data_bytes(i)`` as a template: only the order's id and email differ per entry.
_DATA = data_bytes(0).replace(b"100000", b"%d", 1).replace(b"customer0000000", b"customer%07d", 1)
#: Unique per entry, as long as ``str(uuid.uuid4())``.
_UUID = b"00000000-0000-4000-8000-%012x"
assert all(_DATA % (100_000 + i, i) == data_bytes(i) for i in (0, 7, 123_456))


def _template() -> dict[str, bytes | str]:
    return encode(Message.event("order.created", {}, source="orderflow/orders"))


def resp(commands: Iterable[Sequence[bytes]]) -> bytes:
    """Commands in the Redis protocol, for ``redis-cli --pipe`` (packed by hiredis, in C)."""
    return b"".join([pack_command(cast(Any, tuple(args))) for args in commands])


async def append(
    url: str, port: int, stream: str, entries: Iterable[Sequence[bytes]], redis: aioredis.Redis
) -> None:
    """XADD ``entries`` fast: through ``redis-cli --pipe`` when there is one."""
    commands = [[b"XADD", stream.encode(), b"*", *fields] for fields in entries]
    cli = shutil.which("redis-cli")
    if cli is not None:
        proc = await asyncio.create_subprocess_exec(
            cli,
            "-p",
            str(port),
            "--pipe",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        out, _ = await proc.communicate(resp(commands))
        if proc.returncode != 0 or b"errors: 0" not in out:
            raise RuntimeError(f"redis-cli --pipe failed: {out.decode(errors='replace')}")
        return
    for start in range(0, len(commands), 1000):
        pipe: Any = redis.pipeline(transaction=False)
        for command in commands[start : start + 1000]:
            pipe.execute_command(*command)
        await pipe.execute()


async def _used_memory(redis: aioredis.Redis) -> int:
    info: Any = await redis.info("memory")
    return int(info["used_memory"])


#: The variants measured, from a raw XADD to orderflow's full wire format.
VARIANTS: dict[str, tuple[str, ...]] = {
    "raw XADD (data only)": (),
    "data + ce_id": ("ce_id",),
    "data + ce_id + ce_time": ("ce_id", "ce_time"),
    # The headers orderflow's encoder actually writes (wire defaults left out).
    "orderflow wire format v1 (as encoded)": tuple(
        name
        for name in encode(Message.event("order.created", {}, source="orderflow/orders"))
        if name != "data"
    ),
}


async def bytes_per_entry(url: str, port: int, count: int) -> list[Figure]:
    """``used_memory`` growth per entry for each variant of the same ``count`` orders."""
    redis = connect(url)
    figures = []
    try:
        for name, headers in VARIANTS.items():
            await redis.flushall()
            template = _template()
            entries = [_fields(i, headers, template) for i in range(count)]
            wire = sum(len(f) for f in entries[0][1::2])
            before = await _used_memory(redis)
            await append(url, port, STREAM, entries, redis)
            assert await redis.xlen(STREAM) == count
            per_entry = (await _used_memory(redis) - before) / count
            figures.append(
                Figure(CASE, name, per_entry, "bytes/entry", note=f"{wire} bytes of values")
            )
        await redis.flushall()
    finally:
        await redis.aclose()
    return figures


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _consume(url: str, total: int, reports: Any) -> None:
    """The worker process: handle ``total`` entries, reporting (handled, RSS) per chunk."""
    if can_pin():
        os.sched_setaffinity(0, {CLIENT_CPU})
    from orderflow.bus import Delivery, StreamWorker, WorkerConfig

    async def main() -> None:
        redis = connect(url)
        handled = 0
        warm = max(1, int(total * WARMUP))

        async def handler(delivery: Delivery) -> None:
            nonlocal handled
            handled += 1
            if handled == warm:
                reports.put(("warm", handled, _rss()))
            if handled % CHUNK == 0 or handled == total:
                reports.put(("chunk", handled, _rss()))
            if handled == total:
                worker.stop()

        worker = StreamWorker(redis, WorkerConfig(stream=STREAM, group=GROUP), handler)
        reports.put(("start", 0, _rss()))
        await worker.run()
        await redis.aclose()
        reports.put(("end", handled, _rss()))

    asyncio.run(main())


async def worker_rss(url: str, port: int, total: int) -> list[Figure]:
    """Feed ``total`` entries in chunks to a worker process; its RSS at start, warm, end."""
    redis = connect(url)
    await redis.flushall()
    await redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    context = multiprocessing.get_context("spawn")
    reports = context.Queue()
    worker = context.Process(target=_consume, args=(url, total, reports), daemon=True)
    worker.start()
    points: dict[str, int] = {}
    started = time.perf_counter()
    try:
        kind, _, rss = await asyncio.to_thread(reports.get, True, 60)
        points[kind] = rss
        fed = handled = 0
        while handled < total:
            if fed < total:
                size = min(CHUNK, total - fed)
                template = _template()
                chunk = (_fields(fed + i, VARIANTS_FULL, template) for i in range(size))
                await append(url, port, STREAM, chunk, redis)
                fed += size
            # Feed ahead by one chunk at most, so Redis holds two chunks at most.
            while handled < min(total, fed - CHUNK) or (fed == total and handled < total):
                kind, count, rss = await asyncio.to_thread(reports.get, True, 120)
                points[kind] = rss
                handled = max(handled, count)
            # Every entry older than the last two chunks is handled: drop them.
            await redis.xtrim(STREAM, maxlen=2 * CHUNK)
        kind, _, rss = await asyncio.to_thread(reports.get, True, 60)
        points[kind] = rss
    finally:
        await asyncio.to_thread(worker.join, 30)
        await redis.flushall()
        await redis.aclose()
    seconds = time.perf_counter() - started
    growth = (points["end"] - points["warm"]) / points["warm"] * 100
    mib = 1024 * 1024
    return [
        Figure(
            CASE,
            f"worker RSS growth over {total:,} entries",
            growth,
            "% (warm to end)",
            note=(
                f"start {points['start'] / mib:.1f} MiB, warm ({int(total * WARMUP):,} entries) "
                f"{points['warm'] / mib:.1f} MiB, end {points['end'] / mib:.1f} MiB; "
                f"{total / seconds:,.0f} entries/s fed and handled"
            ),
            extra={
                "start_mib": points["start"] / mib,
                "warm_mib": points["warm"] / mib,
                "end_mib": points["end"] / mib,
                "growth_from_start_pct": (points["end"] - points["start"]) / points["start"] * 100,
            },
        )
    ]


VARIANTS_FULL = VARIANTS["orderflow wire format v1 (as encoded)"]


async def run(url: str, port: int, *, count: int, rss_count: int) -> list[Figure]:
    """Bytes per retained entry over ``count`` entries, then worker RSS over ``rss_count``."""
    return [*await bytes_per_entry(url, port, count), *await worker_rss(url, port, rss_count)]
