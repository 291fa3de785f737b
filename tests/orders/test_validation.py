"""The validation matrix: one case per rule, each 422 naming the field, nothing stored."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from orderflow.orders.validation import MAX_BODY_BYTES, MAX_ITEMS
from tests.support import create_test_database, drop_test_database

from .conftest import Api

GOOD_EMAIL = "alice@example.com"


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def shared_database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """One database for the whole matrix: no case stores anything, so they can share it."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('matrix')}/orders.db"
        return
    admin_url: str = request.getfixturevalue("postgres_admin_url")
    url = create_test_database(admin_url)
    yield url
    drop_test_database(admin_url, url)


@pytest.fixture
def database_url(shared_database_url: str) -> str:
    """This module's cases all use the shared database."""
    return shared_database_url


def _json(body: Any) -> bytes:
    return orjson.dumps(body)


# (case id, raw body, extra headers, the field the problem must name)
CASES: list[tuple[str, bytes, dict[str, str], str]] = [
    ("email-missing", _json({"total": 1}), {}, "email"),
    ("email-syntax", _json({"email": "not-an-email", "total": 1}), {}, "email"),
    ("email-crlf", _json({"email": "a@example.com\r\nBcc: x@evil.test", "total": 1}), {}, "email"),
    ("email-lf", _json({"email": "a@example.com\nX: y", "total": 1}), {}, "email"),
    ("email-display-name", _json({"email": "Eve <eve@example.com>", "total": 1}), {}, "email"),
    (
        "email-two-addresses",
        _json({"email": "a@example.com,b@example.com", "total": 1}),
        {},
        "email",
    ),
    ("email-wrong-type", _json({"email": 5, "total": 1}), {}, "email"),
    ("total-missing", _json({"email": GOOD_EMAIL}), {}, "total"),
    ("total-zero", _json({"email": GOOD_EMAIL, "total": 0}), {}, "total"),
    ("total-negative", _json({"email": GOOD_EMAIL, "total": -5}), {}, "total"),
    ("total-three-decimals", b'{"email": "alice@example.com", "total": 1.005}', {}, "total"),
    ("total-text-three-decimals", _json({"email": GOOD_EMAIL, "total": "1.005"}), {}, "total"),
    ("total-not-a-number", _json({"email": GOOD_EMAIL, "total": "abc"}), {}, "total"),
    ("total-bool", _json({"email": GOOD_EMAIL, "total": True}), {}, "total"),
    ("total-too-large", b'{"email": "alice@example.com", "total": 1e12}', {}, "total"),
    ("total-wrong-type", _json({"email": GOOD_EMAIL, "total": [1]}), {}, "total"),
    ("total-nan", b'{"email": "alice@example.com", "total": NaN}', {}, "body"),
    (
        "currency-unknown",
        _json({"email": GOOD_EMAIL, "total": 1, "currency": "XYZ"}),
        {},
        "currency",
    ),
    (
        "currency-wrong-type",
        _json({"email": GOOD_EMAIL, "total": 1, "currency": 840}),
        {},
        "currency",
    ),
    ("items-not-a-list", _json({"email": GOOD_EMAIL, "total": 1, "items": "x"}), {}, "items"),
    (
        "items-too-many",
        _json({"email": GOOD_EMAIL, "total": 1, "items": [{"name": "a"}] * (MAX_ITEMS + 1)}),
        {},
        "items",
    ),
    (
        "item-unknown-field",
        _json({"email": GOOD_EMAIL, "total": 1, "items": [{"name": "a", "colour": "red"}]}),
        {},
        "items.0.colour",
    ),
    (
        "item-name-too-long",
        _json({"email": GOOD_EMAIL, "total": 1, "items": [{"name": "a" * 201}]}),
        {},
        "items.0.name",
    ),
    (
        "item-name-crlf",
        _json({"email": GOOD_EMAIL, "total": 1, "items": [{"name": "a\r\nb"}]}),
        {},
        "items.0.name",
    ),
    (
        "item-quantity-zero",
        _json({"email": GOOD_EMAIL, "total": 1, "items": [{"name": "a", "quantity": 0}]}),
        {},
        "items.0.quantity",
    ),
    (
        "item-price-three-decimals",
        _json({"email": GOOD_EMAIL, "total": 1, "items": [{"name": "a", "price": "0.001"}]}),
        {},
        "items.0.price",
    ),
    ("id-negative", _json({"email": GOOD_EMAIL, "total": 1, "id": -1}), {}, "id"),
    ("id-text", _json({"email": GOOD_EMAIL, "total": 1, "id": "7"}), {}, "id"),
    ("id-too-large", _json({"email": GOOD_EMAIL, "total": 1, "id": 2**63}), {}, "id"),
    ("unknown-field", _json({"email": GOOD_EMAIL, "total": 1, "coupon": "FREE"}), {}, "coupon"),
    ("body-not-an-object", _json([GOOD_EMAIL, 1]), {}, "body"),
    ("body-not-json", b'{"email": ', {}, "body"),
    ("body-not-utf8", b'{"email": "\xff"}', {}, "body"),
    ("body-duplicate-key", b'{"email": "a@example.com", "total": 1, "total": 2}', {}, "body"),
    (
        "body-too-large",
        _json({"email": GOOD_EMAIL, "total": 1, "pad": "x" * MAX_BODY_BYTES}),
        {},
        "body",
    ),
    (
        "content-type",
        _json({"email": GOOD_EMAIL, "total": 1}),
        {"content-type": "text/plain"},
        "content-type",
    ),
    (
        "idempotency-key-too-long",
        _json({"email": GOOD_EMAIL, "total": 1}),
        {"Idempotency-Key": "k" * 256},
        "Idempotency-Key",
    ),
]


@pytest.mark.parametrize(
    ("body", "headers", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_invalid_order_is_422_naming_the_field_and_stores_nothing(
    api: Api, aredis: Any, body: bytes, headers: dict[str, str], field: str
) -> None:
    response = await api.post(body, headers=headers)

    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == 422
    assert field in [error["field"] for error in problem["errors"]], problem
    assert field in problem["detail"]
    assert await api.counts() == {"orders": 0, "outbox": 0, "idempotency_keys": 0}
    assert await api.runtime.relay.publish_pending() == 0
    assert await aredis.exists("orders") == 0
