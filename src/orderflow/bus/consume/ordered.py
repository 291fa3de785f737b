"""Ordered mode: each partition of a stream consumed by one worker at a time, in order.

:class:`OrderedWorker` hands each partition to one worker at a time through an
expiring lease in Redis (``orderflow:lease:{orders:3}:<group>``): the holder runs the
engine on the partition with the ordered policy, one entry after another, taking over
first what earlier owners left pending and retrying a failing entry in place (the
partition waits) until it succeeds or is dead-lettered. Delivery counts are Redis's,
so an entry that kills every owner is dead-lettered after ``max_deliveries`` like in
any mode. Workers announce themselves in a membership set and rebalance when one joins
or leaves (or its lease expires), so every partition has one owner and each owns its
fair share.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, replace

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from orderflow.bus.consume.config import WorkerConfig, WorkerStats, sum_stats
from orderflow.bus.consume.policy import ORDERED, Policy
from orderflow.bus.consume.supervised import SupervisedStreamWorker
from orderflow.bus.delivery import Handler
from orderflow.bus.entries import text
from orderflow.bus.errors import TRANSIENT
from orderflow.bus.partitions import PartitionLayout
from orderflow.bus.streams import ensure_group

__all__ = ["OrderedWorker", "lease_key", "members_key"]

log = logging.getLogger("orderflow.bus.partition_workers")

#: Errors an ordered worker waits out: connection trouble and cluster reconfiguration.
_REDIS_FAILURES: tuple[type[BaseException], ...] = (*TRANSIENT, RedisError)


# Registers a member until ARGV[2] ms from now (Redis's clock), forgets expired ones,
# and returns the live members (by expiry). One key: one slot on a cluster.
_MEMBERS_SCRIPT = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms)
if ARGV[3] == '1' then
  redis.call('ZADD', KEYS[1], ms + tonumber(ARGV[2]), ARGV[1])
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 10)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""

# Extends a lease only if this owner still holds it.
_RENEW_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# Gives a lease up only if this owner holds it.
_RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def lease_key(partition: str, group: str) -> str:
    """The lease of ``partition`` for ``group``: in the partition's own slot."""
    return f"orderflow:lease:{partition}:{group}"


def members_key(stream: str, group: str) -> str:
    """The membership set of ``group``'s ordered workers on ``stream``."""
    return f"orderflow:members:{{{stream}}}:{group}"


class _PartitionWorker(SupervisedStreamWorker):
    """The sole consumer of one leased partition: the engine with the ordered policy."""

    policy: Policy = ORDERED


@dataclass(slots=True)
class _Owned:
    """A partition this worker holds the lease of, its worker, and the task running it."""

    name: str
    worker: _PartitionWorker
    task: asyncio.Task[WorkerStats]


