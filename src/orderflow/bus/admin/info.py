"""What a stream, its groups and consumers look like now (``streams info``, console, metrics).

Pure async functions over a ``redis.asyncio`` client (bytes responses), shared by the
CLI (``orderflow streams|dlq|group``) and usable from a web console or metrics. They
know nothing of orders or email; bad arguments raise ``ValueError`` before anything
changes, a missing group raises :class:`NoSuchGroup`.

JSON shape of :func:`stream_info` (``StreamInfo.to_json()``; stable keys, times in ms)::

    {
      "name": "orders", "exists": true, "length": 3, "memory_bytes": 2104,
      "first_entry_id": "1700000000000-0", "last_entry_id": "1700000000002-0",
      "last_generated_id": "1700000000002-0", "entries_added": 3,
      "dead_letter_stream": "orders:dlq", "dead_letters": 1,
      "groups": [{
        "name": "email-service", "pending": 1, "last_delivered_id": "1700000000002-0",
        "entries_read": 3, "lag": 0,
        "lag_source": "redis",          # redis | counted | at-least | unknown
        "oldest_pending_id": "1700000000001-0", "oldest_pending_age_ms": 5123,
        "oldest_pending_idle_ms": 812, "oldest_pending_consumer": "host-1-ab12cd",
        "oldest_pending_deliveries": 2,
        "consumers": [{"name": "host-1-ab12cd", "pending": 1, "idle_ms": 812,
                       "inactive_ms": null}]
      }]
    }

``lag`` is Redis's own (``XINFO GROUPS``, Redis 7+). When Redis cannot tell (older
servers, or after deletions or a ``group reset``), it is counted on the server up to
:data:`LAG_COUNT_LIMIT` entries (``counted``), or reported as that many at least
(``at-least``); ``unknown`` (``lag`` null) only when even that failed. The age of the
oldest pending entry is measured from the time in its id (when it was added), against
the Redis server's clock; its idle time is since its last delivery.

Partitions. Every operation takes a stream's logical name (``orders``) and finds the
Redis streams it is made of from what is recorded in Redis (:func:`stream_partitions`):
its partitions ``{orders:0}`` … when a partition count is recorded, else the single
stream (``orders``; ``{orders}`` on a cluster). A name in braces (``{orders:3}``) names
one Redis stream, as given. A stream of more than one partition is described by the
sum over its partitions, with each partition under ``partitions`` (empty for a single
stream)::

    {
      "name": "orders", "exists": true, "length": 9, ...,   # sums (see below)
      "dead_letter_stream": "orders:dlq", "dead_letters": 2,
      "groups": [{"name": "email-service", "pending": 3, "lag": 4, ...}],
      "partitions": [{"name": "{orders:0}", "dead_letter_stream": "{orders:0}:dlq",
                      "partitions": [], ...}, ...]
    }

In the sum: ``length``, ``memory_bytes``, ``entries_added`` and ``dead_letters`` add up;
``first_entry_id`` is the oldest first entry, ``last_entry_id`` and
``last_generated_id`` the newest; ``dead_letter_stream`` is the logical name (the real
keys are each partition's). A group is summed over the partitions where it exists:
``pending``, ``entries_read`` and ``lag`` add up (``lag`` null when one partition's is
unknown; ``lag_source`` the least exact); ``last_delivered_id`` is the newest; the oldest
pending entry (id, age, idle, consumer, deliveries) is the oldest of every partition;
consumers are merged by name (``pending`` added up, ``idle_ms`` and ``inactive_ms`` the
least). Dead letters of every partition are listed, replayed (each back to its own
partition) and purged together; a group reset moves the group on every partition.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from orderflow.bus.admin.errors import OperationError
from orderflow.bus.admin.ids import id_ms, newest_id, oldest_id, server_time_ms
from orderflow.bus.admin.streams import opt_text, stream_length, stream_partitions
from orderflow.bus.entries import id_key as _id_key
from orderflow.bus.entries import text as _text
from orderflow.bus.keys import StreamKeys

#: Most entries counted on the server when Redis does not report a group's lag.
LAG_COUNT_LIMIT = 10_000

# Counts a group's undelivered entries when Redis does not report its lag, on the
# server, so no entry travels over the network; bounded, so Redis is never busy long.
_COUNT_AFTER_SCRIPT = """
return #redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', tonumber(ARGV[2]))
"""


@dataclass(frozen=True, slots=True)
class ConsumerInfo:
    """One consumer of a group."""

    name: str
    pending: int
    idle_ms: int
    #: Since its last successful read (Redis 7.2+), else None.
    inactive_ms: int | None


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """One consumer group of a stream, with what it still has to do."""

    name: str
    pending: int
    last_delivered_id: str
    entries_read: int | None
    lag: int | None
    lag_source: str
    oldest_pending_id: str | None
    oldest_pending_age_ms: int | None
    oldest_pending_idle_ms: int | None
    oldest_pending_consumer: str | None
    oldest_pending_deliveries: int | None
    consumers: list[ConsumerInfo] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """One stream: its size, bounds, groups and dead letters."""

    name: str
    exists: bool
    length: int
    memory_bytes: int | None
    first_entry_id: str | None
    last_entry_id: str | None
    last_generated_id: str | None
    entries_added: int | None
    dead_letter_stream: str
    dead_letters: int
    groups: list[GroupInfo] = field(default_factory=list)
    #: Each partition of a stream of several partitions; empty for a single stream.
    partitions: list[StreamInfo] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The stable JSON form documented in this module's docstring."""
        return asdict(self)


