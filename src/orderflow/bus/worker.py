"""The consumer-group worker: at-least-once handling of a Redis stream.

One worker is one consumer of one group. It reads new entries (``>``) in batches,
runs the handler on each with bounded concurrency, acknowledges after success
(acks are batched), retries failures with exponential backoff and jitter without
holding up other entries, dead-letters an entry after too many deliveries (atomically
with its ack), claims entries that other consumers left idle, keeps its own entries
from being claimed while it is alive, and survives Redis going away.

Delivery counts are Redis's own (the group's pending entries list), so they survive a
restart of the worker and, with AOF, of Redis.

Per entry the worker does little besides the handler: XREADGROUP's reply is used as
hiredis parses it (``read_group``), ``decode_entry`` makes every check of wire format v1
with a few C calls (a malformed entry is dead-lettered, never handed over), handlers
that do not wait run one after another in one lane task, and the per-delivery metrics
are counted here and added to Prometheus in bulk when acks are flushed (XACK per batch,
packed by hiredis). See bench/RESULTS.md for what each part costs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
import uuid
from bisect import bisect_left
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from orderflow.bus import metrics
from orderflow.bus.keys import StreamKeys
from orderflow.bus.message import DecodeError, Message, decode_entry
from orderflow.bus.streams import ensure_group, flat_fields, read_group, send_commands

log = logging.getLogger(__name__)

#: Errors after which the worker waits and tries again instead of giving up.
TRANSIENT_REDIS_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
    TimeoutError,
    OSError,
)

_HEARTBEAT_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT_REDIS_ERRORS, ResponseError)

# Refreshes the idle time of the entries this consumer still owns, so that a long
# handler or a pending retry is not claimed by another consumer while this one lives.
# Checks the owner first, in the same atomic step, so it never steals an entry back.
# Returns the ids this consumer no longer owns.
_HEARTBEAT_SCRIPT = """
local lost = {}
for i = 2, #ARGV - 1 do
  local id = ARGV[i]
  local row = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if #row == 1 and row[1][2] == ARGV[#ARGV] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[#ARGV], 0, id, 'JUSTID')
  else
    table.insert(lost, id)
  end
end
return lost
"""

# Deletes consumers of a group that are idle and own nothing, atomically, so a
# consumer that reads an entry in between is never deleted with it.
_PRUNE_SCRIPT = """
local deleted = {}
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
  if info['name'] ~= ARGV[3] and tonumber(info['pending']) == 0
     and tonumber(info['idle']) > tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    table.insert(deleted, info['name'])
  end
end
return deleted
"""


class PermanentError(Exception):
    """Raised by a handler for a failure that no retry can fix: dead-letter at once."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One delivery of a message to a handler."""

    message: Message
    entry_id: str
    stream: str
    #: 1 on the first delivery; Redis's count, so it survives restarts.
    deliveries: int = 1


Handler = Callable[[Delivery], Awaitable[None]]

_new = object.__new__
_set_message: Callable[[Delivery, Message], None] = Delivery.__dict__["message"].__set__
_set_entry_id: Callable[[Delivery, str], None] = Delivery.__dict__["entry_id"].__set__
_set_stream: Callable[[Delivery, str], None] = Delivery.__dict__["stream"].__set__
_set_deliveries: Callable[[Delivery, int], None] = Delivery.__dict__["deliveries"].__set__


def _delivery(message: Message, entry_id: str, stream: str, deliveries: int) -> Delivery:
    # Delivery(...) without the frozen dataclass's generic setattr: a third of the cost.
    delivery: Delivery = _new(Delivery)
    _set_message(delivery, message)
    _set_entry_id(delivery, entry_id)
    _set_stream(delivery, stream)
    _set_deliveries(delivery, deliveries)
    return delivery


