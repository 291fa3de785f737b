"""Workers of a partitioned stream: competing consumers on every partition, or ordered.

:class:`PartitionedWorker` runs one :class:`StreamWorker` per partition under one
consumer name: every worker of a group reads every partition, and the workers compete
for entries within each (at-least-once; entries of one partition may be handled
concurrently and retried out of order).

:class:`OrderedWorker` hands each partition to one worker at a time through an
expiring lease in Redis (``orderflow:lease:{orders:3}:<group>``): the holder handles
the partition's entries one after another, retrying a failing entry in place (the
partition waits) until it succeeds or is dead-lettered. Workers announce themselves
in a membership set and rebalance when one joins or leaves (or its lease expires), so
every partition has one owner and each owns its fair share.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from orderflow.bus import metrics
from orderflow.bus.message import DecodeError, decode
from orderflow.bus.partitions import PartitionLayout
from orderflow.bus.streams import ensure_group
from orderflow.bus.worker import (
    TRANSIENT_REDIS_ERRORS,
    Delivery,
    Handler,
    PermanentError,
    StreamWorker,
    WorkerConfig,
    WorkerStats,
    ack_deleted_pending,
)

log = logging.getLogger(__name__)

#: Errors an ordered worker waits out: connection trouble and cluster reconfiguration.
_REDIS_FAILURES: tuple[type[BaseException], ...] = (*TRANSIENT_REDIS_ERRORS, RedisError)


def _sum_stats(parts: list[WorkerStats]) -> WorkerStats:
    total = WorkerStats()
    for part in parts:
        for f in fields(WorkerStats):
            setattr(total, f.name, getattr(total, f.name) + getattr(part, f.name))
    return total


class SupervisedStreamWorker(StreamWorker):
    """A :class:`StreamWorker` that starts again when a loop of it fails.

    During a cluster failover the client can raise what the worker does not wait out
    (CLUSTERDOWN, a slot not covered yet, a half-closed connection): rather than stop
    consuming, the worker is rebuilt and runs again after ``restart_delay_s``. What it
    held stays pending and is claimed back after the claim timeout.
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
        self._args = (redis, config, handler)
        self._restart_delay_s = restart_delay_s
        self._stop_asked = asyncio.Event()
        self._loop_failing = False
        self.restarts = 0

    def stop(self) -> None:
        """Stop for good (no restart)."""
        if not self._loop_failing:
            self._stop_asked.set()
        super().stop()

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        # A failed loop stops this run through stop(): that must not count as asked
        # from outside, or the worker stays stopped for good (found by the failover
        # test: the email-events consumer died at a failover and statuses stalled).
        self._loop_failing = True
        try:
            super()._loop_ended(task)
        finally:
            self._loop_failing = False

    async def run(self, *, burst: bool = False) -> WorkerStats:
        """Consume until ``stop()``, starting again after a failure."""
        earlier: list[WorkerStats] = []
        while True:
            try:
                stats = await super().run(burst=burst)
                return _sum_stats([*earlier, stats])
            except Exception as exc:
                earlier.append(self.stats)
                if self._stop_asked.is_set():
                    # Failed while stopping (a last ack flush): what it held stays
                    # pending, for a claim by another consumer.
                    log.warning("worker of %s failed while stopping: %s", self.config.stream, exc)
                    return _sum_stats(earlier)
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
                return _sum_stats(earlier)
            self.restarts += 1
            # A fresh worker state (queues, events, tasks), same consumer name.
            StreamWorker.__init__(self, *self._args)


