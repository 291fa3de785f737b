"""The outbox keeps each event's trace context: migration 0003 on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa

from orderflow.bus import Message
from orderflow.orders.database import Database
from orderflow.orders.outbox import Outbox
from tests.orders.conftest import database_url, migrated_to

__all__ = ["database_url"]

TRACE = {
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "tracestate": "vendor=x",
}


def _at_0001(db: Database) -> None:
    with migrated_to(db, "0001") as conn:
        conn.execute(
            sa.text(
                "INSERT INTO outbox (stream, event_id, order_id, headers, data, created_at)"
                " VALUES ('orders', 'e-old', 1, '{}', '{\"id\": 1}', :now)"
            ),
            {"now": datetime.now(UTC)},
        )


def test_rows_from_before_the_migration_stay_and_new_rows_keep_their_trace(
    database_url: str,
) -> None:
    db = Database(database_url)
    try:
        _at_0001(db)
        db.migrate()
        outbox = Outbox(db, stream="orders")
        with db.write() as conn:
            events = [(2, Message({"id": 2}, id="e-traced")), (3, Message({"id": 3}, id="e-no"))]
            outbox.enqueue(conn, events, datetime.now(UTC), [TRACE, None])
        batch = outbox.claim(10)
        try:
            rows = {row.message.id: row for row in batch.rows}
        finally:
            outbox.abandon(batch)
        assert rows["e-old"].trace is None
        assert rows["e-old"].message.data == {"id": 1}
        assert rows["e-traced"].trace == TRACE
        assert rows["e-no"].trace is None
    finally:
        db.close()
