"""Confirmation status: the Order Service's consumer of ``email.sent`` / ``email.failed``.

The Email Service publishes ``Message.event("email.sent" | "email.failed",
{"order_id", "email", "reason", "message_id", "at"}, source="orderflow/email")`` on
stream ``email-events``; this records the outcome on the order (``sent`` is final).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis

from orderflow.bus import Delivery, PermanentError, StreamWorker, WorkerConfig
from orderflow.bus.partition_workers import SupervisedStreamWorker
from orderflow.bus.partitions import is_cluster, single_stream
from orderflow.config import Settings
from orderflow.orders import metrics
from orderflow.orders.schema import EMAIL_FAILED, EMAIL_SENT, MAX_ORDER_ID
from orderflow.orders.store import OrderStore

log = logging.getLogger(__name__)

EMAIL_SENT_TYPE = "email.sent"
EMAIL_FAILED_TYPE = "email.failed"
_STATUS_OF = {EMAIL_SENT_TYPE: EMAIL_SENT, EMAIL_FAILED_TYPE: EMAIL_FAILED}


class EmailStatusConsumer:
    """Handles email events, one order update each; unknown event types are skipped."""

    def __init__(self, store: OrderStore) -> None:
        self.store = store

    async def handle(self, delivery: Delivery) -> None:
        """Record one email outcome (a StreamWorker handler)."""
        message = delivery.message
        status = _STATUS_OF.get(message.type or "")
        if status is None:
            log.debug("ignoring %s event %s", message.type, message.id)
            return
        data = message.data
        order_id = _order_id(data.get("order_id"))
        outcome = await self.store.db.run(
            self.store.set_email_status,
            order_id,
            status,
            at=_time(data.get("at")),
            reason=_text(data.get("reason"), 1000),
            message_id=_text(data.get("message_id"), 998),
        )
        metrics.EMAIL_STATUS.labels(status, outcome).inc()
        if outcome == "unknown":
            log.warning("%s event %s names unknown order %s", message.type, message.id, order_id)

    def worker(self, redis: aioredis.Redis, settings: Settings, **options: Any) -> StreamWorker:
        """A worker of group ``settings.orders_group`` on ``settings.email_events_stream``."""
        config = WorkerConfig(
            # Hash-tagged on a cluster: the stream and its dead letters share a slot.
            stream=single_stream(redis, settings.email_events_stream),
            group=settings.orders_group,
            claim_idle_ms=settings.claim_idle_ms,
            max_deliveries=settings.max_deliveries,
            dlq_maxlen=settings.dlq_maxlen,
            **options,
        )
        if is_cluster(redis):
            # A failover can fail a worker loop: start it again rather than stop.
            return SupervisedStreamWorker(redis, config, self.handle)
        return StreamWorker(redis, config, self.handle)


def _order_id(value: Any) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ORDER_ID:
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


def _text(value: Any, limit: int) -> str | None:
    if value is None:
        return None
    return str(value)[:limit]
