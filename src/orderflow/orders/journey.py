"""Read-only queries for the console's journey page: an order's rows still in the outbox."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from orderflow.orders.database import Database
from orderflow.orders.schema import outbox


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """An order's event waiting in the outbox (the relay removes it once published)."""

    id: int
    stream: str
    event_id: str
    created_at: datetime


_WAITING = (
    sa.select(outbox.c.id, outbox.c.stream, outbox.c.event_id, outbox.c.created_at)
    .where(outbox.c.order_id == sa.bindparam("order_id"))
    .order_by(outbox.c.id)
)


def waiting_events(db: Database, order_id: int) -> list[OutboxRow]:
    """The order's events still in the outbox, oldest first (blocking: use ``db.run``)."""
    with db.read() as conn:
        return [
            OutboxRow(int(row.id), row.stream, row.event_id, row.created_at)
            for row in conn.execute(_WAITING, {"order_id": order_id})
        ]
