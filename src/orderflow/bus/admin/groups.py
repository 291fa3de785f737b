"""Moving a consumer group: reset it to an id, a time, the beginning or the end."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from orderflow.bus.admin.errors import NoSuchGroup, OperationError, PositionAfterEnd
from orderflow.bus.admin.ids import Position, server_time_ms
from orderflow.bus.admin.info import group_lag
from orderflow.bus.admin.streams import stream_partitions
from orderflow.bus.entries import id_key as _id_key
from orderflow.bus.entries import text as _text
from orderflow.bus.keys import StreamKeys


@dataclass(frozen=True, slots=True)
class GroupReset:
    """A group moved on one Redis stream: where it was, where it is, what stays pending."""

    stream: str
    group: str
    previous_id: str
    new_id: str
    pending: int
    lag: int | None


@dataclass(frozen=True, slots=True)
class GroupResets:
    """A group moved on every partition of a stream (one reset for a single stream)."""

    stream: str
    group: str
    resets: list[GroupReset]
    #: Partitions where the group does not exist (yet): left as they are.
    missing: list[str] = field(default_factory=list)

    @property
    def pending(self) -> int:
        """Entries still pending, over every partition."""
        return sum(r.pending for r in self.resets)

    @property
    def lag(self) -> int | None:
        """Entries to deliver after the reset, over every partition; None if unknown."""
        lags = [r.lag for r in self.resets if r.lag is not None]
        return sum(lags) if len(lags) == len(self.resets) else None


async def reset_group(
    redis: aioredis.Redis, stream: str, group: str, position: Position
) -> GroupResets:
    """Set the group's last delivered id (``XGROUP SETID``) on every partition of ``stream``.

    Pending entries stay pending. Everything is checked before anything moves: raises
    NoSuchGroup when the group exists on no partition (or the single stream), ValueError
    when the position is past the newest entry of every partition. An entry id or time
    past one partition's newest entry (but not every partition's) puts that partition's
    group at its newest entry. Partitions move one after the other, not atomically.
    """
    StreamKeys(stream)
    parts = await stream_partitions(redis, stream)
    found: list[tuple[str, Mapping[str, Any]]] = []
    missing: list[str] = []
    for name in parts:
        try:
            found.append((name, await _find_group(redis, name, group)))
        except NoSuchGroup:
            if len(parts) == 1:
                raise
            missing.append(name)
    if not found:
        raise NoSuchGroup(f"no group {group!r} on any of the {len(parts)} partitions of {stream!r}")
    targets = await _reset_targets(redis, stream, [name for name, _ in found], position)
    resets = [
        await _move_group(redis, name, group, before, target)
        for (name, before), target in zip(found, targets, strict=True)
    ]
    return GroupResets(stream, group, resets, missing)


async def _reset_targets(
    redis: aioredis.Redis, stream: str, names: Sequence[str], position: Position
) -> list[str]:
    target = position.id
    if target in ("0", "$"):
        return [target] * len(names)
    infos: list[Mapping[str, Any]] = [await redis.xinfo_stream(name) for name in names]
    newest_each = [_text(info["last-generated-id"]) for info in infos]
    newest = max(newest_each, key=_id_key)
    if _id_key(target) > _id_key(newest):
        # Redis accepts an id past the stream's end, and the group would then skip
        # every entry added until that id's time: refuse it (a past time past the
        # newest entry is the end, as Kafka clamps offsets).
        now_ms = await server_time_ms(redis)
        if position.time_ms is None or position.time_ms > now_ms:
            where = stream if len(names) == 1 else f"any partition of {stream}"
            raise PositionAfterEnd(
                f"{position.description} is after the newest entry of {where!r} "
                f"({newest}); use 'end' to skip to the end"
            )
    # Past a partition's own newest entry (but in the past): that partition's end.
    return [min(target, last, key=_id_key) for last in newest_each]


async def _move_group(
    redis: aioredis.Redis, stream: str, group: str, before: Mapping[str, Any], target: str
) -> GroupReset:
    try:
        await redis.xgroup_setid(stream, group, target)
    except ResponseError as exc:
        if str(exc).startswith("NOGROUP"):
            raise NoSuchGroup(f"no group {group!r} on stream {stream!r}") from None
        raise OperationError(f"Redis refused to move group {group!r}: {exc}") from None
    after = await _find_group(redis, stream, group)
    new_id = _text(after["last-delivered-id"])
    lag, _source = await group_lag(redis, stream, after, new_id)
    return GroupReset(
        stream=stream,
        group=group,
        previous_id=_text(before["last-delivered-id"]),
        new_id=new_id,
        pending=int(after["pending"]),
        lag=lag,
    )


async def _find_group(redis: aioredis.Redis, stream: str, group: str) -> Mapping[str, Any]:
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError as exc:
        if "no such key" in str(exc).lower():
            raise NoSuchGroup(f"no stream {stream!r}, so no group {group!r} on it") from None
        raise OperationError(f"cannot read the groups of {stream!r}: {exc}") from None
    for info in groups:
        if _text(info["name"]) == group:
            return cast(Mapping[str, Any], info)
    names = ", ".join(_text(g["name"]) for g in groups) or "none"
    raise NoSuchGroup(f"no group {group!r} on stream {stream!r} (groups: {names})")
