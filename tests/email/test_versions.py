"""Versioned ``order.created``: v1 and v2 side by side, unknown versions dead-lettered."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
import redis.asyncio as aioredis

from orderflow.email.order import InvalidOrder, parse_order

from .conftest import (
    ServiceFactory,
    SmtpFixture,
    dead_letters,
    email_events,
    pending_count,
    publish_order,
    run_burst,
)

V2 = "urn:orderflow:schema:order.created:2"


def v2_order(order_id: int, **overrides: Any) -> dict[str, Any]:
    """A version 2 payload with two priced lines."""
    order: dict[str, Any] = {
        "id": order_id,
        "customer": {"email": f"buyer{order_id}@example.com", "name": "Alice Liddell"},
        "currency": "EUR",
        "lines": [
            {"sku": "BK-1", "name": "Book", "quantity": 2, "unit_price": "12.50"},
            {"name": "Pen", "quantity": 1, "unit_price": "1.25"},
        ],
        "total": "26.25",
        "created_at": "2026-12-02T10:00:00+00:00",
    }
    order.update(overrides)
    return order


async def test_mixed_stream_one_email_per_known_version_one_dead_letter_for_v3(
    aredis: aioredis.Redis, smtp: SmtpFixture, make_service: ServiceFactory
) -> None:
    # v1 exactly as any producer writes it: only ``data``.
    await publish_order(aredis, {"id": 1, "email": "buyer1@example.com", "total": 100})
    await publish_order(aredis, v2_order(2), ce_type="order.created", ce_dataschema=V2)
    await publish_order(
        aredis,
        {"id": 3, "email": "buyer3@example.com", "total": "7.00", "items": ["mug"]},
        ce_type="order.created",
    )
    v3 = await publish_order(
        aredis,
        v2_order(4),
        ce_type="order.created",
        ce_dataschema="urn:orderflow:schema:order.created:3",
    )
    await publish_order(aredis, v2_order(5), ce_dataschema=V2)

    stats = await run_burst(await make_service())

    recipients = sorted(r.rcpt_tos[0] for r in smtp.handler.received)
    assert recipients == [f"buyer{n}@example.com" for n in (1, 2, 3, 5)]
    events = await email_events(aredis)
    assert sorted(e.data["order_id"] for e in events) == [1, 2, 3, 5]
    assert {e.type for e in events} == {"email.sent"}
    (dead,) = await dead_letters(aredis)
    assert dead["dlq_source_id"] == v3
    assert dead["dlq_deliveries"] == "1"  # at once: never retried
    assert "unsupported schema version" in dead["dlq_reason"]
    assert "version 3" in dead["dlq_reason"]
    assert stats.dead_lettered == 1
    assert await pending_count(aredis) == 0


@pytest.mark.parametrize(
    "schema",
    [
        "urn:orderflow:schema:order.created:two",
        "urn:orderflow:schema:order.created:0",
        "urn:orderflow:schema:email.sent:2",
        "https://example.com/order.json",
        "",
    ],
)
async def test_malformed_dataschema_is_dead_lettered_at_once(
    aredis: aioredis.Redis, smtp: SmtpFixture, make_service: ServiceFactory, schema: str
) -> None:
    await publish_order(aredis, v2_order(9), ce_dataschema=schema)
    await run_burst(await make_service())

    assert smtp.handler.received == []
    (dead,) = await dead_letters(aredis)
    assert dead["dlq_deliveries"] == "1"
    assert "unsupported schema version" in dead["dlq_reason"]


async def test_v2_greets_by_name_and_renders_a_receipt(
    aredis: aioredis.Redis, smtp: SmtpFixture, make_service: ServiceFactory
) -> None:
    await publish_order(aredis, v2_order(7), ce_dataschema=V2)
    await run_burst(await make_service())

    (received,) = smtp.handler.received
    msg = received.message
    assert msg["To"] == "Alice Liddell <buyer7@example.com>"
    for part in ("plain", "html"):
        body = msg.get_body((part,))
        assert body is not None
        text = body.get_content()
        assert "Hello Alice Liddell," in text
        assert "12.50 EUR" in text  # unit price
        assert "25.00 EUR" in text  # line total: 2 x 12.50
        assert "26.25 EUR" in text


async def test_v1_without_prices_has_no_receipt_and_no_name(
    aredis: aioredis.Redis, smtp: SmtpFixture, make_service: ServiceFactory
) -> None:
    await publish_order(
        aredis, {"id": 8, "email": "b@example.com", "total": 5, "items": [{"name": "mug"}]}
    )
    await run_burst(await make_service())

    text = smtp.handler.received[0].message.get_body(("plain",))
    assert text is not None
    content = text.get_content()
    assert content.startswith("Hello,")
    assert "Receipt" not in content
    assert "1 x mug" in content


def test_v1_upcasts_to_v2_in_one_place() -> None:
    v1 = parse_order(
        {
            "id": 5,
            "email": "a@example.com",
            "name": "Ann",
            "total": "3",
            "items": [{"sku": "S-1", "quantity": 3, "price": 1}],
        }
    )
    assert v1.version == 1
    assert v1.order.customer.email == "a@example.com"
    assert v1.name == "Ann"
    (line,) = v1.lines
    assert (line.name, line.sku, line.quantity, line.unit_price) == ("S-1", "S-1", 3, Decimal(1))
    assert v1.priced


def test_v2_total_must_match_its_lines() -> None:
    with pytest.raises(InvalidOrder, match=r"total 30.00 is not the sum .*26.25"):
        parse_order(v2_order(6, total="30.00"), 2)


def test_v2_requires_customer_email_and_currency() -> None:
    with pytest.raises(InvalidOrder) as caught:
        parse_order({"id": 6, "customer": {"name": "x"}, "total": "1.00"}, 2)
    assert "customer.email" in caught.value.reason
    assert "currency" in caught.value.reason
    assert caught.value.order_id == 6
