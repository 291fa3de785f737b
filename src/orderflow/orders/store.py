"""``OrderStore``: the Order Service's tables behind one object, for the parts that run.

Each responsibility has its module: orders and idempotency keys (``repository``), the
outbox and the relay lease (``outbox``), email statuses (``email_status_store``) and
reconciliation (``reconcile``). The store is the repository, and hands the rest on.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from orderflow.orders.database import Database
from orderflow.orders.email_status_store import EmailStatusStore, EmailStatusUpdate
from orderflow.orders.outbox import ClaimedBatch
from orderflow.orders.repository import OrderRepository


class OrderStore(OrderRepository):
    """Orders and idempotency keys, plus the outbox and email statuses of one database."""

    def __init__(self, db: Database, *, stream: str, event_version: int = 2) -> None:
        super().__init__(db, stream=stream, event_version=event_version)
        self.email_statuses = EmailStatusStore(db)

    # -- email statuses (see EmailStatusStore) ----------------------------------------

    def set_email_status(
        self,
        order_id: int,
        status: str,
        *,
        at: datetime,
        reason: str | None = None,
        message_id: str | None = None,
    ) -> str:
        """Record a confirmation outcome: ``updated``, ``unchanged`` or ``unknown``."""
        return self.email_statuses.set_email_status(
            order_id, status, at=at, reason=reason, message_id=message_id
        )

    def set_email_statuses(self, updates: Sequence[EmailStatusUpdate]) -> list[str]:
        """Record several outcomes, in order, in one transaction."""
        return self.email_statuses.set_email_statuses(updates)

    # -- outbox and relay lease (see Outbox) ------------------------------------------

    def backlog(self) -> int:
        """Events waiting in the outbox."""
        return self.outbox.backlog()

    def acquire_lease(self, holder: str, ttl_s: float) -> bool:
        """Take or renew the SQLite relay lease; True if ``holder`` has it now."""
        return self.outbox.acquire_lease(holder, ttl_s)

    def release_lease(self, holder: str) -> None:
        """Give the relay lease up at once."""
        self.outbox.release_lease(holder)

    def claim(self, limit: int) -> ClaimedBatch:
        """The oldest pending events, at most ``limit`` (locked on PostgreSQL)."""
        return self.outbox.claim(limit)

    def complete(self, batch: ClaimedBatch) -> None:
        """Remove published events and stamp their orders' publish time."""
        self.outbox.complete(batch)

    def abandon(self, batch: ClaimedBatch) -> None:
        """Leave the events pending (unlocking them on PostgreSQL)."""
        self.outbox.abandon(batch)
