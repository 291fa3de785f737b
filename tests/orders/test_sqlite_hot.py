"""The group commit's statements on SQLite go straight to sqlite3 (orders.sqlite_hot):
they store exactly what SQLAlchemy's types store, and fail as SQLAlchemy's do."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from orderflow.bus import Message
from orderflow.orders import Database, OrderRequest, OrderStore, sqlite_hot
from orderflow.orders.schema import orders, outbox
from orderflow.orders.validation import validate_order
from tests.support import order_body


@pytest.fixture
def databases(tmp_path: Path) -> Iterator[tuple[Database, Database]]:
    """Two fresh SQLite databases: one written through sqlite_hot, one by SQLAlchemy."""
    pair = (Database(f"sqlite:///{tmp_path}/hot.db"), Database(f"sqlite:///{tmp_path}/core.db"))
    for db in pair:
        db.migrate()
    yield pair
    for db in pair:
        db.close()


def _raw_rows(db: Database, table: str) -> list[tuple[Any, ...]]:
    """The rows as SQLite holds them (types and text), without SQLAlchemy's processing."""
    path = db.url.database
    assert path is not None
    with sqlite3.connect(path) as conn:
        return list(conn.execute(f"SELECT * FROM {table} ORDER BY id"))  # noqa: S608


def test_orders_and_their_events_are_stored_as_sqlalchemys_types_store_them(
    databases: tuple[Database, Database],
) -> None:
    hot, core = databases
    store = OrderStore(hot, stream="orders")
    requests = [
        (OrderRequest.model_validate(order_body(1, total="100.10", currency="EUR")), None),
        (OrderRequest.model_validate(order_body(2, id=77, total=5)), None),
        (
            validate_order(
                {
                    "id": 80,
                    "customer": {"email": "ann@example.com", "name": "Ann Ö"},
                    "currency": "USD",
                    "lines": [{"sku": "B-1", "name": "Böok", "quantity": 3, "unit_price": "0.33"}],
                    "total": "0.99",
                }
            ),
            None,
        ),
    ]
    results = store.create_many(requests)
    stored = {r.order.id: r.order for r in results if not isinstance(r, Exception)}
    assert sorted(stored) == [1, 77, 80]
    # The same rows written by SQLAlchemy Core into the other database.
    with core.write() as conn:
        for order in stored.values():
            row: dict[str, Any] = {c.name: None for c in orders.columns}
            row.update(
                id=order.id,
                email=order.email,
                customer_name=order.customer_name,
                total=order.total,
                currency=order.currency,
                items=order.items,
                created_at=order.created_at,
                fingerprint=_fingerprint(hot, order.id),
                email_status="pending",
                publish_count=0,
            )
            conn.execute(sa.insert(orders), row)
        for row in _raw_outbox(hot):
            conn.execute(sa.insert(outbox), row)
    assert _raw_rows(hot, "orders") == _raw_rows(core, "orders")
    assert _raw_rows(hot, "outbox") == _raw_rows(core, "outbox")
    # And SQLAlchemy reads them back as they were written.
    assert [store.get(order_id) for order_id in sorted(stored)] == [
        stored[order_id] for order_id in sorted(stored)
    ]


def _fingerprint(db: Database, order_id: int) -> str:
    with db.read() as conn:
        query = sa.select(orders.c.fingerprint).where(orders.c.id == order_id)
        return str(conn.execute(query).scalar_one())


def _raw_outbox(db: Database) -> list[dict[str, Any]]:
    with db.read() as conn:
        return [dict(row._mapping) for row in conn.execute(sa.select(outbox))]


def test_times_are_written_as_naive_utc_with_microseconds() -> None:
    plus_two = timezone(timedelta(hours=2))
    assert sqlite_hot.time_text(datetime(2026, 1, 2, 5, 4, 5, tzinfo=plus_two)) == (
        "2026-01-02 03:04:05.000000"
    )
    assert sqlite_hot.time_text(datetime(2026, 1, 2, 3, 4, 5, 7, tzinfo=UTC)) == (
        "2026-01-02 03:04:05.000007"
    )
    with pytest.raises(ValueError, match="naive datetime"):
        sqlite_hot.time_text(datetime(2026, 1, 2))
    assert sqlite_hot.cents(Decimal("12.34")) == 1234


def test_an_id_taken_fails_as_sqlalchemys_integrity_error(
    databases: tuple[Database, Database],
) -> None:
    hot, _ = databases
    store = OrderStore(hot, stream="orders")
    store.create(OrderRequest.model_validate(order_body(1, id=5)))
    row = {
        "id": 5,
        "email": "x@example.com",
        "customer_name": None,
        "total": Decimal("1.00"),
        "currency": "USD",
        "items": [],
        "created_at": datetime.now(UTC),
        "fingerprint": "f",
        "email_status": "pending",
        "publish_count": 0,
    }
    with hot.write() as conn, pytest.raises(sa.exc.IntegrityError):
        sqlite_hot.insert_orders(sqlite_hot.cursor(conn), [row])


def test_a_statement_that_cannot_run_fails_as_sqlalchemys_operational_error(
    databases: tuple[Database, Database],
) -> None:
    hot, _ = databases
    path = hot.url.database
    assert path is not None
    with sqlite3.connect(path) as conn, hot.read() as read:
        conn.execute("DROP TABLE outbox")  # a statement that cannot run: no such table
        event = Message(data={"id": 1})
        params = [
            {
                "stream": "orders",
                "event_id": event.id,
                "order_id": 1,
                "headers": "{}",
                "data": "{}",
                "created_at": datetime.now(UTC),
                "trace_context": None,
            }
        ]
        with pytest.raises(sa.exc.OperationalError, match="no such table"):
            sqlite_hot.insert_outbox(sqlite_hot.cursor(read), params)
