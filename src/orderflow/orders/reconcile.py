"""Reconciliation: republish orders whose confirmation is still pending after a while.

An event can be lost inside Redis (the fsync window, a failover); the Email Service
deduplicates per order, so publishing a pending order again is safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime

import sqlalchemy as sa

from orderflow.orders import metrics
from orderflow.orders.store import OrderStore

log = logging.getLogger(__name__)


class Reconciler:
    """Every ``interval_s``, queues a new event for orders pending ``after_s`` after publish."""

    def __init__(
        self,
        store: OrderStore,
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
                self.store.republish_due,
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
