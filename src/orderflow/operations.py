"""Operator operations on the bus: inspect streams, steer dead letters and consumer groups.

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
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from orderflow.bus.entries import DLQ_FIELD_PREFIX
from orderflow.bus.entries import id_key as _id_key
from orderflow.bus.entries import text as _text
from orderflow.bus.keys import DLQ_SUFFIX, StreamKeys
from orderflow.bus.partitions import recorded_layout, single_stream

#: Most entries counted on the server when Redis does not report a group's lag.
LAG_COUNT_LIMIT = 10_000
#: Dead letters read and replayed per round trip.
BATCH_SIZE = 100
#: Largest value of either part of a stream entry id.
MAX_ID_PART = 2**64 - 1

_ID_RE = re.compile(r"^(\d+)-(\d+)$")
#: The last millisecond of the year 9999, the latest time a position may name.
_MAX_TIME_MS = 253_402_300_799_999

# Counts a group's undelivered entries when Redis does not report its lag, on the
# server, so no entry travels over the network; bounded, so Redis is never busy long.
_COUNT_AFTER_SCRIPT = """
return #redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', tonumber(ARGV[2]))
"""

# Moves one dead letter back to its source stream: XADD its original fields (those
# with the dead-letter prefix ARGV[2] stripped) and XDEL it, in one atomic step, after
# checking it is still there. So a crash never loses or doubles it, and neither do two
# concurrent replays.
# Returns the new entry id, or false when the dead letter is gone.
_REPLAY_SCRIPT = """
local rows = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #rows == 0 then return false end
local fields = rows[1][2]
local original = {}
for i = 1, #fields, 2 do
  if string.sub(fields[i], 1, #ARGV[2]) ~= ARGV[2] then
    table.insert(original, fields[i])
    table.insert(original, fields[i + 1])
  end
end
if #original == 0 then
  return redis.error_reply('ERR dead letter ' .. ARGV[1] .. ' has no original fields')
end
local id = redis.call('XADD', KEYS[2], '*', unpack(original))
redis.call('XDEL', KEYS[1], ARGV[1])
return id
"""


class OperationError(RuntimeError):
    """An operation that cannot be done on the current state of Redis."""


class NoSuchGroup(OperationError):
    """The consumer group (or its stream) does not exist."""


class AmbiguousDeadLetter(OperationError):
    """A dead-letter id found in more than one partition: the operator must name one."""


# -- ids, positions and names ----------------------------------------------------------


def parse_entry_id(text: str) -> str:
    """A full stream entry id ``<ms>-<seq>``, normalised, or a ValueError saying why."""
    match = _ID_RE.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a stream entry id (<milliseconds>-<sequence>)")
    ms, seq = int(match[1]), int(match[2])
    if ms > MAX_ID_PART or seq > MAX_ID_PART:
        raise ValueError(f"{text!r} is out of range for a stream entry id")
    return f"{ms}-{seq}"


@dataclass(frozen=True, slots=True)
class Position:
    """Where a group reset puts a group: the id given to ``XGROUP SETID``."""

    #: ``0``, ``$`` or an entry id; entries after it are delivered next.
    id: str
    #: What the operator asked for, for messages.
    description: str
    #: The time asked for (epoch ms), when the position is a time.
    time_ms: int | None = None


def parse_position(text: str) -> Position:
    """``beginning``, ``end``, an entry id, or a time (ISO-8601, naive = UTC, or epoch ms).

    A time becomes the id just before the first entry at that millisecond, so the
    entries added at or after that time are delivered again.
    """
    value = text.strip()
    if value == "beginning":
        return Position("0", "the beginning of the stream")
    if value == "end":
        return Position("$", "the end of the stream (only new entries)")
    if _ID_RE.match(value):
        try:
            entry_id = parse_entry_id(value)
        except ValueError as exc:
            raise ValueError(f"--to {exc}") from None
        return Position(entry_id, f"entry {entry_id}")
    if value.isdigit():
        ms = int(value)
    else:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(
                f"--to {text!r} is not an entry id (<milliseconds>-<sequence>), "
                "a time (ISO-8601 or epoch milliseconds), 'beginning' or 'end'"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        ms = round(moment.timestamp() * 1000)
        if ms < 0:
            raise ValueError(f"--to {text!r} is before 1970, when stream ids begin")
    if ms > _MAX_TIME_MS:
        raise ValueError(f"--to {text!r} is after the year 9999")
    when = _format_time(ms)
    if ms == 0:
        return Position("0", f"time {when}", ms)
    return Position(f"{ms - 1}-{MAX_ID_PART}", f"time {when}", ms)


def dead_letter_stream(stream: str) -> str:
    """The dead-letter stream of source ``stream``, or a ValueError for a bad name."""
    if stream.endswith(DLQ_SUFFIX):
        raise ValueError(
            f"--stream {stream!r} names a dead-letter stream; "
            f"name its source stream instead ({stream[: -len(DLQ_SUFFIX)]!r})"
        )
    return StreamKeys(stream).dlq


# -- partitions ------------------------------------------------------------------------


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


def _source_of(dlq: str) -> str:
    return dlq[: -len(DLQ_SUFFIX)]


# -- stream info -----------------------------------------------------------------------


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
    now_ms = await _server_time_ms(redis)
    infos = []
    for name in streams:
        parts = await stream_partitions(redis, name)
        described = await asyncio.gather(*(_one_stream_info(redis, part, now_ms) for part in parts))
        infos.append(described[0] if len(parts) == 1 else _summed_stream(name, described))
    return infos


async def _one_stream_info(redis: aioredis.Redis, name: str, now_ms: int) -> StreamInfo:
    dlq = StreamKeys(name).dlq
    kind = _text(await redis.type(name))
    dead_letters = await _stream_length(redis, dlq)
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
        last_generated_id=_opt_text(info.get("last-generated-id")),
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
        first_entry_id=_oldest_id(p.first_entry_id for p in existing),
        last_entry_id=_newest_id(p.last_entry_id for p in existing),
        last_generated_id=_newest_id(p.last_generated_id for p in existing),
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
        last_delivered_id=_newest_id(g.last_delivered_id for g in same) or "0-0",
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


def _oldest_id(ids: Iterable[str | None]) -> str | None:
    return min((i for i in ids if i is not None), key=_id_key, default=None)


def _newest_id(ids: Iterable[str | None]) -> str | None:
    return max((i for i in ids if i is not None), key=_id_key, default=None)


async def _group_info(
    redis: aioredis.Redis, stream: str, group: Mapping[str, Any], now_ms: int
) -> GroupInfo:
    name = _text(group["name"])
    last_delivered = _text(group["last-delivered-id"])
    lag, lag_source = await _lag(redis, stream, group, last_delivered)
    summary = await redis.xpending(stream, name)
    oldest_id = _opt_text(summary.get("min"))
    age = idle = deliveries = None
    owner = None
    if oldest_id is not None:
        age = max(0, now_ms - _id_ms(oldest_id))
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


async def _lag(
    redis: aioredis.Redis, stream: str, group: Mapping[str, Any], last_delivered: str
) -> tuple[int | None, str]:
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


# -- dead letters ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead letter: where it is, why it failed, and the original entry's fields."""

    id: str
    #: The Redis stream holding it (a partition's own on a partitioned stream).
    dead_letter_stream: str
    source_stream: str | None
    source_id: str | None
    group: str | None
    consumer: str | None
    reason: str | None
    deliveries: int | None
    time: str | None
    #: The original fields (``dlq_*`` stripped); bytes that are not UTF-8 are escaped.
    fields: dict[str, str]

    @property
    def preview(self) -> str:
        """A short, printable view of the payload (``data``, else all fields)."""
        body = self.fields.get("data")
        if body is None:
            body = " ".join(f"{k}={v}" for k, v in self.fields.items())
        return preview(body)

    def to_json(self) -> dict[str, Any]:
        """A JSON object with every attribute and the preview."""
        return {**asdict(self), "preview": self.preview}


@dataclass(frozen=True, slots=True)
class DeadLetterCount:
    """How many dead letters one partition's dead-letter stream holds."""

    dead_letter_stream: str
    total: int


@dataclass(frozen=True, slots=True)
class DeadLetterPage:
    """The first dead letters of a stream, and how many there are in all.

    For a stream of several partitions, ``dead_letter_stream`` is the logical name,
    ``entries`` the oldest of every partition merged (by id, so by time) and
    ``partitions`` each partition's count; ``partitions`` is empty for a single stream.
    """

    stream: str
    dead_letter_stream: str
    total: int
    entries: list[DeadLetter]
    partitions: list[DeadLetterCount] = field(default_factory=list)


async def list_dead_letters(
    redis: aioredis.Redis, stream: str, *, limit: int = 20
) -> DeadLetterPage:
    """The oldest ``limit`` dead letters of source ``stream``, over all its partitions."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    dlqs = await dead_letter_streams(redis, stream)
    totals = await asyncio.gather(*(_stream_length(redis, dlq) for dlq in dlqs))
    rows: list[tuple[str, bytes, Mapping[bytes, bytes]]] = []
    for dlq, total in zip(dlqs, totals, strict=True):
        if total:
            found: Any = await redis.xrange(dlq, "-", "+", count=limit)
            rows.extend((dlq, raw_id, fields) for raw_id, fields in found)
    # Stable: dead letters with the same id in two partitions stay in partition order.
    rows.sort(key=lambda row: _id_key(_text(row[1])))
    entries = [_dead_letter(dlq, raw_id, fields) for dlq, raw_id, fields in rows[:limit]]
    if len(dlqs) == 1:
        return DeadLetterPage(stream, dlqs[0], totals[0], entries)
    counts = [DeadLetterCount(d, t) for d, t in zip(dlqs, totals, strict=True)]
    return DeadLetterPage(stream, StreamKeys(stream).dlq, sum(totals), entries, counts)


@dataclass(slots=True)
class ReplayResult:
    """What a replay did: dead-letter id → new id in its source stream, and what failed.

    ``count`` is how many moved; on a partitioned stream two partitions may hold a dead
    letter of the same id, which ``replayed`` then shows once.
    """

    replayed: dict[str, str] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    count: int = 0


ProgressCallback = Callable[[int], None]


async def count_dead_letters(redis: aioredis.Redis, stream: str) -> int:
    """How many dead letters source ``stream`` has, over all its partitions."""
    dlqs = await dead_letter_streams(redis, stream)
    return sum(await asyncio.gather(*(_stream_length(redis, dlq) for dlq in dlqs)))


async def dead_letter_snapshot(redis: aioredis.Redis, stream: str) -> dict[str, str]:
    """The newest dead letter of each dead-letter stream of ``stream`` that has one: the
    bound that ``purge_all_dead_letters(snapshot=…)`` keeps to."""
    snapshot = {}
    for dlq in await dead_letter_streams(redis, stream):
        newest: Any = await redis.xrevrange(dlq, "+", "-", count=1)
        if newest:
            snapshot[dlq] = _text(newest[0][0])
    return snapshot


async def replay_dead_letters(
    redis: aioredis.Redis,
    stream: str,
    ids: Sequence[str] | None,
    *,
    progress: ProgressCallback | None = None,
) -> ReplayResult:
    """Republish dead letters (``ids``, or all when None) to their source streams.

    Each one moves atomically: its original fields are appended to its source stream
    and it is deleted from the dead letters in one step. With ``ids`` None, only the
    dead letters present at the start are replayed, so one that fails again and comes
    back is not replayed in a loop. ``progress`` is called with the number done so far.

    On a partitioned stream each dead letter goes back to its own partition (the one
    whose dead-letter stream holds it); an id found in two partitions raises
    :class:`AmbiguousDeadLetter` before anything moves.
    """
    dlqs = await dead_letter_streams(redis, stream)
    if len(dlqs) == 1:
        (dlq,) = dlqs
        # The entry's own dlq_stream says where it came from; else this stream.
        source = stream if dlq == StreamKeys(stream).dlq else _source_of(dlq)
        if ids is not None:
            wanted = _unique(parse_entry_id(i) for i in ids)
            return await _replay_ids(redis, source, dlq, wanted, progress)
        ends = await dead_letter_snapshot(redis, stream)
        return await _replay_all(redis, {dlq: source}, ends, progress, partitioned=False)
    targets = {dlq: _source_of(dlq) for dlq in dlqs}
    if ids is None:
        ends = await dead_letter_snapshot(redis, stream)
        return await _replay_all(redis, targets, ends, progress, partitioned=True)
    located, unknown = await _locate(redis, dlqs, _unique(parse_entry_id(i) for i in ids))
    result = ReplayResult(unknown=unknown)
    done = 0
    for dlq, rows in located.items():
        for start in range(0, len(rows), BATCH_SIZE):
            batch = rows[start : start + BATCH_SIZE]
            await _replay_rows(redis, targets[dlq], dlq, batch, result, partitioned=True)
            done += len(batch)
            if progress is not None:
                progress(done)
    return result


async def _replay_all(
    redis: aioredis.Redis,
    targets: Mapping[str, str],
    ends: Mapping[str, str],
    progress: ProgressCallback | None,
    *,
    partitioned: bool,
) -> ReplayResult:
    result = ReplayResult()
    done = 0
    for dlq, end in ends.items():
        cursor = "-"
        while True:
            rows: Any = await redis.xrange(dlq, cursor, end, count=BATCH_SIZE)
            if not rows:
                break
            await _replay_rows(redis, targets[dlq], dlq, rows, result, partitioned=partitioned)
            done += len(rows)
            if progress is not None:
                progress(done)
            cursor = "(" + _text(rows[-1][0])
    return result


async def _locate(
    redis: aioredis.Redis, dlqs: Sequence[str], wanted: Sequence[str]
) -> tuple[dict[str, list[tuple[bytes, Mapping[bytes, bytes]]]], list[str]]:
    """Which dead-letter stream holds each id; ids held by none are returned apart."""
    located: dict[str, list[tuple[bytes, Mapping[bytes, bytes]]]] = {}
    unknown: list[str] = []
    ambiguous: list[str] = []
    for start in range(0, len(wanted), BATCH_SIZE):
        batch = wanted[start : start + BATCH_SIZE]
        pipe = redis.pipeline(transaction=False)
        for entry_id in batch:
            for dlq in dlqs:
                pipe.xrange(dlq, entry_id, entry_id)
        found = await pipe.execute()
        for index, entry_id in enumerate(batch):
            replies = found[index * len(dlqs) : (index + 1) * len(dlqs)]
            hits = [(dlq, hit[0]) for dlq, hit in zip(dlqs, replies, strict=True) if hit]
            if not hits:
                unknown.append(entry_id)
            elif len(hits) > 1:
                where = " and ".join(dlq for dlq, _ in hits)
                partitions = " or ".join(repr(_source_of(dlq)) for dlq, _ in hits)
                ambiguous.append(f"{entry_id} is in {where} (--stream {partitions})")
            else:
                dlq, row = hits[0]
                located.setdefault(dlq, []).append(row)
    if ambiguous:
        raise AmbiguousDeadLetter(
            "dead letter " + "; ".join(ambiguous) + ": name the partition with --stream; "
            "nothing was done"
        )
    return located, unknown


async def _replay_ids(
    redis: aioredis.Redis,
    stream: str,
    dlq: str,
    wanted: Sequence[str],
    progress: ProgressCallback | None,
) -> ReplayResult:
    result = ReplayResult()
    for start in range(0, len(wanted), BATCH_SIZE):
        batch = wanted[start : start + BATCH_SIZE]
        pipe = redis.pipeline(transaction=False)
        for entry_id in batch:
            pipe.xrange(dlq, entry_id, entry_id)
        found = await pipe.execute()
        rows = []
        for entry_id, hit in zip(batch, found, strict=True):
            if hit:
                rows.append(hit[0])
            else:
                result.unknown.append(entry_id)
        await _replay_rows(redis, stream, dlq, rows, result, partitioned=False)
        if progress is not None:
            progress(start + len(batch))
    return result


async def _replay_rows(
    redis: aioredis.Redis,
    stream: str,
    dlq: str,
    rows: Sequence[tuple[bytes, Mapping[bytes, bytes]]],
    result: ReplayResult,
    *,
    partitioned: bool,
) -> None:
    if not rows:
        return
    pipe = redis.pipeline(transaction=False)
    for raw_id, fields in rows:
        source = stream
        raw_source = fields.get(b"dlq_stream")
        if raw_source and not partitioned:
            source = raw_source.decode(errors="replace")
        pipe.eval(_REPLAY_SCRIPT, 2, dlq, source, raw_id, DLQ_FIELD_PREFIX)
    replies = await pipe.execute(raise_on_error=False)
    for (raw_id, _fields), reply in zip(rows, replies, strict=True):
        entry_id = _text(raw_id)
        if isinstance(reply, Exception):
            result.failed[entry_id] = str(reply)
        elif reply is None:
            # Replayed or purged by someone else meanwhile.
            result.unknown.append(entry_id)
        else:
            result.replayed[entry_id] = _text(reply)
            result.count += 1


@dataclass(slots=True)
class PurgeResult:
    """How many dead letters a purge deleted, and the ids that were not there."""

    deleted: int = 0
    unknown: list[str] = field(default_factory=list)


async def last_dead_letter_id(redis: aioredis.Redis, stream: str) -> str | None:
    """The id of the newest dead letter of ``stream`` (of all its partitions), or None."""
    return _newest_id((await dead_letter_snapshot(redis, stream)).values())


async def purge_dead_letters(redis: aioredis.Redis, stream: str, ids: Sequence[str]) -> PurgeResult:
    """Delete the given dead letters of source ``stream``; unknown ids are reported.

    On a partitioned stream each id is looked for in every partition; one found in two
    raises :class:`AmbiguousDeadLetter` before anything is deleted.
    """
    dlqs = await dead_letter_streams(redis, stream)
    wanted = _unique(parse_entry_id(i) for i in ids)
    result = PurgeResult()
    targets = [(dlqs[0], entry_id) for entry_id in wanted]
    if len(dlqs) > 1:
        located, result.unknown = await _locate(redis, dlqs, wanted)
        targets = [(dlq, _text(row[0])) for dlq, rows in located.items() for row in rows]
    if not targets:
        return result
    pipe = redis.pipeline(transaction=False)
    for dlq, entry_id in targets:
        pipe.xdel(dlq, entry_id)
    for (_dlq, entry_id), deleted in zip(targets, await pipe.execute(), strict=True):
        if int(deleted):
            result.deleted += 1
        else:
            result.unknown.append(entry_id)
    return result


async def purge_all_dead_letters(
    redis: aioredis.Redis,
    stream: str,
    *,
    up_to: str | None = None,
    snapshot: Mapping[str, str] | None = None,
) -> PurgeResult:
    """Delete every dead letter of ``stream`` up to a bound (default: the newest now).

    ``snapshot`` (from :func:`dead_letter_snapshot`) bounds each dead-letter stream by
    its own newest id; ``up_to`` bounds every one by the same id. Dead letters added
    after the bound (e.g. while an operator confirmed) are kept.
    """
    dlqs = await dead_letter_streams(redis, stream)
    if snapshot is None:
        if up_to is None:
            snapshot = await dead_letter_snapshot(redis, stream)
        else:
            snapshot = dict.fromkeys(dlqs, up_to)
    strays = [dlq for dlq in snapshot if dlq not in dlqs]
    if strays:
        raise ValueError(f"{', '.join(strays)} is not a dead-letter stream of {stream!r}")
    deleted = 0
    for dlq, last in snapshot.items():
        ms, _, seq = parse_entry_id(last).partition("-")
        after = f"{ms}-{int(seq) + 1}" if int(seq) < MAX_ID_PART else f"{int(ms) + 1}-0"
        deleted += int(await cast(Any, redis).execute_command("XTRIM", dlq, "MINID", after))
    return PurgeResult(deleted=deleted)


# -- group reset -----------------------------------------------------------------------


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
        now_ms = await _server_time_ms(redis)
        if position.time_ms is None or position.time_ms > now_ms:
            where = stream if len(names) == 1 else f"any partition of {stream}"
            raise ValueError(
                f"--to {position.description} is after the newest entry of {where!r} "
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
    lag, _source = await _lag(redis, stream, after, new_id)
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


# -- helpers ---------------------------------------------------------------------------


def preview(value: str, width: int = 80) -> str:
    """``value`` on one printable line of at most ``width`` characters."""
    printable = "".join(ch if ch.isprintable() else _escape(ch) for ch in value)
    return printable if len(printable) <= width else printable[: width - 1] + "…"


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _dead_letter(dlq: str, raw_id: bytes, raw_fields: Mapping[bytes, bytes]) -> DeadLetter:
    meta: dict[str, str] = {}
    original: dict[str, str] = {}
    for key, value in raw_fields.items():
        name, text = _safe(key), _safe(value)
        if name.startswith(DLQ_FIELD_PREFIX):
            meta[name] = text
        else:
            original[name] = text
    deliveries = meta.get("dlq_deliveries")
    return DeadLetter(
        id=_text(raw_id),
        dead_letter_stream=dlq,
        source_stream=meta.get("dlq_stream"),
        source_id=meta.get("dlq_source_id"),
        group=meta.get("dlq_group"),
        consumer=meta.get("dlq_consumer"),
        reason=meta.get("dlq_reason"),
        deliveries=int(deliveries) if deliveries and deliveries.isdigit() else None,
        time=meta.get("dlq_time"),
        fields=original,
    )


def _safe(value: bytes | str) -> str:
    # Dead letters are often junk by nature: never fail on bytes that are not UTF-8.
    return value.decode("utf-8", errors="backslashreplace") if isinstance(value, bytes) else value


async def _stream_length(redis: aioredis.Redis, key: str) -> int:
    try:
        return int(await redis.xlen(key))
    except ResponseError as exc:
        raise OperationError(f"key {key!r} is not a stream: {exc}") from None


async def _server_time_ms(redis: aioredis.Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _id_ms(entry_id: str) -> int:
    return int(entry_id.partition("-")[0])


def _format_time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def _unique(ids: Any) -> list[str]:
    return list(dict.fromkeys(ids))


def _opt_text(value: object) -> str | None:
    return None if value is None else _text(value)


# -- metrics -----------------------------------------------------------------------------


async def record_stream_metrics(redis: aioredis.Redis, streams: Sequence[str]) -> None:
    """Set the stream, group-lag, pending and dead-letter gauges from Redis, now.

    Labelled by Redis stream: a partitioned stream's gauges are its partitions'
    (``{orders:0}`` …), so that a sum over the label is the stream's total.
    """
    from orderflow.bus import metrics

    described = await stream_info(redis, streams)
    for info in (part for whole in described for part in whole.partitions or [whole]):
        metrics.STREAM_LENGTH.labels(info.name).set(info.length)
        metrics.DEAD_LETTERS.labels(info.name).set(info.dead_letters)
        for group in info.groups:
            labels = (info.name, group.name)
            if group.lag is not None:
                metrics.GROUP_LAG.labels(*labels).set(group.lag)
            metrics.GROUP_PENDING.labels(*labels).set(group.pending)
            age = group.oldest_pending_age_ms or 0
            metrics.GROUP_OLDEST_PENDING_SECONDS.labels(*labels).set(age / 1000)