class PartitionedWorker:
    """One consumer of a group on every partition of a stream (competing consumers).

    ``config.stream`` is ignored: each partition's worker gets its partition's stream.
    ``config.concurrency`` is shared out over the partitions (at least 4 each).
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
        """What the partition workers did, summed (since their latest start)."""
        return _sum_stats([w.stats for w in self.workers])

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
        return _sum_stats(list(results))


# -- ordered mode: leases ---------------------------------------------------------------

# Registers a member until ARGV[2] ms from now (Redis's clock), forgets expired ones,
# and returns the live members in name order. One key: one slot on a cluster.
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


@dataclass(slots=True)
class _Owned:
    """A partition this worker holds the lease of, and the task consuming it."""

    name: str
    task: asyncio.Task[None]
    stop: asyncio.Event


class OrderedWorker:
    """One worker of a group in ordered mode: owns some partitions, one entry at a time each.

    The lease lasts ``config.claim_idle_ms`` and is renewed every third of it; a worker
    that stops renewing (dead, paused) loses its partitions to the others after that.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        layout: PartitionLayout,
        config: WorkerConfig,
        handler: Handler,
    ) -> None:
        self.layout = layout
        self.config = replace(config, stream=layout.names[0])
        self._redis = redis
        self._handler = handler
        self.stats = WorkerStats()
        self._owned: dict[str, _Owned] = {}
        self._stopping = asyncio.Event()
        self._started = asyncio.Event()
        self._members = redis.register_script(_MEMBERS_SCRIPT)
        self._renew = redis.register_script(_RENEW_SCRIPT)
        self._release = redis.register_script(_RELEASE_SCRIPT)
        #: Partition name -> count of rebalances that gave it to this worker (for tests).
        self.acquired: dict[str, int] = {}

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
        members = [
            m.decode() if isinstance(m, bytes) else str(m)
            for m in await self._members(
                keys=[members_key(self.layout.stream, cfg.group)],
                args=[self.consumer, self.lease_ms, 1],
            )
        ]
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
        stop = asyncio.Event()
        task = asyncio.create_task(self._consume(name, stop), name=f"orderflow-ordered-{name}")
        self._owned[name] = _Owned(name, task, stop)
        self.acquired[name] = self.acquired.get(name, 0) + 1
        log.info("worker %s took partition %s", self.consumer, name)

    async def _give_up(self, name: str, *, release: bool = True) -> None:
        owned = self._owned.pop(name, None)
        if owned is None:
            return
        owned.stop.set()
        done, _ = await asyncio.wait({owned.task}, timeout=self.config.shutdown_timeout_s)
        if not done:
            owned.task.cancel()
            await asyncio.gather(owned.task, return_exceptions=True)
        if release:
            with contextlib.suppress(*_REDIS_FAILURES):
                await self._release(keys=[lease_key(name, self.config.group)], args=[self.consumer])
        log.info("worker %s gave partition %s up", self.consumer, name)

    # -- consuming one partition, one entry at a time ----------------------------------

    async def _consume(self, name: str, stop: asyncio.Event) -> None:
        failures = 0
        # First what earlier owners left pending (older than anything unread), in order.
        start: str | None = "0-0"
        while not stop.is_set():
            try:
                if start is not None:
                    reply: Any = await self._redis.xautoclaim(
                        name, self.config.group, self.consumer, 0, start, self.config.batch_size
                    )
                    entries = [(i, f) for i, f in reply[1] if i is not None and f is not None]
                    if len(entries) < len(reply[1]) and len(reply) < 3:
                        # Redis 6.2: entries deleted while pending come back nil, and
                        # would stay pending forever (see ack_deleted_pending).
                        await ack_deleted_pending(
                            self._redis, name, self.config.group, self.consumer, start
                        )
                    next_start = _text(reply[0])
                    start = None if next_start == "0-0" else next_start
                    claimed = True
                else:
                    read: Any = await self._redis.xreadgroup(
                        self.config.group,
                        self.consumer,
                        {name: ">"},
                        count=self.config.batch_size,
                        block=min(self.config.block_ms, max(10, self.lease_ms // 3)),
                    )
                    entries = read[0][1] if read else []
                    claimed = False
                failures = 0
            except ResponseError as exc:
                if not str(exc).startswith(("NOGROUP", "UNBLOCKED")):
                    raise
                await self._ensure_group(name)
                continue
            except _REDIS_FAILURES as exc:
                failures += 1
                if failures == 1 or failures % 20 == 0:
                    log.warning("partition %s: Redis unavailable (%s)", name, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), min(2.0, 0.05 * 2 ** min(failures, 6)))
                continue
            if claimed and entries:
                self.stats.claimed += len(entries)
            for raw_id, entry_fields in entries:
                if stop.is_set():
                    # Not handled: left pending for the next owner, which claims it first.
                    break
                await self._process(name, _text(raw_id), entry_fields)

    async def _process(self, name: str, entry_id: str, entry_fields: Mapping[bytes, bytes]) -> None:
        cfg = self.config
        labels = (name, cfg.group)
        try:
            message = decode(entry_fields, entry_id)
        except DecodeError as exc:
            await self._dead_letter(name, entry_id, entry_fields, f"malformed entry: {exc}", 1)
            return
        attempt = 1
        while True:
            metrics.CONSUMED.labels(*labels).inc()
            try:
                await self._handler(Delivery(message, entry_id, name, attempt))
            except PermanentError as exc:
                self.stats.failed += 1
                await self._dead_letter(
                    name, entry_id, entry_fields, f"permanent failure: {exc}", attempt
                )
                return
            except Exception as exc:
                self.stats.failed += 1
                reason = f"{type(exc).__name__}: {exc}"
                if attempt >= cfg.max_deliveries:
                    await self._dead_letter(name, entry_id, entry_fields, reason, attempt)
                    return
                # The partition waits for this entry: that is what ordered means.
                self.stats.retried += 1
                metrics.RETRIED.labels(*labels).inc()
                await asyncio.sleep(cfg.backoff_s(attempt))
                attempt += 1
                continue
            break
        self.stats.handled += 1
        await self._with_retries("ack", lambda: self._redis.xack(name, cfg.group, entry_id))
        self.stats.acked += 1
        metrics.ACKED.labels(*labels).inc()

    async def _dead_letter(
        self,
        name: str,
        entry_id: str,
        entry_fields: Mapping[bytes, bytes],
        reason: str,
        deliveries: int,
    ) -> None:
        cfg = self.config
        record: dict[bytes | str, bytes | str] = {
            k: v for k, v in entry_fields.items() if not _text(k).startswith("dlq_")
        }
        record.update(
            {
                "dlq_reason": reason[:1000],
                "dlq_time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "dlq_stream": name,
                "dlq_group": cfg.group,
                "dlq_consumer": cfg.consumer,
                "dlq_deliveries": str(deliveries),
                "dlq_source_id": entry_id,
            }
        )

        async def move() -> Any:
            # Partition and dead letters share a slot: one transaction, even on a cluster.
            pipe = self._redis.pipeline(transaction=True)
            pipe.xadd(name + ":dlq", cast(Any, record), maxlen=cfg.dlq_maxlen, approximate=True)
            pipe.xack(name, cfg.group, entry_id)
            return await pipe.execute()

        await self._with_retries("dead-letter", move)
        self.stats.dead_lettered += 1
        metrics.DEAD_LETTERED.labels(name, cfg.group).inc()
        log.warning("dead-lettered entry %s of %s: %s", entry_id, name, reason)

    async def _with_retries(self, what: str, call: Any) -> None:
        attempt = 0
        while True:
            try:
                await call()
                return
            except _REDIS_FAILURES as exc:
                attempt += 1
                if attempt > 50:
                    raise
                if attempt == 1:
                    log.warning("%s failed (%s); retrying", what, exc)
                await asyncio.sleep(random.uniform(0.025, 0.05) * min(attempt, 20))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
