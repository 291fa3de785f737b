"""The outbox relay: publishes stored events to Redis, in batches, in creation order.

A row leaves the outbox only after Redis accepted its entry (at-least-once). Several
relays may run: on PostgreSQL they take disjoint batches (``FOR UPDATE SKIP LOCKED``);
on SQLite, which has a single writer anyway, one relay at a time holds a lease row
and the others stand by until it expires.

The rows this process commits can be handed to its relay (``hand_over``, SQLite): it
publishes them without reading them back, and removes the published rows from the
outbox a little later, several at once (``RelayConfig.settle_s``). The outbox stays
the source of truth: what is not published yet, or published and not yet removed when
the process dies, is there for the next look at it (at start, after a failure, and
every poll interval), which publishes it again (at-least-once, in creation order).
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
from dataclasses import dataclass, replace

import redis.asyncio as aioredis
import sqlalchemy as sa

from orderflow import tracing
from orderflow.bus import Message, PubSubPublisher, Retention, StreamPublisher
from orderflow.bus import metrics as bus_metrics
from orderflow.bus.errors import TRANSIENT as TRANSIENT_REDIS_ERRORS
from orderflow.bus.partitions import PartitionedPublisher, PartitionLayout, resolve_layout
from orderflow.config import Settings
from orderflow.orders import metrics
from orderflow.orders.events import lab_message
from orderflow.orders.outbox import NOTIFY_CHANNEL, ClaimedBatch, OutboxRow
from orderflow.orders.store import OrderStore

log = logging.getLogger(__name__)

#: How long a relay trusts the partition count it read from Redis.
_LAYOUT_TTL_S = 1.0
#: Errors after which the relay waits and tries again: Redis or the database is away.
_RETRYABLE: tuple[type[BaseException], ...] = (*TRANSIENT_REDIS_ERRORS, sa.exc.DBAPIError)
#: Most events in one pipelined XADD round trip, unless configured otherwise.
DEFAULT_BATCH_SIZE = 500


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """How the relay batches, waits and retries; validated on construction."""

    #: Most events in one pipelined XADD round trip (and one DB transaction).
    batch_size: int = DEFAULT_BATCH_SIZE
    #: Shortest and longest wait between two looks at the outbox when nothing woke
    #: the relay: short right after work, doubling while idle (no busy polling).
    min_poll_s: float = 0.02
    max_poll_s: float = 0.5
    #: SQLite: how long a relay's lease lasts without renewal (a dead relay's
    #: successor waits this long).
    lease_ttl_s: float = 15.0
    #: Longest wait between two tries while Redis or the database is down.
    retry_max_s: float = 2.0
    #: Pub/Sub mode: also PUBLISH each order on this channel.
    channel: str | None = None
    #: Handed rows (see ``OutboxRelay.hand_over``): how long published ones may wait
    #: to be removed from the outbox, so that one transaction removes several.
    settle_s: float = 0.05

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"RelayConfig.batch_size must be at least 1, got {self.batch_size}")
        if not 0 < self.min_poll_s <= self.max_poll_s:
            raise ValueError("RelayConfig needs 0 < min_poll_s <= max_poll_s")
        if self.lease_ttl_s <= self.max_poll_s * 2:
            raise ValueError("RelayConfig.lease_ttl_s must exceed twice max_poll_s")
        if self.retry_max_s <= 0:
            raise ValueError("RelayConfig.retry_max_s must be positive")
        if self.settle_s < 0:
            raise ValueError("RelayConfig.settle_s must not be negative")

    @classmethod
    def from_settings(
        cls, settings: Settings, *, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> RelayConfig:
        """The relay of ``settings``: in Pub/Sub mode it also publishes on the channel."""
        channel = settings.channel if settings.transport == "pubsub" else None
        return cls(batch_size=batch_size, channel=channel)


@dataclass(slots=True)
class RelayStats:
    """What one relay did."""

    published: int = 0
    batches: int = 0
    errors: int = 0


def _with_headers(message: Message, extra: dict[str, str]) -> Message:
    return Message(data=message.data, headers={**message.headers, **extra}, id=message.id)


class OutboxRelay:
    """Moves outbox rows to their stream; ``notify()`` wakes it after a commit."""

    def __init__(
        self,
        store: OrderStore,
        redis: aioredis.Redis,
        *,
        config: RelayConfig | None = None,
        retention: Retention | None = None,
        name: str | None = None,
        partitions: int | None = None,
    ) -> None:
        self.store = store
        #: Partitions asked for; None adopts the count recorded in Redis (see bus.partitions).
        self.partitions = partitions
        self._layouts: dict[str, tuple[PartitionLayout, float]] = {}
        self.config = config or RelayConfig()
        self._redis = redis
        self._publisher = StreamPublisher(redis, retention=retention)
        self._partitioned = PartitionedPublisher(redis, retention=retention)
        self._pubsub = PubSubPublisher(redis)
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.stats = RelayStats()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._lease_until = 0.0
        self._started = asyncio.Event()
        #: Rows committed by this process, handed over, not published yet (id order).
        self._handed: list[OutboxRow] = []
        #: Rows published and still in the outbox, and since when the first has waited.
        self._published: list[OutboxRow] = []
        self._published_since = 0.0
        #: A look at the whole outbox is due before the handed rows (start, notify,
        #: failure), so that older rows go first.
        self._sweep = True
        #: Rows the last look at the outbox published that had been handed over.
        self._handed_claimed = 0

    @property
    def is_leader(self) -> bool:
        """SQLite: whether this relay holds the lease (always True on PostgreSQL)."""
        return not self.store.db.is_sqlite or self._lease_until > time.time()

    def notify(self) -> None:
        """New rows were committed: look at the outbox now (call from the event loop)."""
        self._sweep = True
        self._wake.set()

    def hand_over(self, rows: list[OutboxRow]) -> None:
        """Rows this process just committed (call from the event loop): publish them
        without reading the outbox. On SQLite only, where this relay, if it holds the
        lease, is the only one publishing; rows not published stay in the outbox."""
        if self._stopping.is_set():
            return
        self._handed += rows
        self._wake.set()

    def stop(self) -> None:
        """Stop after the current batch."""
        self._stopping.set()
        self._wake.set()

    async def wait_started(self) -> None:
        """Return once the relay's loop runs."""
        await self._started.wait()

    async def run(self) -> None:
        """Publish whatever appears in the outbox until ``stop()``, surviving outages."""
        listener = None
        if not self.store.db.is_sqlite:
            listener = asyncio.create_task(self._listen(), name="orderflow-relay-listen")
        poll = self.config.min_poll_s
        failures = 0
        # The next look at the whole outbox (for rows no one handed over: other
        # processes', the reconciler's), and when published handed rows are removed.
        sweep_at = 0.0
        self._started.set()
        try:
            while not self._stopping.is_set():
                self._wake.clear()
                try:
                    if self._sweep:
                        # Start, notify, failure: the outbox first, oldest rows first.
                        sweep_at = 0.0
                    elif self._handed:
                        await self._publish_handed()
                    wait = sweep_at - time.monotonic()
                    if wait <= 0:
                        self._sweep = False
                        # Short again once it found rows no one handed over.
                        found = await self.publish_pending() - self._handed_claimed
                        poll = (
                            self.config.min_poll_s
                            if found
                            else min(poll * 2, self.config.max_poll_s)
                        )
                        wait = poll
                        sweep_at = time.monotonic() + poll
                    await self._remove_published(force=False)
                    failures = 0
                except _RETRYABLE as exc:
                    failures += 1
                    self._sweep = True
                    await self._failed(exc, failures)
                    continue
                except Exception:
                    # A bug or a row that cannot be published: the relay must not die
                    # (the outbox would grow unseen); say so loudly and keep trying.
                    failures += 1
                    self._sweep = True
                    if failures == 1 or failures % 20 == 0:
                        log.exception("relay failed unexpectedly; retrying")
                    await self._failed(None, failures)
                    continue
                if self._handed or self._sweep:
                    continue
                settling = False
                if self._published:
                    settled = self._published_since + self.config.settle_s - time.monotonic()
                    settling = settled < wait
                    wait = min(wait, settled)
                try:
                    await asyncio.wait_for(self._wake.wait(), max(0.0, wait))
                except TimeoutError:
                    if not settling:
                        sweep_at = 0.0  # the poll interval is over: look now
        finally:
            if listener is not None:
                listener.cancel()
                await asyncio.gather(listener, return_exceptions=True)
            with contextlib.suppress(*_RETRYABLE):
                await self._remove_published(force=True)
            await self.close()

    async def publish_pending(self) -> int:
        """Publish every pending event now (if this relay may); returns how many.

        Raises the Redis or database error that stopped it; what was not published
        stays in the outbox.
        """
        total = 0
        self._handed_claimed = 0
        db = self.store.db
        # Published rows still in the outbox would be read (and published) again.
        await self._remove_published(force=True)
        while True:
            if db.is_sqlite and not await self._hold_lease():
                self._handed.clear()  # the lease holder finds them in the outbox
                return total
            batch = await db.run_quick(self.store.claim, self.config.batch_size)
            if not batch.rows:
                return total
            count = len(batch.rows)
            if self._handed:
                # Handed over and committed before this read: published now, with it.
                claimed = {row.id for row in batch.rows}
                handed = len(self._handed)
                self._handed = [row for row in self._handed if row.id not in claimed]
                self._handed_claimed += handed - len(self._handed)
            try:
                await self._publish(batch.rows)
            except BaseException:
                # Unlocks the rows on PostgreSQL at once (a quick rollback), even
                # when cancelled, so another relay can take them.
                self.store.abandon(batch)
                raise
            await self._complete(batch)
            total += count
            self.stats.published += count
            self.stats.batches += 1
            metrics.OUTBOX_RELAYED.inc(count)
            if count < self.config.batch_size:
                return total

    async def _publish_handed(self) -> None:
        """Publish the rows handed over (oldest first, a batch at most); they are
        removed from the outbox later (``_remove_published``)."""
        if self.store.db.is_sqlite and not await self._hold_lease():
            self._handed.clear()  # the lease holder finds them in the outbox
            return
        size = self.config.batch_size
        rows, self._handed = self._handed[:size], self._handed[size:]
        try:
            await self._publish(rows)
        except BaseException:
            # They stay in the outbox, and so do the ones handed meanwhile: the next
            # look at it (``run`` looks after a failure) publishes them, oldest first.
            self._handed.clear()
            raise
        if not self._published:
            self._published_since = time.monotonic()
        self._published += rows
        self.stats.published += len(rows)
        self.stats.batches += 1
        metrics.OUTBOX_RELAYED.inc(len(rows))

    async def _remove_published(self, *, force: bool) -> None:
        """Remove the published handed rows from the outbox: when ``force``d, when a
        batch of them is waiting, or once the first has waited ``settle_s``."""
        if not self._published:
            return
        if (
            not force
            and len(self._published) < self.config.batch_size
            and time.monotonic() - self._published_since < self.config.settle_s
        ):
            return
        rows, self._published = self._published, []
        try:
            await self.store.db.run_quick(self.store.complete, ClaimedBatch(rows=rows))
        except BaseException:
            self._published = rows + self._published
            raise

    async def _complete(self, batch: ClaimedBatch) -> None:
        try:
            await self.store.db.run_quick(self.store.complete, batch)
        except BaseException:
            self.store.abandon(batch)
            raise

    async def _publish(self, rows: list[OutboxRow]) -> None:
        if not tracing.enabled:
            await self._publish_rows(rows)
            return
        # A PRODUCER span per event, continuing its request's trace; the entry carries
        # the span's context (traceparent, tracestate) to the consumers.
        spans = [tracing.publishing(row.stream, row.message.id, row.trace) for row in rows]
        traced = [
            replace(row, message=_with_headers(row.message, tracing.headers_of(span)))
            for row, span in zip(rows, spans, strict=True)
        ]
        try:
            await self._publish_rows(traced)
        except BaseException as exc:
            for span in spans:
                span.record_exception(exc)
                span.end()
            raise
        for span in spans:
            span.end()

    async def _publish_rows(self, rows: list[OutboxRow]) -> None:
        # Consecutive rows of the same stream go out in one pipeline, in order.
        start = 0
        while start < len(rows):
            stream = rows[start].stream
            end = start
            while end < len(rows) and rows[end].stream == stream:
                end += 1
            messages: list[Message] = [row.message for row in rows[start:end]]
            layout = await self._layout(stream)
            if layout.plain:
                await self._publisher.publish_many(stream, messages)
            else:
                # Each order's events go to its id's partition, one pipeline each.
                keyed = [
                    (row.order_id if row.order_id is not None else row.message.id, row.message)
                    for row in rows[start:end]
                ]
                await self._partitioned.publish_keyed(layout, keyed)
            if self.config.channel is not None:
                await self._pubsub.publish_many(
                    self.config.channel, [lab_message(message) for message in messages]
                )
            start = end

    async def _layout(self, stream: str) -> PartitionLayout:
        # The count is shared through Redis; looked at again every second, so relays
        # follow a change made (on a drained stream) by another component.
        now = time.monotonic()
        cached = self._layouts.get(stream)
        if cached is not None and cached[1] > now:
            return cached[0]
        layout = await resolve_layout(self._redis, stream, self.partitions)
        self._layouts[stream] = (layout, now + _LAYOUT_TTL_S)
        return layout

    async def _hold_lease(self) -> bool:
        now = time.time()
        ttl = self.config.lease_ttl_s
        # Renew once a third of the lease has passed: not a write per batch.
        if self._lease_until - now > ttl * 2 / 3:
            return True
        if await self.store.db.run(self.store.acquire_lease, self.name, ttl):
            if self._lease_until <= now:
                log.info("relay %s holds the outbox lease", self.name)
            self._lease_until = now + ttl
            return True
        self._lease_until = 0.0
        return False

    async def close(self) -> None:
        """Give up the SQLite lease so another relay can take over at once."""
        if self.store.db.is_sqlite and self._lease_until > 0:
            self._lease_until = 0.0
            with contextlib.suppress(sa.exc.SQLAlchemyError):
                await self.store.db.run(self.store.release_lease, self.name)

    async def _failed(self, exc: BaseException | None, failures: int) -> None:
        self.stats.errors += 1
        if isinstance(exc, TRANSIENT_REDIS_ERRORS):
            bus_metrics.REDIS_ERRORS.labels("relay").inc()
        delay = min(self.config.retry_max_s, 0.05 * 2 ** min(failures, 10))
        delay = random.uniform(delay / 2, delay)
        if exc is not None and (failures == 1 or failures % 20 == 0):
            log.warning(
                "relay cannot publish (%s: %s); events stay in the outbox; retrying in %.2fs",
                type(exc).__name__,
                exc,
                delay,
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)

    async def _listen(self) -> None:
        """PostgreSQL: LISTEN for commits of other processes, to wake at once."""
        import psycopg

        url = self.store.db.url.set(drivername="postgresql").render_as_string(hide_password=False)
        failures = 0
        while not self._stopping.is_set():
            try:
                conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
                async with conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    failures = 0
                    async for _ in conn.notifies():
                        self.notify()
            except (psycopg.Error, OSError) as exc:
                failures += 1
                log.debug("relay LISTEN connection failed: %s", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._stopping.wait(), min(5.0, 0.1 * 2 ** min(failures, 6))
                    )
