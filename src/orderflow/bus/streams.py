"""Publishing to Redis Streams, with retention that never trims what a group still needs."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from orderflow._compat.redis import plain_pool, round_trip
from orderflow.bus import metrics
from orderflow.bus.entries import text
from orderflow.bus.guarantees import STREAMS, Guarantees
from orderflow.bus.message import Message, encode
from orderflow.bus.server import probe_acked_trim

log = logging.getLogger(__name__)

#: Publishing more than this many messages at once is split into several pipelines.
PIPELINE_CHUNK = 1000

# Trims a stream towards its length cap, never past the oldest entry some consumer
# group still needs: its oldest pending entry, or the entry after its last delivered one.
# Atomic, so a group cannot read or claim between the computation and the trim.
# Returns {length after, trimmed, limited by a group (0/1), more to trim (0/1), safe id}.
_TRIM_SCRIPT = """
local key = KEYS[1]
local cap = tonumber(ARGV[1])
local scan_limit = tonumber(ARGV[2])
local approx = ARGV[3] == '1'
if redis.call('EXISTS', key) == 0 then return {0, 0, 0, 0, ''} end
local len = redis.call('XLEN', key)
if len <= cap then return {len, 0, 0, 0, ''} end

local function parse(id)
  local dash = string.find(id, '-', 1, true)
  return {tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1)),
          string.sub(id, 1, dash - 1)}
end
local function less(a, b) return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2]) end

local safe = nil
for _, group in ipairs(redis.call('XINFO', 'GROUPS', key)) do
  local info = {}
  for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
  local needed
  if tonumber(info['pending']) > 0 then
    needed = parse(redis.call('XPENDING', key, info['name'])[2])
  else
    local last = parse(info['last-delivered-id'])
    needed = {last[1], last[2] + 1, last[3]}
  end
  if safe == nil or less(needed, safe) then safe = needed end
end

