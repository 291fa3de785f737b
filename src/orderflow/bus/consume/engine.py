"""The consuming engine: at-least-once handling of one Redis stream by one consumer.

One engine is one consumer of one group on one stream. It reads new entries (``>``) in
batches, runs the handler on each with bounded concurrency, acknowledges after success
(acks are batched), retries failures with exponential backoff and jitter, dead-letters
an entry after too many deliveries (atomically with its ack), claims entries that other
consumers left idle, keeps its own entries from being claimed while it is alive, and
survives Redis going away. A :class:`Policy` says what differs between the consumer
modes: whether it claims idle entries, takes over every pending entry first, and
retries in place (the stream waits) or aside (later entries go on).

Delivery counts are Redis's own (the group's pending entries list), so they survive a
restart of the worker and, with AOF, of Redis.

Per entry the engine does little besides the handler: XREADGROUP's reply is used as
hiredis parses it (``read_group``), ``decode_entry`` makes every check of wire format v1
with a few C calls (a malformed entry is dead-lettered, never handed over), handlers
that do not wait run one after another in one lane task, and the delivery count is
added to Prometheus in bulk when acks are flushed (XACK per batch, packed by hiredis).
See bench/RESULTS.md for what each part costs.

With tracing on (``orderflow.tracing`` sets it up, ``bus.tracing`` makes the spans), each
handler call runs inside a CONSUMER span continuing the entry's ``traceparent``; off, the
lane pays one boolean check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterable
from typing import cast

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from orderflow.bus import metrics, tracing
from orderflow.bus.consume.config import WorkerConfig, WorkerStats
from orderflow.bus.consume.deadletter import dead_letter_record, move_to_dead_letters
from orderflow.bus.consume.heartbeat import Heartbeat
from orderflow.bus.consume.policy import COMPETING, Policy
from orderflow.bus.consume.retry import claim_back, reconnect_delay_s
from orderflow.bus.delivery import Handler, make_delivery
from orderflow.bus.entries import id_key, text
from orderflow.bus.errors import TRANSIENT, PermanentError, is_nogroup
from orderflow.bus.message import DecodeError, Message, decode_entry
from orderflow.bus.streams import ensure_group, flat_fields, read_group, send_commands

log = logging.getLogger("orderflow.bus.worker")

_HEARTBEAT_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT, ResponseError)


class Engine:
    """One consumer in a consumer group, running ``handler`` on every entry of one stream."""

    def __init__(
        self,
        redis: aioredis.Redis,
        config: WorkerConfig,
        handler: Handler,
        policy: Policy = COMPETING,
    ) -> None:
        self._redis = redis
        self.config = config
        self.policy = policy
        self._handler = handler
        self.stats = WorkerStats()
        self._labels = (config.stream, config.group)
        # Metric children looked up once: ``labels()`` per entry is a dict lookup under a lock.
        self._consumed = metrics.CONSUMED.labels(*self._labels)
        self._handler_seconds = metrics.HANDLER_SECONDS.labels(*self._labels)
        self._acked = metrics.ACKED.labels(*self._labels)
        #: Deliveries counted here and added to Prometheus in bulk by the ack loop (a
        #: Prometheus update takes a lock). Handler times are observed one by one:
        #: prometheus_client has no public bulk observe, and writing its internals saved
        #: under 10% of a no-op consumer's CPU (bench/case_compat.py).
        self._consumed_count = 0
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
        self._heartbeat = Heartbeat(redis, config.stream, config.group, config.consumer)
        self._burst = False
        self._started = asyncio.Event()
        self._failure: BaseException | None = None
        #: Tracing on: each handler call runs in a CONSUMER span (see _handle_traced).
        self._traced = tracing.enabled
        #: Entries claimed from other consumers, not yet handled (traced only).
        self._claimed_ids: set[str] = set()

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
            if self.policy.claim_idle:
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
        pending_first = self.policy.take_pending_first
        while not self._stopping.is_set():
            await self._wait_capacity()
            if self._stopping.is_set():
                return
            count = min(cfg.batch_size, self._free())
            try:
                if pending_first:
                    # What earlier owners left pending is older than anything unread.
                    await self._claim(0, wait=True)
                    pending_first = False
                    continue
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
                if not is_nogroup(exc):
                    raise
                log.warning("group %s on %s vanished; creating it again", cfg.group, cfg.stream)
                await self._ensure_group()
                continue
            except TRANSIENT as exc:
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
                # Refresh first what this worker holds: after a stall that kept the
                # heartbeat from running, its own entries are idle too, and claiming
                # them would count deliveries that never happened (and run a retry
                # before its backoff).
                try:
                    await self._refresh_held()
                except ResponseError as exc:
                    log.debug("refresh before claiming failed: %s", exc)
                await self._claim(cfg.claim_idle_ms, wait=False)
                failures = 0
            except ResponseError as exc:
                if not is_nogroup(exc):
                    raise
                await self._ensure_group()
            except TRANSIENT as exc:
                failures += 1
                await self._redis_down("claim", exc, failures)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), cfg.claim_interval_s)

    async def _claim(self, min_idle_ms: int, *, wait: bool) -> None:
        """Claim pending entries idle for ``min_idle_ms``, in stream order: as many as
        there is room for, or (``wait``) all of them, waiting for room in between."""
        cfg = self.config
        start = "0-0"
        while True:
            if wait:
                await self._wait_capacity()
            if self._free() <= 0 or self._stopping.is_set():
                return
            reply = await self._redis.xautoclaim(
                cfg.stream, cfg.group, cfg.consumer, min_idle_ms, start, self._free()
            )
            claimed = [(text(i), f) for i, f in reply[1] if i is not None and f is not None]
            if len(claimed) < len(reply[1]) and len(reply) < 3:
                # A server whose reply has no list of deleted ids (Redis 6.2) answers an
                # entry deleted while pending with nil and keeps it pending: acknowledge it.
                await ack_deleted_pending(self._redis, cfg.stream, cfg.group, cfg.consumer, start)
            start = text(reply[0])
            # Not what this worker holds: in flight, or waiting for its retry (idle only
            # because the heartbeat lagged; the retry takes it back after its backoff).
            inflight, retrying = self._inflight, self._retrying
            claimed = [(i, f) for i, f in claimed if i not in inflight and i not in retrying]
            if claimed:
                counts = await self._delivery_counts(i for i, _ in claimed)
                self.stats.claimed += len(claimed)
                metrics.CLAIMED.labels(*self._labels).inc(len(claimed))
                log.info("claimed %d idle entries of %s", len(claimed), cfg.stream)
                if self._traced:
                    self._claimed_ids.update(i for i, _ in claimed)
                for entry_id, fields in claimed:
                    self._start(entry_id, flat_fields(fields), counts.get(entry_id, 1))
            if start == "0-0":
                return

    async def _delivery_counts(self, entry_ids: Iterable[str]) -> dict[str, int]:
        ids = sorted(entry_ids, key=id_key)
        rows = await self._redis.xpending_range(
            self.config.stream,
            self.config.group,
            min=ids[0],
            max=ids[-1],
            count=len(ids) + self.held,
            consumername=self.config.consumer,
        )
        return {text(cast(bytes, row["message_id"])): int(row["times_delivered"]) for row in rows}

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
        observe = self._handler_seconds.observe
        clock = time.perf_counter
        traced = self._traced
        # Ordered: on stop, not one more entry (the next owner may have its lease already).
        stop_now, stopping = not self.policy.finish_read_on_stop, self._stopping
        while queue:
            if stop_now and stopping.is_set():
                break
            entry_id, fields, deliveries = queue.popleft()
            if not self._lane_starting:
                self._add_lane()
            requeued = False
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
                if traced:
                    requeued = await self._handle_traced(message, entry_id, fields, deliveries)
                    continue
                started = clock()
                try:
                    await handler(make_delivery(message, entry_id, stream, deliveries))
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    observe(clock() - started)
                    requeued = await self._settle(entry_id, fields, deliveries, exc)
                    continue
                observe(clock() - started)
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
                if not requeued:
                    inflight.discard(entry_id)
                if self._reader_waiting:
                    self._capacity.set()
        # Out of the lane set now, not in a done callback a loop turn later: with one
        # lane (ordered) an entry queued meanwhile would find no room for a new lane.
        current = asyncio.current_task()
        if current is not None:
            self._lanes.discard(current)

    async def _handle_traced(
        self, message: Message, entry_id: str, fields: list[bytes], deliveries: int
    ) -> bool:
        """The lane's handler call and its outcome, inside the delivery's CONSUMER span
        (tracing on only); returns whether the entry was queued again."""
        cfg = self.config
        with tracing.consuming(
            message.headers,
            stream=cfg.stream,
            group=cfg.group,
            consumer=cfg.consumer,
            entry_id=entry_id,
            message_id=message.id,
            deliveries=deliveries,
            claimed=entry_id in self._claimed_ids,
        ):
            self._claimed_ids.discard(entry_id)
            started = time.perf_counter()
            try:
                await self._handler(make_delivery(message, entry_id, cfg.stream, deliveries))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._handler_seconds.observe(time.perf_counter() - started)
                tracing.failed(exc)
                return await self._settle(entry_id, fields, deliveries, exc)
            self._handler_seconds.observe(time.perf_counter() - started)
        self.stats.handled += 1
        self._ack(entry_id)
        return False

    def _finished(self, entry_id: str) -> None:
        self._inflight.discard(entry_id)
        self._capacity.set()

    async def _settle(
        self, entry_id: str, fields: list[bytes], deliveries: int, exc: Exception | None
    ) -> bool:
        """The rare outcomes: delivered too often (``exc`` None), or the handler failed.

        Returns whether the entry was queued again at the front (a retry in place).
        """
        cfg = self.config
        # Failures are rare: count them in Prometheus now, not at the next ack.
        self._ack_wakeup.set()
        if exc is None:
            reason = f"delivered {deliveries} times without success (limit {cfg.max_deliveries})"
            await self._dead_letter(entry_id, fields, reason, deliveries)
            return False
        self.stats.failed += 1
        if isinstance(exc, PermanentError):
            await self._dead_letter(entry_id, fields, f"permanent failure: {exc}", deliveries)
        elif deliveries >= cfg.max_deliveries:
            reason = f"{type(exc).__name__}: {exc}"
            await self._dead_letter(entry_id, fields, reason, deliveries)
        elif self.policy.retry_in_place:
            return await self._retry_in_place(entry_id, deliveries, f"{type(exc).__name__}: {exc}")
        else:
            self._schedule_retry(entry_id, deliveries, f"{type(exc).__name__}: {exc}")
        return False

    def _ack(self, entry_id: str) -> None:
        self._acks.append(entry_id)
        self._ack_wakeup.set()

    # -- retries -------------------------------------------------------------------

    def _retry_delay(self, entry_id: str, deliveries: int, reason: str) -> float:
        delay = self.config.backoff_s(deliveries)
        self.stats.retried += 1
        metrics.RETRIED.labels(*self._labels).inc()
        if self._traced:
            tracing.event("retry scheduled", {"reason": reason, "delay_s": delay})
        log.info(
            "entry %s of %s failed (delivery %d): %s; retrying in %.2fs",
            entry_id,
            self.config.stream,
            deliveries,
            reason,
            delay,
        )
        return delay

    def _schedule_retry(self, entry_id: str, deliveries: int, reason: str) -> None:
        delay = self._retry_delay(entry_id, deliveries, reason)
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
            queued = await self._claim_for_retry(entry_id, front=False)
        except ResponseError as exc:
            if not is_nogroup(exc):
                raise
            # The group was deleted (and its pending entries with it); the read loop
            # creates it again and the entry is read again from where it starts.
            log.warning(
                "group %s vanished before entry %s was retried", self.config.group, entry_id
            )
        finally:
            if not queued:
                self._finished(entry_id)

    async def _retry_in_place(self, entry_id: str, deliveries: int, reason: str) -> bool:
        # The lane (the only one, in ordered mode) waits out the backoff holding the
        # entry, then puts it back at the front of the queue: nothing behind it runs first.
        delay = self._retry_delay(entry_id, deliveries, reason)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)
        if self._stopping.is_set():
            # Left pending: the next owner takes it over first.
            return False
        try:
            return await self._claim_for_retry(entry_id, front=True)
        except ResponseError as exc:
            if not is_nogroup(exc):
                raise
            log.warning(
                "group %s vanished before entry %s was retried", self.config.group, entry_id
            )
            return False

    async def _claim_for_retry(self, entry_id: str, *, front: bool) -> bool:
        cfg = self.config
        attempt = 0
        while True:
            try:
                claimed = await claim_back(
                    self._redis, cfg.stream, cfg.group, cfg.consumer, entry_id
                )
                break
            except TRANSIENT as exc:
                if self._stopping.is_set():
                    return False
                attempt += 1
                await self._redis_down("retry", exc, attempt)
        if claimed is None:
            # Deleted from the stream or acknowledged elsewhere: nothing left to do.
            self._ack(entry_id)
            return False
        fields, deliveries = claimed
        if front:
            self._queue.appendleft((entry_id, fields, deliveries))
        else:
            self._queue.append((entry_id, fields, deliveries))
            self._add_lane()
        return True

    # -- dead letters --------------------------------------------------------------

    async def _dead_letter(
        self, entry_id: str, fields: list[bytes], reason: str, deliveries: int
    ) -> None:
        """Move an entry to the dead-letter stream and ack it, in one transaction."""
        cfg = self.config
        record = dead_letter_record(
            zip(fields[::2], fields[1::2], strict=True),
            reason=reason,
            stream=cfg.stream,
            group=cfg.group,
            consumer=cfg.consumer,
            entry_id=entry_id,
            deliveries=deliveries,
        )
        attempt = 0
        while True:
            try:
                await move_to_dead_letters(
                    self._redis, cfg.stream, cfg.group, entry_id, record, maxlen=cfg.dlq_maxlen
                )
                break
            except TRANSIENT as exc:
                attempt += 1
                if self._stopping.is_set() and attempt > 3:
                    log.warning("could not dead-letter %s before stopping", entry_id)
                    return
                await self._redis_down("dead-letter", exc, attempt)
        self.stats.dead_lettered += 1
        metrics.DEAD_LETTERED.labels(*self._labels).inc()
        if self._traced:
            tracing.event("dead-lettered", {"reason": reason})
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
            except TRANSIENT as exc:
                failures += 1
                await self._redis_down("ack", exc, failures)
                # Stopping: the shutdown's own flush tries what is left. Trying again
                # here would spin (no back-off once stopping) and, on Python 3.11, the
                # wait_for in _redis_down could swallow the shutdown's cancel: a worker
                # stopped in an outage with an ack unsent never returned.
                if not self._stopping.is_set():
                    self._ack_wakeup.set()

    def _flush_metrics(self) -> None:
        """Add the deliveries counted since the last flush to the Prometheus metrics."""
        if self._consumed_count:
            self._consumed.inc(self._consumed_count)
            self._consumed_count = 0

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
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_s)
            try:
                await self._refresh_held()
            except _HEARTBEAT_ERRORS as exc:
                log.debug("heartbeat failed: %s", exc)

    async def _refresh_held(self) -> None:
        """Reset the idle time of what this worker holds; drop the retries of entries
        another consumer owns now."""
        held = list(self._inflight) + list(self._retrying)
        if not held:
            return
        for entry_id in await self._heartbeat.refresh(held):
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
            with contextlib.suppress(*TRANSIENT, ResponseError):
                deleted = await self._heartbeat.prune(cfg.prune_idle_ms)
                if deleted:
                    log.info("removed idle consumers %s", deleted)

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
            except TRANSIENT as exc:
                attempt += 1
                if self._stopping.is_set():
                    return
                await self._redis_down("group", exc, attempt)

    async def _redis_down(self, what: str, exc: BaseException, attempt: int) -> None:
        self.stats.redis_errors += 1
        metrics.REDIS_ERRORS.labels("worker").inc()
        delay = reconnect_delay_s(attempt, self.config.reconnect_max_s)
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
        if not self.policy.finish_read_on_stop:
            # Left pending, in order, for the next owner (which takes them over first).
            while self._queue:
                self._inflight.discard(self._queue.popleft()[0])
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
            except TRANSIENT as exc:
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
        entry_id = text(cast(bytes, row["message_id"]))
        if not await redis.xrange(stream, entry_id, entry_id):
            gone.append(entry_id)
    if gone:
        await redis.xack(stream, group, *gone)
        log.info("acknowledged %d entries of %s deleted while pending", len(gone), stream)
    return gone


#: Most pending ids ``ack_deleted_pending`` looks at in one go (the rest: next claim).
_DELETED_SCAN = 1000