def consumer_name() -> str:
    """A unique consumer name: host, process and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """What a worker consumes and how; validated on construction."""

    stream: str
    group: str
    consumer: str = field(default_factory=consumer_name)
    #: Where a new group starts: ``0`` so nothing published before it existed is missed.
    start_id: str = "0"
    concurrency: int = 64
    batch_size: int = 100
    block_ms: int = 1000
    claim_idle_ms: int = 60_000
    #: How often to look for idle entries to claim; default: a quarter of claim_idle_ms.
    claim_interval_ms: int | None = None
    max_deliveries: int = 5
    retry_base_ms: int = 200
    retry_max_ms: int = 30_000
    shutdown_timeout_s: float = 10.0
    dlq_maxlen: int = 100_000
    #: Consumers idle this long with nothing pending are removed from the group.
    prune_idle_ms: int | None = 3_600_000
    reconnect_max_s: float = 5.0

    def __post_init__(self) -> None:
        StreamKeys(self.stream)
        for name in ("group", "consumer", "start_id"):
            value = getattr(self, name)
            if not value or any(ch.isspace() for ch in value):
                raise ValueError(f"WorkerConfig.{name} must be non-empty without spaces")
        positive = {
            "concurrency": self.concurrency,
            "batch_size": self.batch_size,
            "block_ms": self.block_ms,
            "claim_idle_ms": self.claim_idle_ms,
            "max_deliveries": self.max_deliveries,
            "retry_base_ms": self.retry_base_ms,
            "retry_max_ms": self.retry_max_ms,
            "dlq_maxlen": self.dlq_maxlen,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"WorkerConfig.{name} must be a positive integer, got {value!r}")
        if self.claim_interval_ms is not None and self.claim_interval_ms < 1:
            raise ValueError("WorkerConfig.claim_interval_ms must be positive")
        if self.shutdown_timeout_s < 0:
            raise ValueError("WorkerConfig.shutdown_timeout_s must not be negative")
        if self.prune_idle_ms is not None and self.prune_idle_ms < self.claim_idle_ms:
            raise ValueError("WorkerConfig.prune_idle_ms must be at least claim_idle_ms")

    @property
    def keys(self) -> StreamKeys:
        """The stream's keys (and its dead-letter stream)."""
        return StreamKeys(self.stream)

    @property
    def claim_interval_s(self) -> float:
        """Seconds between two looks for idle entries."""
        if self.claim_interval_ms is not None:
            return self.claim_interval_ms / 1000
        return max(0.05, self.claim_idle_ms / 4000)

    @property
    def heartbeat_interval_s(self) -> float:
        """Seconds between two refreshes of the idle time of held entries."""
        return max(0.02, self.claim_idle_ms / 3000)

    def backoff_s(self, deliveries: int) -> float:
        """Delay before delivery ``deliveries + 1``: exponential, capped, full jitter."""
        ceiling = min(self.retry_max_ms, self.retry_base_ms * 2 ** (deliveries - 1))
        return random.uniform(ceiling / 2, ceiling) / 1000


@dataclass(slots=True)
class WorkerStats:
    """Counts of what one worker did, for tests, status lines and burst runs."""

    handled: int = 0
    failed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    claimed: int = 0
    acked: int = 0
    redis_errors: int = 0


