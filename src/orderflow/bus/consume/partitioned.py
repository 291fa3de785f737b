"""Competing consumers on every partition of a partitioned stream."""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace

import redis.asyncio as aioredis

from orderflow.bus.consume.config import WorkerConfig, WorkerStats, sum_stats
from orderflow.bus.consume.supervised import SupervisedStreamWorker
from orderflow.bus.delivery import Handler
from orderflow.bus.partitions import PartitionLayout

__all__ = ["PartitionedWorker"]


class PartitionedWorker:
    """One consumer of a group on every partition of a stream (competing consumers).

    Each partition gets a :class:`SupervisedStreamWorker` on its own stream, under one
    consumer name: every worker of a group reads every partition, and the workers
    compete for entries within each (at-least-once; entries of one partition may be
    handled concurrently and retried out of order). ``config.stream`` is replaced by
    each partition's stream; ``config.concurrency`` is shared out over the partitions
    (at least 4 each).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        layout: PartitionLayout,
        config: WorkerConfig,
        handler: Handler,
        *,
        restart_delay_s: float = 0.5,
    ) -> None:
        self.layout = layout
        per = max(4, math.ceil(config.concurrency / layout.count))
        #: The config of the first partition's worker (the others differ in stream only).
        self.config = replace(config, stream=layout.names[0], concurrency=per)
        self.workers = [
            SupervisedStreamWorker(
                redis, replace(self.config, stream=name), handler, restart_delay_s=restart_delay_s
            )
            for name in layout.names
        ]

    @property
    def consumer(self) -> str:
        """This worker's consumer name (the same in every partition)."""
        return self.config.consumer

    @property
    def stats(self) -> WorkerStats:
        """What the partition workers did, summed."""
        return sum_stats([w.stats for w in self.workers])

    @property
    def held(self) -> int:
        """Entries held over all partitions."""
        return sum(w.held for w in self.workers)

    def stop(self) -> None:
        """Stop every partition's worker."""
        for worker in self.workers:
            worker.stop()

    async def wait_started(self) -> None:
        """Return once every partition is being read."""
        await asyncio.gather(*(w.wait_started() for w in self.workers))

    async def run(self, *, burst: bool = False) -> WorkerStats:
        """Consume every partition until ``stop()``; with ``burst``, until all are drained."""
        results = await asyncio.gather(*(w.run(burst=burst) for w in self.workers))
        return sum_stats(list(results))
