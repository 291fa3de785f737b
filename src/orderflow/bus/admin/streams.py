"""Which Redis streams a logical stream is made of, and where its dead letters are."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from orderflow.bus.admin.errors import OperationError
from orderflow.bus.entries import text as _text
from orderflow.bus.keys import DLQ_SUFFIX, StreamKeys
from orderflow.bus.partitions import recorded_layout, single_stream


def dead_letter_stream(stream: str) -> str:
    """The dead-letter stream of source ``stream``, or a ValueError for a bad name."""
    if stream.endswith(DLQ_SUFFIX):
        raise ValueError(
            f"{stream!r} names a dead-letter stream; "
            f"name its source stream instead ({stream[: -len(DLQ_SUFFIX)]!r})"
        )
    return StreamKeys(stream).dlq


async def stream_partitions(redis: aioredis.Redis, stream: str) -> list[str]:
    """The Redis streams that make up ``stream``, found from what Redis records; reads only.

    A name in braces (``{orders:3}``) is one Redis stream, as given. Otherwise the
    partition count recorded by the running components (:mod:`orderflow.bus.partitions`)
    gives the partitions; with none recorded, the stream is a single one: ``stream`` on
    a single server, ``{stream}`` on a cluster (so its dead letters share its slot).
    """
    StreamKeys(stream)
    if stream.startswith("{"):
        return [stream]
    layout = await recorded_layout(redis, stream)
    if layout is None:
        return [single_stream(redis, stream)]
    return layout.names


async def dead_letter_streams(redis: aioredis.Redis, stream: str) -> list[str]:
    """The dead-letter streams of source ``stream``, one per partition."""
    dead_letter_stream(stream)
    return [StreamKeys(name).dlq for name in await stream_partitions(redis, stream)]


def source_of(dlq: str) -> str:
    """The source stream of dead-letter stream ``dlq``."""
    return dlq[: -len(DLQ_SUFFIX)]


async def stream_length(redis: aioredis.Redis, key: str) -> int:
    """The length of stream ``key``; OperationError when it is not a stream."""
    try:
        return int(await redis.xlen(key))
    except ResponseError as exc:
        raise OperationError(f"key {key!r} is not a stream: {exc}") from None


def unique(ids: Any) -> list[str]:
    """``ids`` without repeats, in their first order."""
    return list(dict.fromkeys(ids))


def opt_text(value: object) -> str | None:
    """``value`` as text, None kept."""
    return None if value is None else _text(value)
