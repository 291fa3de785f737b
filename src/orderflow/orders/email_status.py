"""Confirmation status: the Order Service's consumer of ``email.sent`` / ``email.failed``.

The Email Service publishes ``Message.event("email.sent" | "email.failed",
{"order_id", "email", "reason", "message_id", "at"}, source="orderflow/email")`` on
stream ``email-events``; this records the outcome on the order (``sent`` is final).

The events of a burst share one database transaction (group commit, as the order
writer does for inserts): a handler hands its update over and waits for the commit,
so the bus acknowledges an event only once its outcome is stored.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis

from orderflow import logs, tracing
from orderflow.bus import (
    Delivery,
    PermanentError,
    StreamWorker,
    SupervisedStreamWorker,
    WorkerConfig,
)
from orderflow.bus.partitions import is_cluster, single_stream
from orderflow.config import Settings
from orderflow.domain import EMAIL_FAILED_EVENT, EMAIL_SENT_EVENT, is_order_id
from orderflow.orders import metrics
from orderflow.orders.email_status_store import EmailStatusUpdate
from orderflow.orders.schema import EMAIL_STATUS_FAILED, EMAIL_STATUS_SENT
from orderflow.orders.store import OrderStore

log = logging.getLogger(__name__)

#: The order's email status each event type records.
_STATUS_OF = {EMAIL_SENT_EVENT: EMAIL_STATUS_SENT, EMAIL_FAILED_EVENT: EMAIL_STATUS_FAILED}
#: Most updates in one transaction.
DEFAULT_MAX_BATCH = 256
#: How long the first update of a batch waits for others (the bus hands a read batch's
#: entries to the handler one loop turn apart, so without it the first of them would
#: ride alone). The status is not on the email's path: at a few hundred emails per
#: second the events come one per read, a few ms apart, and 20 ms lets several share
#: a transaction (2 ms gave one each: ~330 us of the API's CPU per email).
DEFAULT_LINGER_S = 0.02

_Waiter = tuple[EmailStatusUpdate, "asyncio.Future[str]"]


class EmailStatusConsumer:
    """Handles email events, one order update each, batched into shared transactions;
    unknown event types are skipped."""

    def __init__(
        self,
        store: OrderStore,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        linger_s: float = DEFAULT_LINGER_S,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if linger_s < 0:
            raise ValueError(f"linger_s must not be negative, got {linger_s}")
        self.store = store
        self.max_batch = max_batch
        self.linger_s = linger_s
        self._pending: list[_Waiter] = []
        self._full = asyncio.Event()
        self._flushing: asyncio.Task[None] | None = None
        #: Transactions written and updates in them, for tests and metrics.
        self.transactions = 0
        self.updates = 0

    async def handle(self, delivery: Delivery) -> None:
        """Record one email outcome (a StreamWorker handler); returns after the commit."""
        message = delivery.message
        status = _STATUS_OF.get(message.type or "")
        if status is None:
            log.debug("ignoring %s event %s", message.type, message.id)
            return
        data = message.data
        order_id = _order_id(data.get("order_id"))
        update = EmailStatusUpdate(
            order_id,
            status,
            at=_time(data.get("at")),
            reason=_clipped(data.get("reason"), 1000),
            message_id=_clipped(data.get("message_id"), 998),
        )
        tracing.attribute(tracing.ORDER_ID, order_id)
        with logs.order_context(order_id):
            outcome = await self._record(update)
        metrics.EMAIL_STATUS.labels(status, outcome).inc()
        if outcome == "unknown":
            log.warning("%s event %s names unknown order %s", message.type, message.id, order_id)

    async def _record(self, update: EmailStatusUpdate) -> str:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending.append((update, future))
        if len(self._pending) >= self.max_batch:
            self._full.set()
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush(), name="orderflow-email-status")
        return await future

    async def wait_idle(self) -> None:
        """Return once every update handed over so far is written (or failed)."""
        while self._flushing is not None and not self._flushing.done():
            await asyncio.shield(self._flushing)

    async def _flush(self) -> None:
        while self._pending:
            if len(self._pending) < self.max_batch and self.linger_s > 0:
                self._full.clear()
                try:
                    async with asyncio.timeout(self.linger_s):
                        await self._full.wait()
                except TimeoutError:
                    pass
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            try:
                outcomes = await self.store.db.run(
                    self.store.set_email_statuses, [update for update, _ in batch]
                )
            except asyncio.CancelledError:
                for _, future in batch:
                    future.cancel()
                raise
            except Exception as exc:
                # Nothing of the batch was stored: each handler fails, the bus retries.
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.transactions += 1
            self.updates += len(batch)
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if not future.done():  # a cancelled handler: its entry is redelivered
                    future.set_result(outcome)

    def worker(self, redis: aioredis.Redis, settings: Settings, **options: Any) -> StreamWorker:
        """A worker of group ``settings.orders_group`` on ``settings.email_events_stream``."""
        config = WorkerConfig.from_settings(
            settings,
            # Hash-tagged on a cluster: the stream and its dead letters share a slot.
            stream=single_stream(redis, settings.email_events_stream),
            group=settings.orders_group,
            **options,
        )
        if is_cluster(redis):
            # A failover can fail a worker loop: start it again rather than stop.
            return SupervisedStreamWorker(redis, config, self.handle)
        return StreamWorker(redis, config, self.handle)


def _order_id(value: Any) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not is_order_id(value):
        raise PermanentError(f"email event without a valid order_id: {value!r}")
    return value


def _time(value: Any) -> datetime:
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            parsed = None
        if parsed is not None:
            return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
    return datetime.now(UTC)


def _clipped(value: Any, limit: int) -> str | None:
    """``value`` as text of at most ``limit`` characters (it fills a bounded column)."""
    if value is None:
        return None
    return str(value)[:limit]
