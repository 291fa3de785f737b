"""Stream entry ids and group positions, as an operator gives them."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import redis.asyncio as aioredis

from orderflow.bus.entries import id_key as _id_key

#: Largest value of either part of a stream entry id.
MAX_ID_PART = 2**64 - 1
_ID_RE = re.compile(r"^(\d+)-(\d+)$")
#: The last millisecond of the year 9999, the latest time a position may name.
_MAX_TIME_MS = 253_402_300_799_999


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
        entry_id = parse_entry_id(value)
        return Position(entry_id, f"entry {entry_id}")
    if value.isdigit():
        ms = int(value)
    else:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(
                f"{text!r} is not an entry id (<milliseconds>-<sequence>), "
                "a time (ISO-8601 or epoch milliseconds), 'beginning' or 'end'"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        ms = round(moment.timestamp() * 1000)
        if ms < 0:
            raise ValueError(f"{text!r} is before 1970, when stream ids begin")
    if ms > _MAX_TIME_MS:
        raise ValueError(f"{text!r} is after the year 9999")
    when = format_time(ms)
    if ms == 0:
        return Position("0", f"time {when}", ms)
    return Position(f"{ms - 1}-{MAX_ID_PART}", f"time {when}", ms)


async def server_time_ms(redis: aioredis.Redis) -> int:
    """The Redis server's clock, in epoch milliseconds."""
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


def id_ms(entry_id: str) -> int:
    """The time part of an entry id (epoch milliseconds)."""
    return int(entry_id.partition("-")[0])


def format_time(ms: int) -> str:
    """Epoch milliseconds as an ISO-8601 UTC time, to the millisecond."""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def oldest_id(ids: Iterable[str | None]) -> str | None:
    """The oldest of ``ids`` (None ignored), or None."""
    return min((i for i in ids if i is not None), key=_id_key, default=None)


def newest_id(ids: Iterable[str | None]) -> str | None:
    """The newest of ``ids`` (None ignored), or None."""
    return max((i for i in ids if i is not None), key=_id_key, default=None)
