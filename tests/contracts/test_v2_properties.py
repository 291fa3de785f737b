"""Whatever version 2 body the API accepts, the event the Order Service publishes for it
conforms to the document and the Email Service accepts and renders it (a property)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from orderflow.contracts import asyncapi_document
from orderflow.email.order import parse_order
from orderflow.email.render import Renderer
from orderflow.orders.events import event_payload, order_event
from orderflow.orders.repository import StoredOrder
from orderflow.orders.validation import OrderRequest, validate_order

from .test_published_events import contract_errors

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DOCUMENT = asyncapi_document()
RENDERER = Renderer("orderflow <orders@orderflow.localhost>")

_text = st.from_regex(r"[A-Za-z0-9 .'&<>-]{1,30}", fullmatch=True) | st.text(
    st.characters(codec="utf-8") | st.sampled_from(" \t\xa0\u3000\x85\u200bab"), max_size=30
)
_price = st.decimals(min_value=0, max_value=10**6, places=2).map(str) | st.just("12.50")
_line = st.fixed_dictionaries(
    {"name": _text, "quantity": st.integers(1, 50), "unit_price": _price},
    optional={"sku": _text},
)
_bodies = st.fixed_dictionaries(
    {
        "customer": st.fixed_dictionaries(
            {"email": st.emails() | st.just("Ann@EXAMPLE.com")}, optional={"name": _text}
        ),
        "lines": st.lists(_line, max_size=4),
        "currency": st.sampled_from(["USD", "eur", "JPY"]),
    }
)


def _stored(request: OrderRequest) -> StoredOrder:
    return StoredOrder(
        id=request.id or 1,
        email=request.email,
        total=request.total,
        currency=request.currency,
        items=[item.wire() for item in request.items],
        created_at=datetime(2026, 12, 2, tzinfo=UTC),
        customer_name=request.customer_name,
    )


@PROPERTY
@given(_bodies, st.booleans())
def test_every_accepted_v2_body_makes_a_valid_v2_event(body: dict[str, Any], exact: bool) -> None:
    total = sum(
        (Decimal(line["unit_price"]) * line["quantity"] for line in body["lines"]), Decimal(0)
    )
    if not body["lines"]:
        total = Decimal("1.00")
    body = {**body, "total": str(total if exact else total + 1)}
    try:
        request = validate_order(body)
    except ValidationError:
        return
    assert exact or not body["lines"], "a total off its lines was accepted"
    message = order_event(_stored(request), 2)
    wire = orjson.loads(orjson.dumps(message.data))
    fields = {"data": orjson.dumps(wire).decode(), **message.headers}
    assert contract_errors(DOCUMENT, fields) == []
    order = parse_order(wire, 2)
    assert order.name == request.customer_name
    assert order.total == request.total
    RENDERER.render(order)
    # And the same order as version 1, for consumers not upgraded yet.
    parse_order(orjson.loads(orjson.dumps(event_payload(_stored(request), 1))), 1)
