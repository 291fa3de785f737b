"""Dead letters: one record format, one key rule, moved atomically with the ack.

A dead letter keeps the entry's own fields and adds ``dlq_*`` fields saying why,
where from and after how many deliveries. It goes to ``<stream>:dlq`` (for a
partition ``{orders:3}``: ``{orders:3}:dlq``, in the partition's cluster slot), and the
entry is acknowledged in the same atomic script, only once the dead letter is in: an
entry is never both dead-lettered and pending, nor lost. (A MULTI would not do: Redis
runs every command of a transaction even when one gets an error reply, so an XADD
refused with OOM or WRONGTYPE would still be followed by the XACK, losing the entry.)
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis

from orderflow.bus.entries import is_dlq_field
from orderflow.bus.keys import StreamKeys

__all__ = ["REASON_LIMIT", "dead_letter_record", "move_to_dead_letters"]

#: Longest reason kept, in characters (an exception text can be long).
REASON_LIMIT = 1000

# KEYS: the stream, its dead letters; ARGV: the group, the entry id, the cap, then the
# record's fields and values. redis.call raises on an error reply, which ends the
# script before the XACK: a refused XADD leaves the entry pending, to be tried again.
_MOVE_SCRIPT = """
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 4))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return id
"""


def dead_letter_record(
    fields: Iterable[tuple[bytes | str, bytes | str]],
    *,
    reason: str,
    stream: str,
    group: str,
    consumer: str,
    entry_id: str,
    deliveries: int,
) -> dict[bytes | str, bytes | str]:
    """The dead letter of entry ``entry_id``: its fields (less any earlier ``dlq_*``
    fields, from a replayed dead letter) and why it was given up."""
    record: dict[bytes | str, bytes | str] = {k: v for k, v in fields if not is_dlq_field(k)}
    record.update(
        {
            "dlq_reason": reason[:REASON_LIMIT],
            "dlq_time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "dlq_stream": stream,
            "dlq_group": group,
            "dlq_consumer": consumer,
            "dlq_deliveries": str(deliveries),
            "dlq_source_id": entry_id,
        }
    )
    return record


async def move_to_dead_letters(
    redis: aioredis.Redis,
    stream: str,
    group: str,
    entry_id: str,
    record: dict[bytes | str, bytes | str],
    *,
    maxlen: int,
) -> None:
    """Add ``record`` to the stream's dead letters, then acknowledge the entry, in one
    script (the two keys share a slot, so also on a cluster). If Redis refuses the
    dead letter (an error reply such as OOM), this raises and the entry stays pending."""
    if not record:
        raise ValueError(f"dead letter of {entry_id} has no fields")
    move: Any = redis.register_script(_MOVE_SCRIPT)
    args: list[bytes | str | int] = [group, entry_id, maxlen]
    for name, value in record.items():
        args += (name, value)
    await move(keys=[stream, StreamKeys(stream).dlq], args=args)
