"""Hostile input, property-based: the API's models, the wire decoder, the consumer's model.

The promise is end to end: an order the API accepts (201) must be one the Email
Service accepts too, or it would be dead-lettered and never emailed. So beyond "no
crash on garbage", these tests feed whatever the API accepts to the consumer.
"""

from __future__ import annotations

import contextlib
import json
import string
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from orderflow.bus.message import DecodeError, decode
from orderflow.email.order import InvalidOrder, parse_order
from orderflow.email.render import Renderer
from orderflow.orders.validation import BodyError, parse_body, validate_order

from .conftest import size

PROPERTY = settings(
    max_examples=size(100, 2000), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

_json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
_json = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
# Text the way an attacker writes it: any code point, controls and separators included.
_hostile_text = st.text(
    st.characters(codec="utf-8") | st.sampled_from("\r\n\x00\x85\u2028\u2029\x1b\t "),
    max_size=60,
) | st.text(st.sampled_from(" \t\xa0\u3000\x80\x9f\x85\u200bab"), max_size=4)
_emails = (
    st.emails()
    | st.emails()
    | _hostile_text
    | st.sampled_from(
        [
            "a@example.com\r\nBcc: x@evil.test",
            '"a b"@example.com',
            "A <a@example.com>",
            "a@[1.2.3.4]",
        ]
    )
)
_totals = (
    st.decimals(min_value=0, max_value=10**10, places=2).map(str)
    | st.decimals(allow_nan=True, allow_infinity=True, places=3).map(str)
    | _json_scalars
)
_items = st.lists(
    st.fixed_dictionaries(
        {"name": _hostile_text},
        optional={"quantity": st.integers(-5, 20_000), "price": _totals},
    ),
    max_size=3,
)
_wild_bodies = st.fixed_dictionaries(
    {"email": _emails, "total": _totals},
    optional={
        "currency": st.sampled_from(["USD", "eur", "XYZ", ""]) | _hostile_text,
        "items": _items,
        "id": st.integers(-2, 2**64),
    },
)
# Mostly valid orders with hostile text where the API allows free text: these are the
# ones that reach the consumer, so they are where the two sides could disagree.
_plausible_bodies = st.fixed_dictionaries(
    {
        "email": st.emails(),
        "total": st.decimals(min_value="0.01", max_value=10**9, places=2).map(str),
        "items": st.lists(
            st.fixed_dictionaries(
                {"name": _hostile_text},
                optional={"quantity": st.integers(1, 10_000), "price": st.just("1.50")},
            ),
            min_size=1,
            max_size=3,
        ),
    },
    optional={"currency": st.sampled_from(["USD", "eur", "JPY"]), "id": st.integers(1, 2**63 - 1)},
)
_bodies = _plausible_bodies | _wild_bodies


def _dumps(value: Any) -> bytes:
    """JSON as any client may send it (big integers, NaN included)."""
    return json.dumps(value).encode()


def _wire(body: dict[str, Any]) -> dict[str, Any]:
    """What the Order Service publishes for an accepted body (OrderStore's event data)."""
    request = validate_order(body)
    return {
        "id": request.id or 1,
        "email": request.email,
        "total": str(request.total),
        "currency": request.currency,
        "items": [item.wire() for item in request.items],
        "created_at": datetime.now(UTC).isoformat(),
    }


@PROPERTY
@given(st.binary(max_size=300) | _json.map(_dumps))
def test_any_body_is_parsed_or_refused_with_a_body_error(raw: bytes) -> None:
    try:
        parsed = parse_body(raw)
    except BodyError:
        return
    with contextlib.suppress(ValidationError):
        validate_order(parsed)


@PROPERTY
@given(_bodies)
def test_whatever_the_api_accepts_the_email_service_accepts_and_renders(
    body: dict[str, Any],
) -> None:
    try:
        data = _wire(parse_body(_dumps(body)))
    except (BodyError, ValidationError):
        return
    # The event travels as JSON; the consumer validates it again, strictly.
    order = parse_order(orjson.loads(orjson.dumps(data)))
    email = Renderer("orderflow <orders@orderflow.localhost>").render(order)
    assert email.recipient == order.envelope_recipient
    header_block = email.data.split(b"\r\n\r\n", 1)[0]
    names = [line.split(b":", 1)[0] for line in header_block.split(b"\r\n") if line[:1] != b" "]
    assert names.count(b"To") == 1
    assert b"Bcc" not in names
    assert b"Cc" not in names


@PROPERTY
@given(
    st.dictionaries(
        st.binary(max_size=12) | st.sampled_from([b"data", b"ce_id", b"ce_type"]),
        st.binary(max_size=200) | _json.map(_dumps),
        max_size=36,
    )
)
def test_any_stream_entry_decodes_or_raises_decode_error(fields: dict[bytes, bytes]) -> None:
    try:
        message = decode(fields, "1-0")
    except DecodeError:
        return
    with contextlib.suppress(InvalidOrder):
        parse_order(message.data)


@PROPERTY
@given(st.dictionaries(st.sampled_from(["id", "email", "total", "items", "name"]), _json))
def test_any_json_object_is_an_order_or_invalid_order(data: dict[str, Any]) -> None:
    reason = ""
    try:
        parse_order(data)
    except InvalidOrder as exc:
        reason = exc.reason
    assert reason == "" or reason.startswith("invalid order")


def test_printable_ascii_item_names_are_accepted_by_both_sides() -> None:
    body = {"email": "a@example.com", "total": "1.00", "items": [{"name": string.printable[:94]}]}
    assert parse_order(_wire(body)).items[0].name == string.printable[:94]


@pytest.mark.parametrize("name", ["   ", "\xa0", "\u3000", "\x80x", "a\x9fb"])
def test_names_the_email_service_would_refuse_are_refused_by_the_api(name: str) -> None:
    # Found by the property above: the API accepted these, the consumer dead-lettered
    # them, and the order was never emailed.
    body = {"email": "a@example.com", "total": "1.00", "items": [{"name": name}]}
    with pytest.raises(ValidationError) as refused:
        validate_order(body)
    assert refused.value.errors()[0]["loc"] == ("items", 0, "name")
