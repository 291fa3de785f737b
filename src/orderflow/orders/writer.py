"""Group commit: the orders that arrive while one transaction is being written share
the next one, so a burst of requests costs a few transactions, not one each.

Under light load every order still gets its own transaction at once (no added wait);
under heavy load batches grow by themselves. A request's response is sent only after
the transaction holding its order committed.

With ``on_commit``, the outbox rows each transaction committed are handed to it (the
relay of this process) as soon as the commit returns, so the relay publishes them
without reading them back; the outbox stays the source of truth.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from orderflow.orders.outbox import OutboxRow
from orderflow.orders.repository import CreateResult, OrderConflict
from orderflow.orders.store import OrderStore
from orderflow.orders.validation import OrderRequest

log = logging.getLogger(__name__)

_Waiter = tuple[OrderRequest, str | None, "asyncio.Future[CreateResult]"]


class OrderWriter:
    """Creates orders for one event loop, batching concurrent requests."""

    def __init__(
        self,
        store: OrderStore,
        *,
        max_batch: int = 256,
        on_commit: Callable[[list[OutboxRow]], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.store = store
        self.max_batch = max_batch
        #: Called (on the event loop) with the outbox rows of each committed transaction.
        self.on_commit = on_commit
        self._pending: list[_Waiter] = []
        self._flushing: asyncio.Task[None] | None = None
        #: Transactions written and orders in them, for metrics and tests.
        self.transactions = 0
        self.orders = 0

    async def create(
        self, request: OrderRequest, *, idempotency_key: str | None = None
    ) -> CreateResult:
        """Create (or replay) the order; returns once its transaction committed.

        Raises OrderConflict, or the database error that failed the transaction.
        """
        future: asyncio.Future[CreateResult] = asyncio.get_running_loop().create_future()
        self._pending.append((request, idempotency_key, future))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush(), name="orderflow-order-writer")
        return await future

    async def wait_idle(self) -> None:
        """Return once every order handed over so far is written (or failed)."""
        while self._flushing is not None and not self._flushing.done():
            await asyncio.shield(self._flushing)

    async def _flush(self) -> None:
        while self._pending:
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            added: list[OutboxRow] | None = [] if self.on_commit is not None else None
            try:
                results = await self.store.db.run_quick(
                    self.store.create_many,
                    [(request, key) for request, key, _ in batch],
                    added=added,
                )
            except Exception as exc:
                # The transaction failed: nothing of the batch was stored.
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.transactions += 1
            self.orders += len(batch)
            if added and self.on_commit is not None:
                self.on_commit(added)
            for (_, _, future), result in zip(batch, results, strict=True):
                if future.done():  # the client went away; the order stands
                    continue
                if isinstance(result, OrderConflict):
                    future.set_exception(result)
                else:
                    future.set_result(result)
