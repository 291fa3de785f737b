"""Competing consumers on one stream: every consumer of a group reads and claims."""

from __future__ import annotations

import redis.asyncio as aioredis

from orderflow.bus.consume.config import WorkerConfig, WorkerStats
from orderflow.bus.consume.engine import Engine
from orderflow.bus.consume.policy import COMPETING, Policy
from orderflow.bus.delivery import Handler

__all__ = ["StreamWorker"]


class StreamWorker:
    """One consumer in a consumer group, running ``handler`` on every entry.

    Consumers of a group share the stream's entries: each reads new ones, claims those
    another consumer left idle for ``claim_idle_ms``, and retries a failed entry aside
    while it goes on with the others. The engine does the work; this is its policy.
    """

    #: What this kind of worker reads, claims and retries; the engine does the rest.
    policy: Policy = COMPETING

    def __init__(self, redis: aioredis.Redis, config: WorkerConfig, handler: Handler) -> None:
        self._redis = redis
        self.config = config
        self._handler = handler
        self._engine = self._new_engine()

    def _new_engine(self) -> Engine:
        return Engine(self._redis, self.config, self._handler, self.policy)

    @property
    def consumer(self) -> str:
        """This worker's consumer name in its group."""
        return self.config.consumer

    @property
    def held(self) -> int:
        """Entries this worker owns right now: running or waiting for a retry."""
        return self._engine.held

    @property
    def stats(self) -> WorkerStats:
        """What this worker did."""
        return self._engine.stats

    def stop(self) -> None:
        """Ask the worker to stop: no new reads, in-flight work finishes, acks flushed."""
        self._engine.stop()

    async def wait_started(self) -> None:
        """Return once the worker's group exists and it is reading."""
        await self._engine.wait_started()

    async def run(self, *, burst: bool = False) -> WorkerStats:
        """Consume until ``stop()``; with ``burst``, until the stream is drained."""
        return await self._engine.run(burst=burst)
