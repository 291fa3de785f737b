"""Partitioned streams: one logical stream spread over N Redis streams (Kafka-like).

Partition ``i`` of ``N`` of stream ``orders`` is the Redis stream ``{orders:i}``; its
dead letters are ``{orders:i}:dlq``, in the same Redis Cluster slot, so a worker's
dead-lettering stays one transaction. One partition on a single server keeps the
contract's plain names (``orders``, ``orders:dlq``); on a cluster even one partition is
hash-tagged (``{orders:0}``), because plain ``orders`` and ``orders:dlq`` would live in
two slots.

An entry's partition is ``crc32(key) % N`` of its key (an order id), so every event of
one order lands in one partition, in publish order.

How many partitions a stream has is recorded in Redis (``orderflow:partitions:{orders}``)
by the first component that needs more than the plain single stream, so that every
producer and consumer agrees; a different count is refused while any partition still
holds entries that a group has not acknowledged (see :func:`resolve_layout`).
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from orderflow.bus.keys import StreamKeys
from orderflow.bus.message import Message
from orderflow.bus.streams import Retention, StreamPublisher

log = logging.getLogger(__name__)

#: Partitions of a stream on a Redis Cluster when none are configured: two per master
#: of the usual 3-master cluster, so each master serves a share and a fourth to sixth
#: master can be added without re-partitioning.
DEFAULT_CLUSTER_PARTITIONS = 6
#: Most partitions a stream may have (each costs a blocking read per worker).
MAX_PARTITIONS = 1024


class PartitionCountError(RuntimeError):
    """The configured partition count differs from the recorded one and cannot change now."""


def is_cluster(redis: Any) -> bool:
    """Whether ``redis`` is a Redis Cluster client."""
    return isinstance(redis, RedisCluster)


def partition_of(key: Hashable, count: int) -> int:
    """The partition of ``key``: a stable hash (CRC-32 of its text), not Python's salted one."""
    if count < 1:
        raise ValueError(f"partition count must be at least 1, got {count}")
    return zlib.crc32(str(key).encode()) % count


def layout_key(stream: str) -> str:
    """The Redis key recording the partition count of ``stream``."""
    return f"orderflow:partitions:{{{stream}}}"


def single_stream(redis: Any, name: str) -> str:
    """The Redis name of an unpartitioned stream: hash-tagged on a cluster (``{name}``).

    The tag puts the stream and its dead letters (``{name}:dlq``) in one slot; on a
    single server the contract's plain name is kept.
    """
    if is_cluster(redis) and not name.startswith("{"):
        return f"{{{name}}}"
    return name


@dataclass(frozen=True, slots=True)
class PartitionLayout:
    """The partitions of one logical stream."""

    stream: str
    count: int
    #: Hash-tagged names even for one partition (always so on a cluster).
    tagged: bool = False

    def __post_init__(self) -> None:
        StreamKeys(self.stream)
        if not 1 <= self.count <= MAX_PARTITIONS:
            raise ValueError(f"partitions must be between 1 and {MAX_PARTITIONS}, got {self.count}")

    def keys(self, index: int) -> StreamKeys:
        """The keys of partition ``index``."""
        if self.tagged and self.count == 1:
            if index != 0:
                raise ValueError(f"partition {index} out of range for 1 partition")
            return StreamKeys(f"{{{self.stream}:0}}")
        return StreamKeys.partition(self.stream, index, self.count)

    @property
    def names(self) -> list[str]:
        """The Redis stream of every partition, in partition order."""
        return [self.keys(i).stream for i in range(self.count)]

    @property
    def plain(self) -> bool:
        """Whether this is the contract's single plain stream."""
        return self.count == 1 and not self.tagged

    def for_key(self, key: Hashable) -> str:
        """The Redis stream that entries keyed ``key`` go to."""
        return self.keys(partition_of(key, self.count)).stream


async def _recorded(redis: Any, stream: str) -> int | None:
    raw = await redis.get(layout_key(stream))
    if raw is None:
        return None
    return int(raw)


async def recorded_layout(redis: aioredis.Redis, stream: str) -> PartitionLayout | None:
    """The partitions of ``stream`` as recorded in Redis, or None when none are; writes nothing.

    For operator commands, which must find the partitions without being told the count
    and must not record one themselves.
    """
    recorded = await _recorded(redis, stream)
    if recorded is None:
        return None
    return PartitionLayout(stream, recorded, tagged=is_cluster(redis))