class StreamWorker:
    """One consumer in a consumer group, running ``handler`` on every entry."""

    def __init__(self, redis: aioredis.Redis, config: WorkerConfig, handler: Handler) -> None:
        self._redis = redis
        self.config = config
        self._handler = handler
        self.stats = WorkerStats()
        self._labels = (config.stream, config.group)
        # Metric children looked up once: ``labels()`` per entry is a dict lookup under a lock.
        self._consumed = metrics.CONSUMED.labels(*self._labels)
        self._handler_seconds = metrics.HANDLER_SECONDS.labels(*self._labels)
        self._acked = metrics.ACKED.labels(*self._labels)
        #: Per-delivery metrics counted here and added to Prometheus in bulk by the ack
        #: loop (a Prometheus update takes a lock: per entry it cost as much as a handler).
        self._consumed_count = 0
        self._handler_bounds: tuple[float, ...] = tuple(self._handler_seconds._upper_bounds)
        self._handler_buckets = [0] * len(self._handler_bounds)
        self._handler_total_s = 0.0
        #: Entries this worker holds: queued, being handled, or being claimed for a retry.
        self._inflight: set[str] = set()
        #: Entries read but not yet handed to a handler, in stream order: id, fields as
        #: Redis replies them (flat: name, value ...), delivery count.
        self._queue: deque[tuple[str, list[bytes], int]] = deque()
        #: The tasks that run handlers, one entry at a time each; at most ``concurrency``.
        self._lanes: set[asyncio.Task[None]] = set()
        self._lane_starting = False
        self._retrying: dict[str, asyncio.TimerHandle] = {}
        self._retry_tasks: set[asyncio.Task[None]] = set()
        self._acks: list[str] = []
        self._ack_wakeup = asyncio.Event()
        self._ack_lock = asyncio.Lock()
        self._capacity = asyncio.Event()
        #: Whether the reader waits for capacity (so lanes only signal it then).
        self._reader_waiting = False
        self._stopping = asyncio.Event()
        self._heartbeat = redis.register_script(_HEARTBEAT_SCRIPT)
        self._prune = redis.register_script(_PRUNE_SCRIPT)
        self._burst = False
        self._started = asyncio.Event()
        self._failure: BaseException | None = None

    @property
    def consumer(self) -> str:
        """This worker's consumer name in its group."""
        return self.config.consumer

    @property
    def held(self) -> int:
        """Entries this worker owns right now: running or waiting for a retry."""
        return len(self._inflight) + len(self._retrying)

    def stop(self) -> None:
        """Ask the worker to stop: no new reads, in-flight work finishes, acks flushed."""
        self._stopping.set()
        self._capacity.set()

    async def wait_started(self) -> None:
        """Return once the worker's group exists and it is reading."""
        await self._started.wait()

    async def run(self, *, burst: bool = False) -> WorkerStats:
        """Consume until ``stop()``; with ``burst``, until the stream is drained."""
        self._burst = burst
        await self._ensure_group()
        self._started.set()
        background = [
            asyncio.create_task(self._ack_loop(), name="orderflow-acks"),
            asyncio.create_task(self._heartbeat_loop(), name="orderflow-heartbeat"),
        ]
        readers = [asyncio.create_task(self._read_loop(), name="orderflow-read")]
        if not burst:
            readers.append(asyncio.create_task(self._claim_loop(), name="orderflow-claim"))
            if self.config.prune_idle_ms is not None:
                readers.append(asyncio.create_task(self._prune_loop(), name="orderflow-prune"))
        for task in readers + background:
            task.add_done_callback(self._loop_ended)
        try:
            await self._stopping.wait()
        finally:
            await self._shutdown(readers, background)
        if self._failure is not None:
            raise self._failure
        return self.stats

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        # A loop only ends by itself on a bug or an unexpected Redis reply: stop the
        # worker and let run() raise it, rather than live on without reading.
        if task.cancelled() or task.exception() is None:
            return
        if self._failure is None:
            self._failure = task.exception()
            log.error("worker loop %s failed; stopping", task.get_name(), exc_info=self._failure)
        self.stop()

    # -- reading and claiming ------------------------------------------------------

    def _free(self) -> int:
        # Entries waiting for a retry count too, so a failing handler applies
        # backpressure instead of letting the worker hoard the stream.
        # Room for two batches at least, so the next read is in flight while the lanes
        # work through the last one.
        return max(self.config.concurrency, self.config.batch_size) * 2 - self.held

    async def _wait_capacity(self) -> None:
        while self._free() <= 0 and not self._stopping.is_set():
            self._capacity.clear()
            self._reader_waiting = True
            try:
                await self._capacity.wait()
            finally:
                self._reader_waiting = False

    async def _wait_for_lanes(self, timeout: float) -> None:
        """Wait until a held entry is done (or ``timeout``)."""
        self._capacity.clear()
        self._reader_waiting = True
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._capacity.wait(), timeout)
        finally:
            self._reader_waiting = False

    async def _read_loop(self) -> None:
        cfg = self.config
        failures = 0
        while not self._stopping.is_set():
            await self._wait_capacity()
            if self._stopping.is_set():
                return
            count = min(cfg.batch_size, self._free())
            try:
                entries = await read_group(
                    self._redis,
                    cfg.stream,
                    cfg.group,
                    cfg.consumer,
                    count=count,
                    # Burst: never BLOCK (Redis times a BLOCK out on its next cron tick,
                    # up to 100 ms late); an empty reply ends the run or waits below.
                    block_ms=cfg.block_ms if not self._burst else None,
                )
                failures = 0
            except ResponseError as exc:
                if not _is_nogroup(exc):
                    raise
                log.warning("group %s on %s vanished; creating it again", cfg.group, cfg.stream)
                await self._ensure_group()
                continue
            except TRANSIENT_REDIS_ERRORS as exc:
                failures += 1
                await self._redis_down("read", exc, failures)
                continue
            if entries:
                inflight, queue = self._inflight, self._queue
                for raw_id, fields in entries:
                    entry_id = raw_id.decode()
                    inflight.add(entry_id)
                    queue.append((entry_id, fields, 1))
                self._add_lane()
                if len(entries) < count:
                    # No backlog: let the lanes start on these before sending the next
                    # read (which will block anyway), for latency. With a backlog the
                    # read goes first, so that it overlaps the handling.
                    await asyncio.sleep(0)
            elif self._burst:
                if not self.held:
                    self.stop()
                    return
                # Nothing new, but entries still held (handlers running, retries due):
                # read again once one is done.
                await self._wait_for_lanes(timeout=0.05)

    async def _claim_loop(self) -> None:
        cfg = self.config
        failures = 0
        while not self._stopping.is_set():
            try:
                await self._claim_idle()
                failures = 0
            except ResponseError as exc:
                if not _is_nogroup(exc):
                    raise
                await self._ensure_group()
            except TRANSIENT_REDIS_ERRORS as exc:
                failures += 1
                await self._redis_down("claim", exc, failures)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), cfg.claim_interval_s)

    async def _claim_idle(self) -> None:
        """Claim entries other consumers left idle, as many as there is room for."""
        cfg = self.config
        start = "0-0"
        while self._free() > 0 and not self._stopping.is_set():
            reply = await self._redis.xautoclaim(
                cfg.stream, cfg.group, cfg.consumer, cfg.claim_idle_ms, start, self._free()
            )
            claimed = [(_text(i), f) for i, f in reply[1] if i is not None and f is not None]
            if len(claimed) < len(reply[1]) and len(reply) < 3:
                # A server whose reply has no list of deleted ids (Redis 6.2) answers an
                # entry deleted while pending with nil and keeps it pending: acknowledge it.
                await ack_deleted_pending(self._redis, cfg.stream, cfg.group, cfg.consumer, start)
            start = _text(reply[0])
            claimed = [(i, f) for i, f in claimed if i not in self._inflight]
            if claimed:
                counts = await self._delivery_counts(i for i, _ in claimed)
                self.stats.claimed += len(claimed)
                metrics.CLAIMED.labels(*self._labels).inc(len(claimed))
                log.info("claimed %d idle entries of %s", len(claimed), cfg.stream)
                for entry_id, fields in claimed:
                    self._start(entry_id, flat_fields(fields), counts.get(entry_id, 1))
            if start == "0-0":
                return

    async def _delivery_counts(self, entry_ids: Iterable[str]) -> dict[str, int]:
        ids = sorted(entry_ids, key=_id_key)
        rows = await self._redis.xpending_range(
            self.config.stream,
            self.config.group,
            min=ids[0],
            max=ids[-1],
            count=len(ids) + self.held,
            consumername=self.config.consumer,
        )
        return {_text(cast(bytes, row["message_id"])): int(row["times_delivered"]) for row in rows}

    # -- handling ------------------------------------------------------------------

    def _start(self, entry_id: str, fields: list[bytes], deliveries: int) -> None:
        self._inflight.add(entry_id)
        self._queue.append((entry_id, fields, deliveries))
        self._add_lane()

    def _add_lane(self) -> None:
        # One task per entry costs more than a fast handler does. Instead a lane runs
        # queued entries one after another, and keeps one spare lane starting: the spare
        # only runs once the current handler waits, so handlers that never wait cost no
        # task per entry, and handlers that do wait get up to `concurrency` lanes.
        if self._queue and not self._lane_starting and len(self._lanes) < self.config.concurrency:
            self._lane_starting = True
            lane = asyncio.create_task(self._lane(), name="orderflow-lane")
            self._lanes.add(lane)
            lane.add_done_callback(self._lanes.discard)

    async def _lane(self) -> None:
        # The hot path, kept in one function: per entry it decodes, runs the handler and
        # queues the ack, with the rare outcomes (malformed, failed, too many deliveries)
        # in _settle. Metrics are counted here and flushed in bulk by the ack loop.
        self._lane_starting = False
        queue, inflight, acks = self._queue, self._inflight, self._acks
        handler, stream, stats = self._handler, self.config.stream, self.stats
        max_deliveries = self.config.max_deliveries
        bounds, buckets = self._handler_bounds, self._handler_buckets
        clock = time.perf_counter
        while queue:
            entry_id, fields, deliveries = queue.popleft()
            if not self._lane_starting:
                self._add_lane()
            try:
                try:
                    message = decode_entry(fields, entry_id)
                except DecodeError as exc:
                    await self._dead_letter(entry_id, fields, f"malformed entry: {exc}", deliveries)
                    continue
                if deliveries > max_deliveries:
                    await self._settle(entry_id, fields, deliveries, None)
                    continue
                self._consumed_count += 1
                started = clock()
                try:
                    await handler(_delivery(message, entry_id, stream, deliveries))
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._observe(clock() - started)
                    await self._settle(entry_id, fields, deliveries, exc)
                    continue
                elapsed = clock() - started
                buckets[bisect_left(bounds, elapsed)] += 1
                self._handler_total_s += elapsed
                stats.handled += 1
                acks.append(entry_id)
                if len(acks) == 1:
                    # The first since the last flush: wake the ack loop (it takes them all).
                    self._ack_wakeup.set()
            except Exception:
                # _settle handles every failure of the handler; this is a bug or an
                # unexpected Redis reply. The entry stays pending, for a claim later.
                log.exception("processing entry %s of %s failed", entry_id, stream)
            finally:
                inflight.discard(entry_id)
                if self._reader_waiting:
                    self._capacity.set()

    def _observe(self, seconds: float) -> None:
        self._handler_buckets[bisect_left(self._handler_bounds, seconds)] += 1
        self._handler_total_s += seconds

    def _finished(self, entry_id: str) -> None:
        self._inflight.discard(entry_id)
        self._capacity.set()

    async def _settle(
        self, entry_id: str, fields: list[bytes], deliveries: int, exc: Exception | None
    ) -> None:
        """The rare outcomes: delivered too often (``exc`` None), or the handler failed."""
        cfg = self.config
        # Failures are rare: count them in Prometheus now, not at the next ack.
        self._ack_wakeup.set()
        if exc is None:
            reason = f"delivered {deliveries} times without success (limit {cfg.max_deliveries})"
            await self._dead_letter(entry_id, fields, reason, deliveries)
            return
        self.stats.failed += 1
        if isinstance(exc, PermanentError):
            await self._dead_letter(entry_id, fields, f"permanent failure: {exc}", deliveries)
        elif deliveries >= cfg.max_deliveries:
            reason = f"{type(exc).__name__}: {exc}"
            await self._dead_letter(entry_id, fields, reason, deliveries)
        else:
            self._schedule_retry(entry_id, deliveries, f"{type(exc).__name__}: {exc}")

    def _ack(self, entry_id: str) -> None:
        self._acks.append(entry_id)
        self._ack_wakeup.set()

    # -- retries -------------------------------------------------------------------

    def _schedule_retry(self, entry_id: str, deliveries: int, reason: str) -> None:
        delay = self.config.backoff_s(deliveries)
        self.stats.retried += 1
        metrics.RETRIED.labels(*self._labels).inc()
        log.info(
            "entry %s of %s failed (delivery %d): %s; retrying in %.2fs",
            entry_id,
            self.config.stream,
            deliveries,
            reason,
            delay,
        )
        loop = asyncio.get_running_loop()
        self._retrying[entry_id] = loop.call_later(delay, self._retry_due, entry_id)

    def _retry_due(self, entry_id: str) -> None:
        if self._retrying.pop(entry_id, None) is None or self._stopping.is_set():
            return
        task = asyncio.create_task(self._retry(entry_id))
        # Count it as in flight at once, so the capacity stays right meanwhile.
        self._inflight.add(entry_id)
        self._retry_tasks.add(task)
        task.add_done_callback(self._retry_tasks.discard)

    async def _retry(self, entry_id: str) -> None:
        # Claims the entry back (its delivery count goes up), then queues it for a lane,
        # so retries share the `concurrency` limit with new entries.
        queued = False
        try:
            queued = await self._claim_for_retry(entry_id)
        except ResponseError as exc:
            if not _is_nogroup(exc):
                raise
            # The group was deleted (and its pending entries with it); the read loop
            # creates it again and the entry is read again from where it starts.
            log.warning(
                "group %s vanished before entry %s was retried", self.config.group, entry_id
            )
        finally:
            if not queued:
                self._finished(entry_id)

    async def _claim_for_retry(self, entry_id: str) -> bool:
        cfg = self.config
        attempt = 0
        while True:
            try:
                pipe = self._redis.pipeline(transaction=False)
                pipe.xclaim(cfg.stream, cfg.group, cfg.consumer, 0, [entry_id])
                pipe.xpending_range(
                    cfg.stream, cfg.group, entry_id, entry_id, 1, consumername=cfg.consumer
                )
                claimed, pending = await pipe.execute()
                break
            except TRANSIENT_REDIS_ERRORS as exc:
                if self._stopping.is_set():
                    return False
                attempt += 1
                await self._redis_down("retry", exc, attempt)
        entries = [(i, f) for i, f in claimed if i is not None and f is not None]
        if not entries:
            # Deleted from the stream or acknowledged elsewhere: nothing left to do.
            self._ack(entry_id)
            return False
        deliveries = int(pending[0]["times_delivered"]) if pending else 1
        self._queue.append((entry_id, flat_fields(entries[0][1]), deliveries))
        self._add_lane()
        return True

    # -- dead letters --------------------------------------------------------------

    async def _dead_letter(
        self, entry_id: str, fields: list[bytes], reason: str, deliveries: int
    ) -> None:
        """Move an entry to the dead-letter stream and ack it, in one transaction."""
        cfg = self.config
        record: dict[bytes | str, bytes | str] = {
            k: v for k, v in zip(fields[::2], fields[1::2], strict=True) if not _is_dlq_field(k)
        }
        record.update(
            {
                "dlq_reason": reason[:1000],
                "dlq_time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "dlq_stream": cfg.stream,
                "dlq_group": cfg.group,
                "dlq_consumer": cfg.consumer,
                "dlq_deliveries": str(deliveries),
                "dlq_source_id": entry_id,
            }
        )
        attempt = 0
        while True:
            try:
                pipe = self._redis.pipeline(transaction=True)
                pipe.xadd(
                    cfg.keys.dlq,
                    cast(Any, record),
                    maxlen=cfg.dlq_maxlen,
                    approximate=True,
                )
                pipe.xack(cfg.stream, cfg.group, entry_id)
                await pipe.execute()
                break
            except TRANSIENT_REDIS_ERRORS as exc:
                attempt += 1
                if self._stopping.is_set() and attempt > 3:
                    log.warning("could not dead-letter %s before stopping", entry_id)
                    return
                await self._redis_down("dead-letter", exc, attempt)
        self.stats.dead_lettered += 1
        metrics.DEAD_LETTERED.labels(*self._labels).inc()
        log.warning("dead-lettered entry %s of %s: %s", entry_id, cfg.stream, reason)

    # -- background loops ----------------------------------------------------------

    async def _ack_loop(self) -> None:
        failures = 0
        while True:
            await self._ack_wakeup.wait()
            self._ack_wakeup.clear()
            self._flush_metrics()
            try:
                await self._flush_acks()
                failures = 0
            except TRANSIENT_REDIS_ERRORS as exc:
                failures += 1
                self._ack_wakeup.set()
                await self._redis_down("ack", exc, failures)

    def _flush_metrics(self) -> None:
        """Add the deliveries counted since the last flush to the Prometheus metrics."""
        if self._consumed_count:
            self._consumed.inc(self._consumed_count)
            self._consumed_count = 0
        buckets = self._handler_buckets
        if any(buckets):
            # prometheus_client has no bulk observe: add to the histogram's bucket and
            # sum values as observe() does, once per bucket instead of once per delivery.
            histogram = self._handler_seconds
            histogram._sum.inc(self._handler_total_s)
            for i, count in enumerate(buckets):
                if count:
                    histogram._buckets[i].inc(count)
                    # In place: a running lane holds this list.
                    buckets[i] = 0
            self._handler_total_s = 0.0

    async def _flush_acks(self) -> None:
        # One flush at a time: the final flush on stop waits for one in flight.
        async with self._ack_lock:
            await self._flush_acks_locked()

    async def _flush_acks_locked(self) -> None:
        acks = self._acks
        while acks:
            # Emptied in place: a running lane holds this list.
            ids = acks.copy()
            acks.clear()
            try:
                # Packed in C: redis-py packs 100 ids in Python for longer than it takes to
                # handle them.
                await send_commands(
                    self._redis, [("XACK", self.config.stream, self.config.group, *ids)]
                )
            except BaseException:
                self._acks[:0] = ids
                raise
            self.stats.acked += len(ids)
            self._acked.inc(len(ids))

    async def _heartbeat_loop(self) -> None:
        cfg = self.config
        while True:
            await asyncio.sleep(cfg.heartbeat_interval_s)
            held = list(self._inflight) + list(self._retrying)
            if not held:
                continue
            try:
                lost = await self._heartbeat(
                    keys=[cfg.stream], args=[cfg.group, *held, cfg.consumer]
                )
            except _HEARTBEAT_ERRORS as exc:
                log.debug("heartbeat failed: %s", exc)
                continue
            for raw in lost:
                entry_id = _text(raw)
                handle = self._retrying.pop(entry_id, None)
                if handle is not None:
                    # Another consumer owns it now; its retry is theirs to do.
                    handle.cancel()
                    self._capacity.set()

    async def _prune_loop(self) -> None:
        cfg = self.config
        assert cfg.prune_idle_ms is not None
        interval = max(1.0, cfg.prune_idle_ms / 10_000)
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval)
            if self._stopping.is_set():
                return
            with contextlib.suppress(*TRANSIENT_REDIS_ERRORS, ResponseError):
                deleted = await self._prune(
                    keys=[cfg.stream], args=[cfg.group, cfg.prune_idle_ms, cfg.consumer]
                )
                if deleted:
                    log.info("removed idle consumers %s", [_text(d) for d in deleted])

    # -- lifecycle -----------------------------------------------------------------

    async def _ensure_group(self) -> None:
        attempt = 0
        while True:
            try:
                if await ensure_group(
                    self._redis,
                    self.config.stream,
                    self.config.group,
                    start_id=self.config.start_id,
                ):
                    log.info("created group %s on %s", self.config.group, self.config.stream)
                return
            except TRANSIENT_REDIS_ERRORS as exc:
                attempt += 1
                if self._stopping.is_set():
                    return
                await self._redis_down("group", exc, attempt)

    async def _redis_down(self, what: str, exc: BaseException, attempt: int) -> None:
        self.stats.redis_errors += 1
        metrics.REDIS_ERRORS.labels("worker").inc()
        delay = min(self.config.reconnect_max_s, 0.05 * 2 ** min(attempt, 10))
        delay = random.uniform(delay / 2, delay)
        if attempt == 1 or attempt % 20 == 0:
            log.warning("Redis unavailable (%s: %s); retrying in %.2fs", what, exc, delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)

    async def _shutdown(
        self, readers: list[asyncio.Task[None]], background: list[asyncio.Task[None]]
    ) -> None:
        cfg = self.config
        # Stop reading: the reader returns after its current BLOCK at most.
        _, pending = await asyncio.wait(readers, timeout=cfg.block_ms / 1000 + 1)
        for task in pending:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        # Entries waiting for a retry stay pending: another consumer will claim them.
        for handle in self._retrying.values():
            handle.cancel()
        self._retrying.clear()
        # Lanes finish what was read (a lane may start another meanwhile), until the timeout.
        deadline = time.monotonic() + cfg.shutdown_timeout_s
        while (busy := self._lanes | self._retry_tasks) and time.monotonic() < deadline:
            await asyncio.wait(busy, timeout=max(0.0, deadline - time.monotonic()))
        if busy:
            left = len(self._inflight)
            self._queue.clear()
            for task in busy:
                task.cancel()
            await asyncio.gather(*busy, return_exceptions=True)
            log.warning("%d entries left pending for other consumers", left)
        self._flush_metrics()
        for _ in range(3):
            try:
                await self._flush_acks()
                break
            except TRANSIENT_REDIS_ERRORS as exc:
                log.warning("could not flush acks on stop: %s", exc)
                await asyncio.sleep(0.2)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)


