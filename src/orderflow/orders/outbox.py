"""The transactional outbox: events wait here, written in their order's transaction,
until the relay has published them; and the lease SQLite's relays take turns by.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from orderflow.bus import Message
from orderflow.bus.message import dumps
from orderflow.orders import sqlite_hot
from orderflow.orders.database import Database
from orderflow.orders.schema import OUTBOX_LEASE, orders, outbox, relay_lease

#: PostgreSQL NOTIFY channel that wakes relays in other processes on new outbox rows.
NOTIFY_CHANNEL = "orderflow_outbox"


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One event waiting to be published."""

    id: int
    stream: str
    order_id: int | None
    message: Message
    #: The W3C trace context of the request that made the event, if it was traced.
    trace: dict[str, str] | None = None


@dataclass(slots=True)
class ClaimedBatch:
    """Outbox rows one relay publishes; on PostgreSQL they stay row-locked until done."""

    rows: list[OutboxRow]
    conn: Connection | None = None
    transaction: sa.engine.RootTransaction | None = None
    _closed: bool = field(default=False)


_INSERT_OUTBOX = sa.insert(outbox)
_NOTIFY = sa.text("SELECT pg_notify(:channel, '')")
_BACKLOG = sa.select(sa.func.count()).select_from(outbox)
_IDS: sa.BindParameter[Any] = sa.bindparam("ids", expanding=True)
_CLAIM = sa.select(outbox).order_by(outbox.c.id).limit(sa.bindparam("limit"))
_DELETE_PUBLISHED = sa.delete(outbox).where(outbox.c.id.in_(_IDS))
_MARK_PUBLISHED = (
    sa.update(orders)
    .where(orders.c.id.in_(_IDS))
    .values(
        last_published_at=sa.bindparam("published_at"),
        publish_count=orders.c.publish_count + 1,
    )
)


