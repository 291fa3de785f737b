"""Dead letters: one record format, one key rule, moved atomically with the ack.

A dead letter keeps the entry's own fields and adds ``dlq_*`` fields saying why,
where from and after how many deliveries. It goes to ``<stream>:dlq`` (for a
partition ``{orders:3}``: ``{orders:3}:dlq``, in the partition's cluster slot), in one
MULTI with the XACK, so an entry is never both dead-lettered and pending, nor lost.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, cast

import redis.asyncio as aioredis

from orderflow.bus.entries import is_dlq_field
from orderflow.bus.keys import StreamKeys

__all__ = ["REASON_LIMIT", "dead_letter_record", "move_to_dead_letters"]

#: Longest reason kept, in characters (an exception text can be long).
REASON_LIMIT = 1000


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
    """Add ``record`` to the stream's dead letters and acknowledge the entry, in one
    transaction (the two keys share a slot, so also on a cluster)."""
    pipe = redis.pipeline(transaction=True)
    pipe.xadd(StreamKeys(stream).dlq, cast(Any, record), maxlen=maxlen, approximate=True)
    pipe.xack(stream, group, entry_id)
    await pipe.execute()