async def ack_deleted_pending(
    redis: aioredis.Redis, stream: str, group: str, consumer: str, start: str
) -> list[str]:
    """Acknowledge ``consumer``'s pending ids from ``start`` on whose entries are deleted.

    Redis 7.0+ drops such ids from the PEL itself when XAUTOCLAIM meets them; Redis 6.2
    claims them as nil entries, without their ids, and keeps them pending forever.
    """
    rows = await redis.xpending_range(
        stream, group, min=start, max="+", count=_DELETED_SCAN, consumername=consumer
    )
    gone = []
    for row in rows:
        entry_id = _text(cast(bytes, row["message_id"]))
        if not await redis.xrange(stream, entry_id, entry_id):
            gone.append(entry_id)
    if gone:
        await redis.xack(stream, group, *gone)
        log.info("acknowledged %d entries of %s deleted while pending", len(gone), stream)
    return gone


#: Most pending ids ``ack_deleted_pending`` looks at in one go (the rest: next claim).
_DELETED_SCAN = 1000


def _is_nogroup(exc: ResponseError) -> bool:
    # UNBLOCKED: the stream was deleted under a blocked read; the group went with it.
    # In a pipeline redis-py wraps the reply: "Command # 1 (XCLAIM …) … ('NOGROUP …',)".
    text = str(exc)
    return text.startswith(("NOGROUP", "UNBLOCKED")) or "NOGROUP " in text


def _is_dlq_field(name: bytes | str) -> bool:
    return (name.decode(errors="replace") if isinstance(name, bytes) else name).startswith("dlq_")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