local excess = len - cap
local more = 0
local count = excess
if count > scan_limit then count = scan_limit; more = 1 end
local range = redis.call('XRANGE', key, '-', '+', 'COUNT', count + 1)
local target = parse(range[#range][1])
local limited = 0
if safe ~= nil and less(safe, target) then target = safe; limited = 1; more = 0 end
local target_id = target[3] .. '-' .. string.format('%.0f', target[2])
local trimmed
if approx then
  trimmed = redis.call('XTRIM', key, 'MINID', '~', target_id)
else
  trimmed = redis.call('XTRIM', key, 'MINID', target_id)
end
local safe_id = ''
if safe ~= nil then safe_id = safe[3] .. '-' .. string.format('%.0f', safe[2]) end
return {redis.call('XLEN', key), trimmed, limited, more, safe_id}
"""


@dataclass(frozen=True, slots=True)
class Retention:
    """How long a stream is kept: an approximate length cap, trimmed every few entries.

    Trimming never removes an entry that a consumer group has not acknowledged (or
    not yet read); when that keeps the stream over its cap, the publisher reports it.
    """

    maxlen: int | None = 100_000
    trim_every: int = 1000
    approximate: bool = True
    #: Most entries one trim call scans, so a large trim never blocks Redis for long.
    scan_limit: int = 10_000

    def __post_init__(self) -> None:
        if self.maxlen is not None and self.maxlen < 1:
            raise ValueError(f"Retention.maxlen must be at least 1, got {self.maxlen}")
        if self.trim_every < 1:
            raise ValueError(f"Retention.trim_every must be at least 1, got {self.trim_every}")
        if self.scan_limit < 1:
            raise ValueError(f"Retention.scan_limit must be at least 1, got {self.scan_limit}")


@dataclass(frozen=True, slots=True)
class TrimResult:
    """What a trim did: the length after it, and whether a lagging group held it back."""

    length: int
    trimmed: int
    over_cap: bool
    safe_id: str | None


class StreamPublisher:
    """Appends messages to streams with XADD; a batch is one pipelined round trip."""

    guarantees: Guarantees = STREAMS

    def __init__(self, redis: aioredis.Redis, *, retention: Retention | None = None) -> None:
        self._redis = redis
        self.retention = retention if retention is not None else Retention()
        self._since_trim: dict[str, int] = {}
        self._trim = redis.register_script(_TRIM_SCRIPT)
        self._acked_trim: bool | None = None
        #: The latest trim of each stream, for health reports and metrics.
        self.last_trim: dict[str, TrimResult] = {}

    async def publish(self, stream: str, message: Message) -> str:
        """Append one message; returns its stream entry id."""
        (entry_id,) = await self.publish_many(stream, [message])
        return entry_id

    async def publish_many(self, stream: str, messages: Sequence[Message]) -> list[str]:
        """Append messages in order in one pipelined round trip; returns their entry ids.

        Raises ValueError, before sending anything, if a message cannot be encoded.
        """
        commands = [("XADD", stream, "*", *_flatten(encode(message))) for message in messages]
        ids: list[str] = []
        for start in range(0, len(commands), PIPELINE_CHUNK):
            replies = await send_commands(self._redis, commands[start : start + PIPELINE_CHUNK])
            ids.extend(text(reply) for reply in replies)
        metrics.PUBLISHED.labels(stream).inc(len(ids))
        await self.appended(stream, len(ids))
        return ids

    async def appended(self, stream: str, added: int) -> None:
        """Count entries appended to ``stream`` by other means; trims when it is time."""
        if self.retention.maxlen is None:
            return
        count = self._since_trim.get(stream, 0) + added
        # At least every tenth of the cap, so a cap smaller than trim_every still holds.
        every = min(self.retention.trim_every, max(1, self.retention.maxlen // 10))
        if count < every:
            self._since_trim[stream] = count
            return
        self._since_trim[stream] = 0
        await self.trim(stream)

    async def trim(self, stream: str) -> TrimResult:
        """Trim ``stream`` towards the cap now, as far as every group's progress allows."""
        maxlen = self.retention.maxlen
        if maxlen is None:
            length = int(await self._redis.xlen(stream))
            return TrimResult(length=length, trimmed=0, over_cap=False, safe_id=None)
        if await self._supports_acked_trim(stream):
            result = await self._trim_acked(stream, maxlen)
        else:
            result = await self._trim_by_script(stream, maxlen)
        self.last_trim[stream] = result
        metrics.STREAM_OVER_CAP.labels(stream).set(1 if result.over_cap else 0)
        if result.over_cap:
            log.warning(
                "stream %s holds %d entries, over its cap of %d: a consumer group has not "
                "acknowledged entries from %s on, so they are kept",
                stream,
                result.length,
                maxlen,
                result.safe_id,
            )
        return result

    async def _trim_by_script(self, stream: str, maxlen: int) -> TrimResult:
        trimmed_total = 0
        while True:
            length, trimmed, limited, more, safe_id = await self._trim(
                keys=[stream],
                args=[maxlen, self.retention.scan_limit, int(self.retention.approximate)],
            )
            trimmed_total += int(trimmed)
            if not int(more) or not int(trimmed):
                return TrimResult(
                    length=int(length),
                    trimmed=trimmed_total,
                    over_cap=bool(int(limited)),
                    safe_id=text(safe_id) or None,
                )

    async def _trim_acked(self, stream: str, maxlen: int) -> TrimResult:
        # Redis 8.2+: the server itself keeps entries some group has not acknowledged.
        approx = ["~"] if self.retention.approximate else []
        trimmed = int(
            await cast(Any, self._redis).execute_command(
                "XTRIM", stream, "MAXLEN", *approx, maxlen, "ACKED"
            )
        )
        length = int(await self._redis.xlen(stream))
        return TrimResult(
            length=length, trimmed=trimmed, over_cap=length > maxlen * 1.1 + 100, safe_id=None
        )

    async def _supports_acked_trim(self, stream: str) -> bool:
        if self._acked_trim is None:
            # Asked with the command itself: Valkey reports versions of its own.
            self._acked_trim = await probe_acked_trim(self._redis, stream)
        return self._acked_trim


async def send_commands(redis: aioredis.Redis, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Send ``commands`` in one write and return their raw replies, in order.

    A non-transactional pipeline, packed by hiredis in C where the installed redis-py
    allows (orderflow._compat.redis: redis-py packs each argument in Python, which costs
    more than the rest of a publish). Replies are not post-processed, so use it for
    commands whose raw reply is what you want (XADD, XACK). Raises the first error
    reply, after reading every reply. On a client that is not a plain pooled one (a
    cluster, a single connection), or with that fast path off, this is redis-py's own
    pipeline.
    """
    pool = plain_pool(redis)
    if pool is None and len(commands) == 1:
        # One command (a worker's XACK): no pipeline machinery around it.
        return [await cast(Any, redis).execute_command(*commands[0])]
    if pool is None:
        pipe: Any = redis.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return cast(list[Any], await pipe.execute())
    replies = await round_trip(pool, commands)
    for reply in replies:
        if isinstance(reply, ResponseError):
            raise reply
    return replies


#: One stream entry as Redis replies it, unparsed: its id and its fields, flat
#: (name, value, name, value ...).
RawEntry = tuple[bytes, list[bytes]]


async def read_group(
    redis: aioredis.Redis,
    stream: str,
    group: str,
    consumer: str,
    *,
    count: int,
    block_ms: int | None,
) -> list[RawEntry]:
    """``XREADGROUP ... STREAMS stream >``: new entries for ``consumer``, unparsed.

    The consumer's hot path: redis-py would turn each entry's fields into a dict (in
    Python) that the decoder then walks again; here hiredis's reply is used as it is.
    Blocks up to ``block_ms`` (then returns ``[]``; None: never). Error replies (NOGROUP)
    raise.
    On a cluster or single-connection client (or with orderflow._compat.redis's fast
    path off), redis-py's ``xreadgroup``, flattened.
    """
    pool = plain_pool(redis)
    if pool is None:
        reply: Any = await redis.xreadgroup(
            group, consumer, {stream: ">"}, count=count, block=block_ms
        )
        return [(entry_id, flat_fields(fields)) for entry_id, fields in _entries_of(reply)]
    command: Any = ("XREADGROUP", "GROUP", group, consumer, "COUNT", count)
    if block_ms is not None:
        command += ("BLOCK", block_ms)
    # The client's socket timeout counts from the end of the BLOCK.
    (reply,) = await round_trip(
        pool, [(*command, "STREAMS", stream, ">")], wait_s=(block_ms or 0) / 1000
    )
    if isinstance(reply, ResponseError):
        raise reply
    return cast(list[RawEntry], _entries_of(reply))


def _entries_of(reply: Any) -> list[Any]:
    # RESP2: [[stream, entries]]; RESP3: {stream: entries}; nil when BLOCK timed out.
    # redis-py's parsed RESP3 reply wraps the entries once more: {stream: [entries]}.
    if not reply:
        return []
    if isinstance(reply, dict):
        entries = next(iter(reply.values()))
        first = entries[0] if entries else None
        if isinstance(first, list) and not (first and isinstance(first[0], bytes | str)):
            (entries,) = entries
        return list(entries)
    return list(reply[0][1])


def flat_fields(fields: Any) -> list[bytes]:
    """Entry fields as a flat list (name, value ...), from a mapping or already flat."""
    if isinstance(fields, Mapping):
        return list(chain.from_iterable(fields.items()))
    return list(fields)


def _flatten(fields: dict[str, bytes | str]) -> list[bytes | str]:
    flat: list[bytes | str] = []
    for key, value in fields.items():
        flat.append(key)
        flat.append(value)
    return flat


async def ensure_group(
    redis: aioredis.Redis, stream: str, group: str, *, start_id: str = "0"
) -> bool:
    """Create ``group`` on ``stream`` (and the stream) if missing; True if it was created."""
    try:
        await redis.xgroup_create(stream, group, id=start_id, mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" in str(exc):
            return False
        raise
    return True
