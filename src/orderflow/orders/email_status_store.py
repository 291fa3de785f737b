"""Recording each order's confirmation outcome: ``sent`` is final and never regresses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from orderflow.orders.database import Database, in_chunks
from orderflow.orders.schema import EMAIL_STATUS_FAILED, EMAIL_STATUS_SENT, orders


@dataclass(frozen=True, slots=True)
class EmailStatusUpdate:
    """One confirmation outcome to record on an order (``sent`` or ``failed``)."""

    order_id: int
    status: str
    at: datetime
    reason: str | None = None
    message_id: str | None = None


# One prepared statement for every email outcome (compiled and cache-keyed once, run as
# an executemany); ``sent`` is final, so the guard is in the statement itself.
_SET_EMAIL_STATUS = (
    sa.update(orders)
    .where(orders.c.id == sa.bindparam("o_id"), orders.c.email_status != EMAIL_STATUS_SENT)
    .values(
        email_status=sa.bindparam("o_status"),
        email_status_at=sa.bindparam("o_at"),
        email_reason=sa.bindparam("o_reason"),
        email_message_id=sa.bindparam("o_message_id"),
    )
)
_EMAIL_STATUSES = sa.select(orders.c.id, orders.c.email_status).where(
    orders.c.id.in_(sa.bindparam("ids", expanding=True))
)


class EmailStatusStore:
    """Writes the ``email_status`` of orders, batched into shared transactions."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def set_email_status(
        self,
        order_id: int,
        status: str,
        *,
        at: datetime,
        reason: str | None = None,
        message_id: str | None = None,
    ) -> str:
        """Record a confirmation outcome; ``sent`` is final and never regresses.

        Returns ``updated``, ``unchanged`` (already sent) or ``unknown`` (no such order).
        """
        update = EmailStatusUpdate(order_id, status, at, reason, message_id)
        (outcome,) = self.set_email_statuses([update])
        return outcome

    def set_email_statuses(self, updates: Sequence[EmailStatusUpdate]) -> list[str]:
        """Record several outcomes, in order, in ONE transaction; each gets the outcome
        ``set_email_status`` would have given it, applied one after another."""
        for update in updates:
            if update.status not in (EMAIL_STATUS_SENT, EMAIL_STATUS_FAILED):
                raise ValueError(f"email status must be sent or failed, not {update.status!r}")
        if not updates:
            return []
        ids = sorted({update.order_id for update in updates})
        outcomes: list[str] = []
        rows: list[dict[str, Any]] = []
        with self.db.write() as conn:
            # The current status of each order first: it decides every outcome, so one
            # executemany then writes only the updates that change something.
            query = _EMAIL_STATUSES
            if not self.db.is_sqlite:
                # Concurrent writers in other processes: keep the outcomes exact.
                query = query.with_for_update()
            current: dict[int, str] = {
                int(row.id): row.email_status
                for chunk in in_chunks(ids)
                for row in conn.execute(query, {"ids": chunk})
            }
            for update in updates:
                status = current.get(update.order_id)
                if status is None:
                    outcomes.append("unknown")
                elif status == EMAIL_STATUS_SENT:
                    outcomes.append("unchanged")
                else:
                    outcomes.append("updated")
                    current[update.order_id] = update.status
                    rows.append(
                        {
                            "o_id": update.order_id,
                            "o_status": update.status,
                            "o_at": update.at,
                            "o_reason": update.reason,
                            "o_message_id": update.message_id,
                        }
                    )
            if rows:
                conn.execute(_SET_EMAIL_STATUS, rows)
        return outcomes