class OrderedWorker:
    """One worker of a group in ordered mode: owns some partitions, one entry at a time each.

    The lease lasts ``config.claim_idle_ms`` and is renewed every third of it; a worker
    that stops renewing (dead, paused) loses its partitions to the others after that.
    ``config.stream`` is replaced by each partition's stream.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        layout: PartitionLayout,
        config: WorkerConfig,
        handler: Handler,
    ) -> None:
        self.layout = layout
        #: The config of the first partition's worker (the others differ in stream only).
        self.config = replace(
            config,
            stream=layout.names[0],
            concurrency=1,
            # A read returns within a third of the lease, so a lost lease stops it soon.
            block_ms=min(config.block_ms, max(10, config.claim_idle_ms // 3)),
        )
        self._redis = redis
        self._handler = handler
        self._owned: dict[str, _Owned] = {}
        #: What the workers of partitions given up did.
        self._earlier: list[WorkerStats] = []
        self._stopping = asyncio.Event()
        self._started = asyncio.Event()
        self._members = redis.register_script(_MEMBERS_SCRIPT)
        self._renew = redis.register_script(_RENEW_SCRIPT)
        self._release = redis.register_script(_RELEASE_SCRIPT)

    @property
    def consumer(self) -> str:
        """This worker's consumer name, also the owner name in leases."""
        return self.config.consumer

    @property
    def owned(self) -> list[str]:
        """The partitions this worker holds now."""
        return sorted(self._owned, key=self.layout.names.index)

    @property
    def lease_ms(self) -> int:
        """How long a lease lasts without renewal."""
        return self.config.claim_idle_ms

    @property
    def stats(self) -> WorkerStats:
        """What this worker did on every partition it held."""
        return sum_stats([*self._earlier, *(o.worker.stats for o in self._owned.values())])

    @property
    def held(self) -> int:
        """Entries held over the partitions owned now."""
        return sum(o.worker.held for o in self._owned.values())

    def stop(self) -> None:
        """Finish the current entries, acknowledge, give every lease up."""
        self._stopping.set()

    async def wait_started(self) -> None:
        """Return once the worker has taken part in a first rebalance."""
        await self._started.wait()

    async def run(self, *, burst: bool = False) -> WorkerStats:
        """Hold and consume partitions until ``stop()`` (``burst`` is not supported)."""
        if burst:
            raise ValueError("ordered mode has no burst run: partitions are leased")
        for name in self.layout.names:
            await self._ensure_group(name)
        interval = self.lease_ms / 3000
        failures = 0
        try:
            while not self._stopping.is_set():
                try:
                    await self._rebalance()
                    failures = 0
                except _REDIS_FAILURES as exc:
                    failures += 1
                    if failures == 1 or failures % 20 == 0:
                        log.warning("ordered worker cannot rebalance: %s", exc)
                self._started.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), interval)
        finally:
            await asyncio.gather(*(self._give_up(name) for name in list(self._owned)))
            with contextlib.suppress(*_REDIS_FAILURES):
                await self._members(
                    keys=[members_key(self.layout.stream, self.config.group)],
                    args=[self.consumer, self.lease_ms, 0],
                )
        return self.stats

    async def _ensure_group(self, name: str) -> None:
        attempt = 0
        while True:
            try:
                await ensure_group(self._redis, name, self.config.group, start_id="0")
                return
            except _REDIS_FAILURES:
                attempt += 1
                if self._stopping.is_set() or attempt > 100:
                    raise
                await asyncio.sleep(min(1.0, 0.05 * attempt))

    async def _rebalance(self) -> None:
        cfg = self.config
        # Ranked by name: the set is scored by expiry, and a worker that just renewed
        # would otherwise always rank itself last (and two workers could both take
        # the smaller share, leaving a partition without an owner).
        members = sorted(
            text(m)
            for m in await self._members(
                keys=[members_key(self.layout.stream, cfg.group)],
                args=[self.consumer, self.lease_ms, 1],
            )
        )
        # Renew what is held; a lease lost (expired while paused) stops its consumer.
        for name in list(self._owned):
            renewed = await self._renew(
                keys=[lease_key(name, cfg.group)], args=[self.consumer, self.lease_ms]
            )
            if not int(renewed):
                log.warning("lease of partition %s lost; stopping it", name)
                await self._give_up(name, release=False)
        rank = members.index(self.consumer) if self.consumer in members else 0
        count = max(1, len(members))
        share = self.layout.count // count + (1 if rank < self.layout.count % count else 0)
        while len(self._owned) > share:
            # Give up the partitions least "ours" first (rank order), keeping stable owners.
            extra = max(self._owned, key=lambda n: (self._preference(n, rank, count), n))
            await self._give_up(extra)
        if len(self._owned) >= share:
            return
        candidates = sorted(
            (n for n in self.layout.names if n not in self._owned),
            key=lambda n: self._preference(n, rank, count),
        )
        for name in candidates:
            if len(self._owned) >= share:
                break
            if await self._redis.set(
                lease_key(name, cfg.group), self.consumer, nx=True, px=self.lease_ms
            ):
                self._take(name)

    def _preference(self, name: str, rank: int, count: int) -> int:
        # Partition i "belongs" to member i % count: lower is more ours.
        index = self.layout.names.index(name)
        return (index - rank) % count * self.layout.count + index

    def _take(self, name: str) -> None:
        worker = _PartitionWorker(self._redis, replace(self.config, stream=name), self._handler)
        task = asyncio.create_task(worker.run(), name=f"orderflow-ordered-{name}")
        self._owned[name] = _Owned(name, worker, task)
        log.info("worker %s took partition %s", self.consumer, name)

    async def _give_up(self, name: str, *, release: bool = True) -> None:
        owned = self._owned.pop(name, None)
        if owned is None:
            return
        owned.worker.stop()
        # The engine stops reading within a read's block, then finishes the entry in hand.
        timeout = self.config.shutdown_timeout_s + self.config.block_ms / 1000 + 1
        done, _ = await asyncio.wait({owned.task}, timeout=timeout)
        if not done:
            owned.task.cancel()
        await asyncio.gather(owned.task, return_exceptions=True)
        self._earlier.append(owned.worker.stats)
        if release:
            with contextlib.suppress(*_REDIS_FAILURES):
                await self._release(keys=[lease_key(name, self.config.group)], args=[self.consumer])
        log.info("worker %s gave partition %s up", self.consumer, name)
