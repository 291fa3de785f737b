"""Stream gauges for Prometheus, read from Redis on demand."""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis

from orderflow.bus.admin.info import stream_info


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