async def stream_info(redis: aioredis.Redis, streams: Sequence[str]) -> list[StreamInfo]:
    """Describe each stream; a missing stream is reported with ``exists`` false.

    A stream of several partitions is their sum, each partition in ``partitions``; a
    single stream is reported under its Redis name (``{email-events}`` on a cluster).
    Raises ValueError for a bad stream name, OperationError for a key that is not a stream.
    """
    for name in streams:
        StreamKeys(name)
    now_ms = await server_time_ms(redis)
    infos = []
    for name in streams:
        parts = await stream_partitions(redis, name)
        described = await asyncio.gather(*(_one_stream_info(redis, part, now_ms) for part in parts))
        infos.append(described[0] if len(parts) == 1 else _summed_stream(name, described))
    return infos


async def _one_stream_info(redis: aioredis.Redis, name: str, now_ms: int) -> StreamInfo:
    dlq = StreamKeys(name).dlq
    kind = _text(await redis.type(name))
    dead_letters = await stream_length(redis, dlq)
    if kind == "none":
        return StreamInfo(name, False, 0, None, None, None, None, None, dlq, dead_letters)
    if kind != "stream":
        raise OperationError(f"key {name!r} is a {kind}, not a stream")
    info: Mapping[str, Any] = await redis.xinfo_stream(name)
    memory = await redis.memory_usage(name)
    groups = [
        await _group_info(redis, name, group, now_ms) for group in await redis.xinfo_groups(name)
    ]
    first, last = info.get("first-entry"), info.get("last-entry")
    added = info.get("entries-added")
    return StreamInfo(
        name=name,
        exists=True,
        length=int(info["length"]),
        memory_bytes=int(memory) if memory is not None else None,
        first_entry_id=_text(first[0]) if first else None,
        last_entry_id=_text(last[0]) if last else None,
        last_generated_id=opt_text(info.get("last-generated-id")),
        entries_added=int(added) if added is not None else None,
        dead_letter_stream=dlq,
        dead_letters=dead_letters,
        groups=groups,
    )


#: Lag sources from the most exact to the least.
_LAG_SOURCES = ("redis", "counted", "at-least", "unknown")


def _summed_stream(name: str, parts: list[StreamInfo]) -> StreamInfo:
    existing = [p for p in parts if p.exists]
    memory = [p.memory_bytes for p in existing if p.memory_bytes is not None]
    added = [p.entries_added for p in existing if p.entries_added is not None]
    groups: dict[str, list[GroupInfo]] = {}
    for part in existing:
        for group in part.groups:
            groups.setdefault(group.name, []).append(group)
    return StreamInfo(
        name=name,
        exists=bool(existing),
        length=sum(p.length for p in existing),
        memory_bytes=sum(memory) if memory else None,
        first_entry_id=oldest_id(p.first_entry_id for p in existing),
        last_entry_id=newest_id(p.last_entry_id for p in existing),
        last_generated_id=newest_id(p.last_generated_id for p in existing),
        entries_added=sum(added) if existing and len(added) == len(existing) else None,
        dead_letter_stream=StreamKeys(name).dlq,
        dead_letters=sum(p.dead_letters for p in parts),
        groups=[_summed_group(group, same) for group, same in groups.items()],
        partitions=parts,
    )


