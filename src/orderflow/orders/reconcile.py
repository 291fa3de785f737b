"""Reconciliation: republish orders whose confirmation is still pending after a while.

An event can be lost inside Redis (the fsync window, a failover); the Email Service
deduplicates per order, so publishing a pending order again is safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from orderflow.orders import metrics
from orderflow.orders.repository import OrderRepository, StoredOrder, order_event
from orderflow.orders.schema import EMAIL_STATUS_PENDING, orders

log = logging.getLogger(__name__)


def republish_due(
    repository: OrderRepository,
    *,
    older_than_s: float,
    now: datetime | None = None,
    limit: int = 500,
) -> list[int]:
    """Queue a new event for each order still pending ``older_than_s`` after its last
    publish; returns their ids. The order's ``last_published_at`` is cleared until
    the relay has published again, so it is not queued twice meanwhile."""
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(seconds=older_than_s)
    with repository.db.write() as conn:
        query = (
            sa.select(orders)
            .where(
                orders.c.email_status == EMAIL_STATUS_PENDING,
                orders.c.last_published_at.is_not(None),
                orders.c.last_published_at <= cutoff,
            )
            .order_by(orders.c.id)
            .limit(limit)
        )
        if not repository.db.is_sqlite:
            query = query.with_for_update(skip_locked=True)
        due = [StoredOrder.from_row(row) for row in conn.execute(query)]
        if not due:
            return []
        ids = [order.id for order in due]
        repository.outbox.enqueue(
            conn, [(order.id, order_event(order, repository.event_version)) for order in due], now
        )
        conn.execute(sa.update(orders).where(orders.c.id.in_(ids)).values(last_published_at=None))
        return ids


class Reconciler:
    """Every ``interval_s``, queues a new event for orders pending ``after_s`` after publish."""

    def __init__(
        self,
        store: OrderRepository,
        *,
        after_s: float,
        on_queued: Callable[[], None] | None = None,
        interval_s: float | None = None,
        batch_size: int = 500,
    ) -> None:
        if after_s <= 0:
            raise ValueError(f"reconcile after must be positive, got {after_s}")
        self.store = store
        self.after_s = after_s
        self.interval_s = (
            interval_s if interval_s is not None else min(30.0, max(0.05, after_s / 4))
        )
        self.batch_size = batch_size
        self._on_queued = on_queued
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Stop after the current pass."""
        self._stopping.set()

    async def reconcile_once(self, *, now: datetime | None = None) -> list[int]:
        """One pass; returns the ids of the orders queued again."""
        queued: list[int] = []
        while True:
            ids = await self.store.db.run(
                republish_due,
                self.store,
                older_than_s=self.after_s,
                now=now,
                limit=self.batch_size,
            )
            queued.extend(ids)
            if len(ids) < self.batch_size:
                break
        if queued:
            metrics.ORDERS_REPUBLISHED.inc(len(queued))
            log.info("republishing %d orders still pending after %ss", len(queued), self.after_s)
            if self._on_queued is not None:
                self._on_queued()
        return queued

    async def run(self) -> None:
        """Reconcile until ``stop()``; database errors are logged and retried."""
        while not self._stopping.is_set():
            try:
                await self.reconcile_once()
            except sa.exc.SQLAlchemyError as exc:
                log.warning("reconciliation failed (%s); retrying", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval_s)