class Outbox:
    """Events of one stream waiting in the database, and the relays' lease."""

    def __init__(self, db: Database, *, stream: str) -> None:
        self.db = db
        self.stream = stream

    def enqueue(
        self,
        conn: Connection,
        events: Sequence[tuple[int | None, Message]],
        now: datetime,
        traces: Sequence[dict[str, str] | None] | None = None,
        *,
        added: list[OutboxRow] | None = None,
    ) -> None:
        """Add ``(order id, event)`` pairs inside the caller's write transaction;
        ``traces``, one per event, are their requests' trace contexts (tracing on).

        SQLite: with ``added``, the new rows are appended to it, with their ids and the
        events themselves (which encode to the text stored): the caller hands them to
        the relay once committed. PostgreSQL: ``added`` is left as it is; relays of
        other processes may take the same rows, so each finds them in the outbox
        (NOTIFY wakes them).
        """
        params = [
            {
                "stream": self.stream,
                "event_id": message.id,
                "order_id": order_id,
                "headers": orjson.dumps(dict(message.headers)).decode(),
                "data": dumps(message.data).decode(),
                "created_at": now,
                "trace_context": _trace_json(traces[i]) if traces else None,
            }
            for i, (order_id, message) in enumerate(events)
        ]
        if self.db.is_sqlite:
            # The hot statement, straight to sqlite3 (see sqlite_hot).
            ids = sqlite_hot.insert_outbox(sqlite_hot.cursor(conn), params)
            if added is not None:
                added += self._rows(ids, events, traces)
            return
        conn.execute(_INSERT_OUTBOX, params)
        # Delivered at commit: relays in other processes wake at once.
        conn.execute(_NOTIFY, {"channel": NOTIFY_CHANNEL})

    def _rows(
        self,
        ids: Sequence[int],
        events: Sequence[tuple[int | None, Message]],
        traces: Sequence[dict[str, str] | None] | None,
    ) -> list[OutboxRow]:
        return [
            OutboxRow(
                id=row_id,
                stream=self.stream,
                order_id=order_id,
                message=message,
                trace=(traces[i] if traces else None) or None,
            )
            for i, (row_id, (order_id, message)) in enumerate(zip(ids, events, strict=True))
        ]

    def backlog(self) -> int:
        """Events waiting in the outbox."""
        with self.db.read() as conn:
            return int(conn.execute(_BACKLOG).scalar_one())

    def acquire_lease(self, holder: str, ttl_s: float) -> bool:
        """Take or renew the SQLite relay lease; True if ``holder`` has it now."""
        now = time.time()
        with self.db.write() as conn:
            result = conn.execute(
                sa.update(relay_lease)
                .where(
                    relay_lease.c.name == OUTBOX_LEASE,
                    sa.or_(
                        relay_lease.c.holder == holder,
                        relay_lease.c.holder.is_(None),
                        relay_lease.c.expires_at < now,
                    ),
                )
                .values(holder=holder, expires_at=now + ttl_s)
            )
            return bool(result.rowcount)

    def release_lease(self, holder: str) -> None:
        """Give the lease up at once (another relay need not wait for it to expire)."""
        with self.db.write() as conn:
            conn.execute(
                sa.update(relay_lease)
                .where(relay_lease.c.name == OUTBOX_LEASE, relay_lease.c.holder == holder)
                .values(holder=None, expires_at=0.0)
            )

    def claim(self, limit: int) -> ClaimedBatch:
        """The oldest pending events, at most ``limit``.

        On PostgreSQL they are locked (``FOR UPDATE SKIP LOCKED``) until ``complete`` or
        ``abandon``, so concurrent relays take disjoint batches. On SQLite the caller
        holds the relay lease instead.
        """
        if self.db.is_sqlite:
            with self.db.read() as conn:
                return ClaimedBatch(
                    rows=[_outbox_row(r) for r in conn.execute(_CLAIM, {"limit": limit})]
                )
        conn = self.db.engine.connect()
        try:
            transaction = conn.begin()
            query = _CLAIM.with_for_update(skip_locked=True)
            rows = [_outbox_row(r) for r in conn.execute(query, {"limit": limit})]
        except BaseException:
            conn.close()
            raise
        if not rows:
            transaction.rollback()
            conn.close()
            return ClaimedBatch(rows=[])
        return ClaimedBatch(rows=rows, conn=conn, transaction=transaction)

    def complete(self, batch: ClaimedBatch) -> None:
        """Remove published events and stamp their orders' publish time."""
        if batch._closed or not batch.rows:
            return
        batch._closed = True
        ids = [row.id for row in batch.rows]
        order_ids = sorted({row.order_id for row in batch.rows if row.order_id is not None})
        if batch.conn is not None:
            try:
                _mark(batch.conn, ids, order_ids)
                assert batch.transaction is not None
                batch.transaction.commit()
            finally:
                batch.conn.close()
            return
        with self.db.write() as conn:
            _mark(conn, ids, order_ids)

    def abandon(self, batch: ClaimedBatch) -> None:
        """Leave the events pending (unlocking them on PostgreSQL)."""
        if batch._closed:
            return
        batch._closed = True
        if batch.conn is not None:
            try:
                if batch.transaction is not None and batch.transaction.is_active:
                    batch.transaction.rollback()
            finally:
                batch.conn.close()


def _mark(conn: Connection, ids: list[int], order_ids: list[int]) -> None:
    conn.execute(_DELETE_PUBLISHED, {"ids": ids})
    if order_ids:
        conn.execute(_MARK_PUBLISHED, {"ids": order_ids, "published_at": datetime.now(UTC)})


def _trace_json(trace: dict[str, str] | None) -> str | None:
    return orjson.dumps(trace).decode() if trace else None


def _outbox_row(row: Row[Any]) -> OutboxRow:
    m = row._mapping
    trace = m["trace_context"]
    message = Message(
        data=orjson.loads(m["data"]), headers=orjson.loads(m["headers"]), id=m["event_id"]
    )
    order_id = m["order_id"]
    return OutboxRow(
        id=int(m["id"]),
        stream=m["stream"],
        order_id=int(order_id) if order_id is not None else None,
        message=message,
        trace=orjson.loads(trace) if trace else None,
    )
