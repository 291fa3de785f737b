"""Which event versions are in flight: counted over a stream's newest entries, so an
operator switching producers sees old and new versions side by side, then the old
one drain away."""

from __future__ import annotations

from collections import Counter
from typing import cast

import redis.asyncio as aioredis

from orderflow.bus.admin.streams import stream_partitions
from orderflow.domain import (
    DATASCHEMA_FIELD,
    ORDER_CREATED_EVENT,
    UnsupportedVersion,
    schema_version,
)

#: Newest entries looked at per stream (per partition on a cluster).
SAMPLE = 500
_TYPE = b"ce_type"
_SCHEMA = DATASCHEMA_FIELD.encode()


async def versions_in_flight(
    redis: aioredis.Redis, stream: str, *, sample: int = SAMPLE
) -> dict[str, int]:
    """``{"order.created v2": 480, "order.created v1": 20}`` over the newest ``sample``
    entries of ``stream`` (each partition's, on a cluster); an entry whose
    ``ce_dataschema`` is not a version at all counts as ``<type> unsupported``."""
    counts: Counter[str] = Counter()
    for key in await stream_partitions(redis, stream):
        entries = cast(
            list[tuple[bytes, dict[bytes, bytes]]], await redis.xrevrange(key, count=sample)
        )
        for _, fields in entries:
            event_type = (fields.get(_TYPE) or ORDER_CREATED_EVENT.encode()).decode(
                errors="replace"
            )
            raw = fields.get(_SCHEMA)
            try:
                version = schema_version(
                    raw.decode(errors="replace") if raw is not None else None, event_type
                )
            except UnsupportedVersion:
                counts[f"{event_type} unsupported"] += 1
            else:
                counts[f"{event_type} v{version}"] += 1
    return dict(sorted(counts.items()))