def _summed_group(name: str, same: list[GroupInfo]) -> GroupInfo:
    lags = [g.lag for g in same if g.lag is not None]
    reads = [g.entries_read for g in same if g.entries_read is not None]
    with_pending = [g for g in same if g.oldest_pending_id is not None]
    oldest = min(with_pending, key=lambda g: _id_key(g.oldest_pending_id or "0"), default=None)
    consumers: dict[str, ConsumerInfo] = {}
    for consumer in (c for g in same for c in g.consumers):
        seen = consumers.get(consumer.name)
        if seen is None:
            consumers[consumer.name] = consumer
            continue
        inactive = [v for v in (seen.inactive_ms, consumer.inactive_ms) if v is not None]
        consumers[consumer.name] = ConsumerInfo(
            name=consumer.name,
            pending=seen.pending + consumer.pending,
            idle_ms=min(seen.idle_ms, consumer.idle_ms),
            inactive_ms=min(inactive) if inactive else None,
        )
    lag = sum(lags) if len(lags) == len(same) else None
    return GroupInfo(
        name=name,
        pending=sum(g.pending for g in same),
        last_delivered_id=newest_id(g.last_delivered_id for g in same) or "0-0",
        entries_read=sum(reads) if len(reads) == len(same) else None,
        lag=lag,
        lag_source="unknown"
        if lag is None
        else max((g.lag_source for g in same), key=_LAG_SOURCES.index),
        oldest_pending_id=oldest.oldest_pending_id if oldest else None,
        oldest_pending_age_ms=oldest.oldest_pending_age_ms if oldest else None,
        oldest_pending_idle_ms=oldest.oldest_pending_idle_ms if oldest else None,
        oldest_pending_consumer=oldest.oldest_pending_consumer if oldest else None,
        oldest_pending_deliveries=oldest.oldest_pending_deliveries if oldest else None,
        consumers=list(consumers.values()),
    )


async def _group_info(
    redis: aioredis.Redis, stream: str, group: Mapping[str, Any], now_ms: int
) -> GroupInfo:
    name = _text(group["name"])
    last_delivered = _text(group["last-delivered-id"])
    lag, lag_source = await group_lag(redis, stream, group, last_delivered)
    summary = await redis.xpending(stream, name)
    oldest_id = opt_text(summary.get("min"))
    age = idle = deliveries = None
    owner = None
    if oldest_id is not None:
        age = max(0, now_ms - id_ms(oldest_id))
        rows = await redis.xpending_range(stream, name, min=oldest_id, max=oldest_id, count=1)
        if rows:
            idle = int(rows[0]["time_since_delivered"])
            owner = _text(rows[0]["consumer"])
            deliveries = int(rows[0]["times_delivered"])
    consumers = [
        ConsumerInfo(
            name=_text(c["name"]),
            pending=int(c["pending"]),
            idle_ms=int(c["idle"]),
            inactive_ms=int(c["inactive"]) if c.get("inactive") is not None else None,
        )
        for c in await redis.xinfo_consumers(stream, name)
    ]
    entries_read = group.get("entries-read")
    return GroupInfo(
        name=name,
        pending=int(group["pending"]),
        last_delivered_id=last_delivered,
        entries_read=int(entries_read) if entries_read is not None else None,
        lag=lag,
        lag_source=lag_source,
        oldest_pending_id=oldest_id,
        oldest_pending_age_ms=age,
        oldest_pending_idle_ms=idle,
        oldest_pending_consumer=owner,
        oldest_pending_deliveries=deliveries,
        consumers=consumers,
    )


async def group_lag(
    redis: aioredis.Redis, stream: str, group: Mapping[str, Any], last_delivered: str
) -> tuple[int | None, str]:
    """Entries of ``stream`` after ``last_delivered`` for ``group``, and how that was
    known (Redis's own lag, counted on the server, a lower bound, or unknown)."""
    reported = group.get("lag")
    if reported is not None:
        return int(reported), "redis"
    try:
        counted = int(
            await cast(Any, redis).eval(
                _COUNT_AFTER_SCRIPT, 1, stream, last_delivered, LAG_COUNT_LIMIT
            )
        )
    except ResponseError:
        # Scripting disabled or refused (e.g. a restricted ACL user): say we do not know.
        return None, "unknown"
    return counted, "at-least" if counted >= LAG_COUNT_LIMIT else "counted"
