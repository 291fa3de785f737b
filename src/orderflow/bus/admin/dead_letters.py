"""Dead letters: list, count, replay (atomically, each to its partition) and purge."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis

from orderflow.bus.admin.errors import AmbiguousDeadLetter
from orderflow.bus.admin.ids import MAX_ID_PART, newest_id, parse_entry_id
from orderflow.bus.admin.streams import dead_letter_streams, source_of, stream_length, unique
from orderflow.bus.entries import DLQ_FIELD_PREFIX
from orderflow.bus.entries import id_key as _id_key
from orderflow.bus.entries import text as _text
from orderflow.bus.keys import StreamKeys

#: Dead letters read and replayed per round trip.
BATCH_SIZE = 100

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
    totals = await asyncio.gather(*(stream_length(redis, dlq) for dlq in dlqs))
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
    return sum(await asyncio.gather(*(stream_length(redis, dlq) for dlq in dlqs)))


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
        source = stream if dlq == StreamKeys(stream).dlq else source_of(dlq)
        if ids is not None:
            wanted = unique(parse_entry_id(i) for i in ids)
            return await _replay_ids(redis, source, dlq, wanted, progress)
        ends = await dead_letter_snapshot(redis, stream)
        return await _replay_all(redis, {dlq: source}, ends, progress, partitioned=False)
    targets = {dlq: source_of(dlq) for dlq in dlqs}
    if ids is None:
        ends = await dead_letter_snapshot(redis, stream)
        return await _replay_all(redis, targets, ends, progress, partitioned=True)
    located, unknown = await _locate(redis, dlqs, unique(parse_entry_id(i) for i in ids))
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
    ambiguous: dict[str, list[str]] = {}
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
                ambiguous[entry_id] = [dlq for dlq, _ in hits]
            else:
                dlq, row = hits[0]
                located.setdefault(dlq, []).append(row)
    if ambiguous:
        raise AmbiguousDeadLetter(ambiguous)
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
    return newest_id((await dead_letter_snapshot(redis, stream)).values())


async def purge_dead_letters(redis: aioredis.Redis, stream: str, ids: Sequence[str]) -> PurgeResult:
    """Delete the given dead letters of source ``stream``; unknown ids are reported.

    On a partitioned stream each id is looked for in every partition; one found in two
    raises :class:`AmbiguousDeadLetter` before anything is deleted.
    """
    dlqs = await dead_letter_streams(redis, stream)
    wanted = unique(parse_entry_id(i) for i in ids)
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
