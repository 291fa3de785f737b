"""A worker that starts again when a loop of it fails (a cluster failover, say)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis

from orderflow.bus import metrics
from orderflow.bus.consume.competing import StreamWorker
from orderflow.bus.consume.config import WorkerConfig, WorkerStats, sum_stats
from orderflow.bus.delivery import Handler

__all__ = ["SupervisedStreamWorker"]

log = logging.getLogger("orderflow.bus.partition_workers")


class SupervisedStreamWorker(StreamWorker):
    """A :class:`StreamWorker` that starts again when a loop of it fails.

    During a cluster failover the client can raise what the worker does not wait out
    (CLUSTERDOWN, a slot not covered yet, a half-closed connection): rather than stop
    consuming, a fresh engine runs again after ``restart_delay_s``, as the same
    consumer. What the failed one held stays pending and is claimed back after the
    claim timeout (at once, for a policy that takes every pending entry first).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        config: WorkerConfig,
        handler: Handler,
        *,
        restart_delay_s: float = 0.5,
    ) -> None:
        super().__init__(redis, config, handler)
        self._restart_delay_s = restart_delay_s
        self._stop_asked = asyncio.Event()
        self._earlier: list[WorkerStats] = []
        #: How many times a fresh engine took over after a failure.
        self.restarts = 0

    @property
    def stats(self) -> WorkerStats:
        """What this worker did, over every start."""
        return sum_stats([*self._earlier, self._engine.stats])

    def stop(self) -> None:
        """Stop for good (no restart)."""
        self._stop_asked.set()
        super().stop()

    async def run(self, *, burst: bool = False) -> WorkerStats:
        """Consume until ``stop()``, starting again after a failure."""
        while True:
            try:
                await self._engine.run(burst=burst)
                return self.stats
            except Exception as exc:
                if self._stop_asked.is_set():
                    # Failed while stopping (a last ack flush): what it held stays
                    # pending, for a claim by another consumer.
                    log.warning("worker of %s failed while stopping: %s", self.config.stream, exc)
                    return self.stats
                log.warning(
                    "worker of %s failed (%s: %s); starting it again",
                    self.config.stream,
                    type(exc).__name__,
                    exc,
                )
                metrics.REDIS_ERRORS.labels("worker").inc()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_asked.wait(), self._restart_delay_s)
            if self._stop_asked.is_set():
                return self.stats
            self.restarts += 1
            # A fresh engine (queues, events, tasks), same consumer name.
            self._earlier.append(self._engine.stats)
            self._engine = self._new_engine()