async def resolve_layout(
    redis: aioredis.Redis, stream: str, requested: int | None = None
) -> PartitionLayout:
    """The partitions of ``stream``, agreed with every other component through Redis.

    ``requested`` None adopts the recorded count, else the default (1 on a single
    server, :data:`DEFAULT_CLUSTER_PARTITIONS` on a cluster). A requested count that
    differs from the recorded one (on a single server with none recorded: the plain
    stream) replaces it only if no group has unfinished entries (pending or not yet
    read) in the old partitions and no old partition that the new count drops holds
    dead letters (the operator commands would no longer find them); else
    :class:`PartitionCountError`.
    """
    cluster = is_cluster(redis)
    recorded = await _recorded(redis, stream)
    default = DEFAULT_CLUSTER_PARTITIONS if cluster else 1
    if recorded is None:
        count = requested or default
        layout = PartitionLayout(stream, count, tagged=cluster)
        if layout.plain:
            # The single-server default writes nothing: the contract's plain stream.
            return layout
        if not cluster:
            # Until now the contract's plain stream: split only once it is drained.
            await _check_change(redis, PartitionLayout(stream, 1), layout)
        if await redis.set(layout_key(stream), count, nx=True):
            log.info("stream %s: %d partitions recorded", stream, count)
            return layout
        recorded = await _recorded(redis, stream)
        assert recorded is not None
    if requested is None or requested == recorded:
        return PartitionLayout(stream, recorded, tagged=cluster)
    old = PartitionLayout(stream, recorded, tagged=cluster)
    await _check_change(redis, old, PartitionLayout(stream, requested, tagged=cluster))
    await redis.set(layout_key(stream), requested)
    log.warning("stream %s: partitions changed from %d to %d", stream, recorded, requested)
    return PartitionLayout(stream, requested, tagged=cluster)


async def _check_change(redis: aioredis.Redis, old: PartitionLayout, new: PartitionLayout) -> None:
    """Raise PartitionCountError unless ``old`` may be replaced by ``new`` now."""
    try:
        left = await unfinished(redis, old)
        stranded = await stranded_dead_letters(redis, old, new)
    except ResponseError as exc:
        if not str(exc).startswith("NOPERM"):
            raise
        # A user allowed to publish but not to inspect groups: do not refuse to start.
        log.warning(
            "stream %s: cannot check it is drained before re-partitioning: %s", old.stream, exc
        )
        return
    if not left and not stranded:
        return
    problems = []
    if left:
        problems.append(f"{left} entries are unacknowledged or unread")
    if stranded:
        problems.append(f"{stranded} dead letters are in partitions that would be dropped")
    was = "is one plain stream" if old.plain else f"has {old.count} partitions"
    raise PartitionCountError(
        f"stream {old.stream!r} {was}, not {new.count}: refusing to change while "
        f"{' and '.join(problems)}; stop the producers, let the workers drain every "
        f"partition (`orderflow streams info`), replay or purge the dead letters "
        f"(`orderflow dlq`), then start with ORDERFLOW_PARTITIONS={new.count}"
    )


async def stranded_dead_letters(
    redis: aioredis.Redis, old: PartitionLayout, new: PartitionLayout
) -> int:
    """Dead letters in partitions of ``old`` that ``new`` has not (found by no command)."""
    kept = {new.keys(i).dlq for i in range(new.count)}
    total = 0
    for index in range(old.count):
        dlq = old.keys(index).dlq
        if dlq not in kept:
            total += int(await redis.xlen(dlq))
    return total


async def unfinished(redis: aioredis.Redis, layout: PartitionLayout) -> int:
    """Entries of ``layout`` some group has not acknowledged or not yet read."""
    total = 0
    for name in layout.names:
        try:
            groups = await redis.xinfo_groups(name)
        except ResponseError as exc:
            if "no such key" in str(exc).lower():
                continue
            raise
        for group in groups:
            total += int(group.get("pending") or 0)
            lag = group.get("lag")
            if lag is None:
                # Unknown lag (Redis 6.2 never reports it; 7.0+ not after deletions in
                # between): count what is after the group's last delivered entry.
                last = group["last-delivered-id"]
                after = "(" + (last.decode() if isinstance(last, bytes) else str(last))
                unread = await redis.xrange(name, min=after, max="+", count=_UNREAD_LIMIT)
                total += len(unread or [])
            else:
                total += int(lag)
    return total


#: Most unread entries counted per group when Redis does not report the lag (the count
#: only has to tell zero from some).
_UNREAD_LIMIT = 10_000


class PartitionedPublisher:
    """Publishes keyed messages to their partitions: one pipeline per partition, in parallel."""

    def __init__(self, redis: aioredis.Redis, *, retention: Retention | None = None) -> None:
        self.publisher = StreamPublisher(redis, retention=retention)

    async def publish_keyed(
        self, layout: PartitionLayout, items: Sequence[tuple[Hashable, Message]]
    ) -> list[str]:
        """Append each message to its key's partition; returns entry ids in input order.

        Messages of one partition keep their relative order (one ordered pipeline);
        partitions are written concurrently, on a cluster to different masters.
        """
        by_stream: dict[str, list[int]] = {}
        for position, (key, _) in enumerate(items):
            by_stream.setdefault(layout.for_key(key), []).append(position)
        streams = list(by_stream)
        replies = await asyncio.gather(
            *(
                self.publisher.publish_many(name, [items[i][1] for i in by_stream[name]])
                for name in streams
            )
        )
        ids = [""] * len(items)
        for name, entry_ids in zip(streams, replies, strict=True):
            for position, entry_id in zip(by_stream[name], entry_ids, strict=True):
                ids[position] = entry_id
        return ids
