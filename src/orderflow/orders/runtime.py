"""The Order Service's running pieces, started and stopped with an app's lifespan.

``OrderRuntime`` holds the store, the group-commit writer, the outbox relay and the
background consumers of one process; the HTTP API and the web console both work
through it (``app.state.orders``), so neither needs the other.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from orderflow import tracing
from orderflow.bus import Retention, StreamWorker
from orderflow.config import Settings
from orderflow.orders import metrics
from orderflow.orders.database import Database
from orderflow.orders.email_status import EmailStatusConsumer
from orderflow.orders.reconcile import Reconciler
from orderflow.orders.relay import OutboxRelay, RelayConfig
from orderflow.orders.repository import CreateResult, OrderConflict, StoredOrder
from orderflow.orders.store import OrderStore
from orderflow.orders.validation import OrderRequest
from orderflow.orders.writer import OrderWriter

__all__ = ["CreateResult", "OrderConflict", "OrderRuntime", "StoredOrder"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class OrderRuntime:
    """The running pieces behind the API and the console, created by the app's lifespan."""

    settings: Settings
    db: Database
    store: OrderStore
    redis: aioredis.Redis
    relay: OutboxRelay
    writer: OrderWriter
    relay_running: bool = False
    email_worker: StreamWorker | None = None
    reconciler: Reconciler | None = None
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        settings: Settings,
        db: Database,
        redis: aioredis.Redis,
        *,
        run_relay: bool = True,
        run_email_status: bool = True,
        run_reconciler: bool = True,
        relay_config: RelayConfig | None = None,
    ) -> OrderRuntime:
        """Build the pieces on a migrated ``db`` and start the background loops asked for."""
        store = OrderStore(db, stream=settings.stream, event_version=settings.order_event_version)
        relay = OutboxRelay(
            store,
            redis,
            config=relay_config or RelayConfig.from_settings(settings),
            retention=Retention(maxlen=settings.stream_maxlen),
            partitions=settings.partitions,
        )
        # SQLite: the committed rows go straight to the relay (one writer, one relay
        # lease). PostgreSQL: relays of other processes may take the same rows, so
        # they find them through the outbox alone (NOTIFY wakes them).
        handoff = run_relay and db.is_sqlite
        runtime = cls(
            settings=settings,
            db=db,
            store=store,
            redis=redis,
            relay=relay,
            writer=OrderWriter(store, on_commit=relay.hand_over if handoff else None),
        )
        if run_relay:
            runtime.relay_running = True
            runtime.tasks.append(asyncio.create_task(relay.run(), name="orderflow-relay"))
        if run_email_status:
            runtime.email_worker = EmailStatusConsumer(store).worker(redis, settings)
            runtime.tasks.append(
                asyncio.create_task(runtime.email_worker.run(), name="orderflow-email-status")
            )
        if run_reconciler:
            runtime.reconciler = Reconciler(
                store, after_s=settings.reconcile_after_s, on_queued=runtime.notify_relay
            )
            runtime.tasks.append(
                asyncio.create_task(runtime.reconciler.run(), name="orderflow-reconciler")
            )
        return runtime

    async def stop(self) -> None:
        """Let the writer finish, stop the loops and wait for them; failures are logged."""
        await self.writer.wait_idle()
        self.relay.stop()
        if self.email_worker is not None:
            self.email_worker.stop()
        if self.reconciler is not None:
            self.reconciler.stop()
        results = await asyncio.gather(*self.tasks, return_exceptions=True)
        for task, result in zip(self.tasks, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                log.error("%s failed", task.get_name(), exc_info=result)

    def notify_relay(self) -> None:
        """Wake the in-process relay, if it runs, after a commit."""
        if self.relay_running:
            self.relay.notify()

    async def place_order(
        self, request: OrderRequest, *, idempotency_key: str | None = None
    ) -> CreateResult:
        """Store (or replay) a validated order, count it and wake the relay.

        Raises OrderConflict, or the database error that failed the transaction.
        """
        try:
            with tracing.remember_request(request):
                result = await self.writer.create(request, idempotency_key=idempotency_key)
        except OrderConflict:
            metrics.ORDERS_REJECTED.labels("conflict").inc()
            raise
        if tracing.enabled:
            tracing.attribute(tracing.ORDER_ID, result.order.id)
        if result.created:
            metrics.ORDERS_CREATED.inc()
            if self.writer.on_commit is None:
                # Otherwise the writer handed the new rows to the relay, which woke it.
                self.notify_relay()
        else:
            metrics.ORDER_REPLAYS.inc()
        return result

    @staticmethod
    def count_invalid() -> None:
        """Count an order request refused before it reached the store (invalid input)."""
        metrics.ORDERS_REJECTED.labels("validation").inc()

    async def recent_orders(self, limit: int) -> list[StoredOrder]:
        """The newest ``limit`` orders, newest first."""
        return await self.db.run(self.store.recent, limit)
