"""``order.created`` versions on the Order Service's side: v2 bodies, the 422 for a
total that disagrees with its lines, the version setting, Pub/Sub's flat JSON, and the
migration that keeps a customer's name."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from pydantic import ValidationError

from orderflow.config import Settings
from orderflow.orders.database import Database
from orderflow.orders.repository import StoredOrder, lab_message, order_event

from .conftest import Api, make_settings, migrated_to, running_api, stream_events

V2_BODY: dict[str, Any] = {
    "customer": {"email": "Alice@EXAMPLE.com", "name": "Alice Liddell"},
    "currency": "eur",
    "lines": [
        {"sku": "BK-1", "name": "Book", "quantity": 2, "unit_price": "12.50"},
        {"name": "Pen", "unit_price": 1.25},
    ],
    "total": "26.25",
}


async def test_v2_body_is_stored_and_published_as_v2(api: Api, aredis: Any) -> None:
    response = await api.post(V2_BODY)

    assert response.status_code == 201, response.text
    order = response.json()
    assert order["customer_name"] == "Alice Liddell"
    assert order["email"] == "Alice@example.com"
    assert order["items"][0] == {"name": "Book", "sku": "BK-1", "quantity": 2, "price": "12.50"}
    assert (await api.client.get(f"/orders/{order['id']}")).json() == order

    assert await api.runtime.relay.publish_pending() == 1
    ((_, fields),) = await aredis.xrange("orders")
    assert fields[b"ce_dataschema"] == b"urn:orderflow:schema:order.created:2"
    (event,) = await stream_events(aredis)
    assert event == {
        "id": order["id"],
        "customer": {"email": "Alice@example.com", "name": "Alice Liddell"},
        "currency": "EUR",
        "lines": [
            {"sku": "BK-1", "name": "Book", "quantity": 2, "unit_price": "12.50"},
            {"name": "Pen", "quantity": 1, "unit_price": "1.25"},
        ],
        "total": "26.25",
        "created_at": order["created_at"],
    }


async def test_v2_total_that_disagrees_with_its_lines_is_a_422_naming_both(api: Api) -> None:
    response = await api.post({**V2_BODY, "total": "30.00"})

    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    errors = response.json()["errors"]
    assert [error["field"] for error in errors] == ["total", "lines"]
    assert "26.25" in errors[0]["message"]
    assert "30.00" in errors[0]["message"]
    assert await api.counts() == {"orders": 0, "outbox": 0, "idempotency_keys": 0}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**V2_BODY, "email": "a@example.com"}, "email"),
        ({**V2_BODY, "customer": {"name": "x"}}, "customer.email"),
        ({**V2_BODY, "lines": [{"name": "Book", "quantity": 1}]}, "lines.0.unit_price"),
        (
            {**V2_BODY, "customer": {"email": "a@example.com", "name": "a\r\nBcc: x"}},
            "customer.name",
        ),
        ({"email": "a@example.com", "total": "1.00", "lines": []}, "customer"),
    ],
)
async def test_v2_body_errors_name_their_field(api: Api, body: dict[str, Any], field: str) -> None:
    response = await api.post(body)

    assert response.status_code == 422, response.text
    assert field in [error["field"] for error in response.json()["errors"]]


async def test_flat_body_with_prices_short_of_its_total_publishes_lines_without_prices(
    api: Api, aredis: Any
) -> None:
    # Today's body never had to add up (shipping, tax): still accepted, and its v2 event
    # stays valid by leaving the prices out of the lines.
    body = {
        "email": "a@example.com",
        "total": "12.00",
        "items": [{"name": "mug", "price": "10.00"}],
    }
    assert (await api.post(body)).status_code == 201
    await api.runtime.relay.publish_pending()
    (event,) = await stream_events(aredis)
    assert event["lines"] == [{"name": "mug", "quantity": 1}]
    assert event["total"] == "12.00"


async def test_version_1_setting_publishes_flat_events_without_dataschema(
    database_url: str, redis_url: str, tmp_path: Path, aredis: Any
) -> None:
    settings = make_settings(database_url, redis_url, tmp_path, order_event_version=1)
    async with running_api(settings) as api:
        assert (await api.post(V2_BODY)).status_code == 201
        await api.runtime.relay.publish_pending()
    ((_, fields),) = await aredis.xrange("orders")
    assert b"ce_dataschema" not in fields
    event = orjson.loads(fields[b"data"])
    assert event["email"] == "Alice@example.com"
    assert event["name"] == "Alice Liddell"
    assert event["items"][1] == {"name": "Pen", "quantity": 1, "price": "1.25"}


@pytest.mark.parametrize("value", ["3", "0", "two"])
def test_a_bad_event_version_is_a_clear_config_error(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORDERFLOW_ORDER_EVENT_VERSION", value)
    with pytest.raises(ValidationError, match="order_event_version"):
        Settings()


def test_pubsub_gets_the_labs_flat_json_of_a_v2_event() -> None:
    order = StoredOrder(
        id=7,
        email="a@example.com",
        total=Decimal("3.00"),
        currency="USD",
        items=[{"name": "pen", "sku": "P-1", "quantity": 3, "price": "1.00"}],
        created_at=datetime(2026, 12, 2, tzinfo=UTC),
        customer_name="Ann",
    )
    flat = lab_message(order_event(order, 2))
    assert "ce_dataschema" not in flat.headers
    assert flat.data == order.event_data(1)
    assert flat.data["email"] == "a@example.com"


async def test_migration_adds_customer_name_to_existing_orders(database_url: str) -> None:
    db = Database(database_url)
    try:
        with migrated_to(db, "0001") as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO orders (id, email, total, currency, items, created_at,"
                    " fingerprint) VALUES (5, 'a@example.com', 100, 'USD', '[]',"
                    " CURRENT_TIMESTAMP, 'x')"
                )
            )
        db.migrate()
        with db.engine.connect() as conn:
            row = conn.execute(sa.text("SELECT id, customer_name FROM orders")).one()
        assert tuple(row) == (5, None)
    finally:
        db.close()
