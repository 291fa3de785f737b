"""Validation of order events at the consumer, and rendering of the confirmation."""

from __future__ import annotations

import time
import unicodedata
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import jinja2
import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import given
from hypothesis import strategies as st

from orderflow import domain
from orderflow.config import ConfigError
from orderflow.domain import validate_address
from orderflow.email import InvalidOrder, Renderer, mime, parse_order
from orderflow.email import order as order_module

BASE: dict[str, Any] = {"id": 101, "email": "alice@example.com", "total": 100}


def test_the_labs_payload_is_an_order_with_defaults() -> None:
    order = parse_order(BASE)
    assert order.id == 101
    assert order.email == "alice@example.com"
    assert order.total == Decimal("100")
    assert order.currency == "USD"
    assert order.items == ()


@pytest.mark.parametrize(
    ("total", "expected"),
    [(100.1, "100.1"), ("100.00", "100.00"), (0.3, "0.3"), ("12.3456", "12.3456"), (7, "7")],
)
def test_totals_are_exact_decimals(total: object, expected: str) -> None:
    order = parse_order({**BASE, "total": total})
    assert isinstance(order.total, Decimal)
    assert str(order.total) == expected


@pytest.mark.parametrize(
    ("field", "value", "mentions"),
    [
        ("total", 0, "total"),
        ("total", -5, "total"),
        ("total", "abc", "total"),
        ("total", "NaN", "total"),
        ("total", True, "total"),
        ("total", "1.00001", "total"),
        ("total", None, "total"),
        ("id", 0, "id"),
        ("id", -1, "id"),
        ("id", True, "id"),
        ("id", 1.5, "id"),
        ("id", "abc", "id"),
        ("id", 2**64, "id"),
        ("email", "not-an-email", "email"),
        ("email", 42, "email"),
        ("email", "a@b.com\r\nBcc: evil@example.net", "email"),
        ("email", "alice@example.com, evil@example.net", "email"),
        ("email", "Alice <alice@example.com>", "email"),
        ("currency", "US", "currency"),
        ("currency", "US\nD", "currency"),
        ("items", "book", "items"),
        ("items", [{"name": "a\r\nBcc: evil@example.net"}], "items"),
        ("items", [{"name": "ok", "quantity": 0}], "items"),
        ("items", [{"name": "ok"}] * 101, "items"),
        ("name", "Bob\r\nBcc: evil@example.net", "name"),
    ],
)
def test_invalid_fields_are_named(field: str, value: object, mentions: str) -> None:
    with pytest.raises(InvalidOrder) as info:
        parse_order({**BASE, field: value})
    assert mentions in str(info.value)


def test_missing_fields_are_named() -> None:
    with pytest.raises(InvalidOrder, match="email") as info:
        parse_order({"id": 7, "total": 1})
    # What could be read is kept for the email.failed event.
    assert info.value.order_id == 7
    with pytest.raises(InvalidOrder, match="id"):
        parse_order({"email": "a@example.com", "total": 1})


def test_items_and_currency_are_normalised() -> None:
    order = parse_order(
        {
            **BASE,
            "currency": "eur",
            "items": ["pen", {"sku": "B-1", "quantity": 2, "unit_price": "9.99"}],
            "created_at": "2026-01-01T00:00:00Z",
        }
    )
    assert order.currency == "EUR"
    assert [(i.label, i.quantity, i.price) for i in order.items] == [
        ("pen", 1, None),
        ("B-1", 2, Decimal("9.99")),
    ]


def test_internationalised_addresses() -> None:
    unicode_domain = parse_order({**BASE, "email": "bob@exämple.com"})
    assert unicode_domain.envelope_recipient == "bob@xn--exmple-cua.com"
    unicode_local = parse_order({**BASE, "email": "ünïcode@exämple.com"})
    assert unicode_local.envelope_recipient == "ünïcode@exämple.com"


def test_confirmation_content() -> None:
    renderer = Renderer("Shop <orders@shop.example>")
    order = parse_order(
        {
            **BASE,
            "total": "120.50",
            "currency": "EUR",
            "name": "Zoë",
            "items": [{"name": "<b>Book</b> & co", "quantity": 2, "price": "60.25"}],
        }
    )
    email = renderer.render(order)
    assert email.recipient == "alice@example.com"
    assert email.sender == "orders@shop.example"
    assert not email.smtputf8
    msg = email.parsed()
    assert msg["Subject"] == "Order #101 confirmed"
    assert msg["From"] == "Shop <orders@shop.example>"
    assert msg["To"].addresses[0].addr_spec == "alice@example.com"
    assert msg["To"].addresses[0].display_name == "Zoë"
    assert msg["Message-ID"] == "<order-101@shop.example>"
    assert msg.get_content_type() == "multipart/alternative"
    text = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    assert text is not None
    assert html is not None
    text_body = text.get_content()
    html_body = html.get_content()
    for body in (text_body, html_body):
        assert "#101" in body
        assert "120.50 EUR" in body
        assert "Zoë" in body
    assert "2 x <b>Book</b> & co at 60.25 EUR" in text_body
    # Autoescaped: the item's markup is shown, not interpreted.
    assert "&lt;b&gt;Book&lt;/b&gt; &amp; co" in html_body
    assert "<b>Book</b>" not in html_body


def test_message_id_is_deterministic_per_order() -> None:
    renderer = Renderer("orderflow <orders@orderflow.localhost>")
    first = renderer.render(parse_order(BASE)).parsed()
    again = renderer.render(parse_order({**BASE, "total": 5})).parsed()
    other = renderer.render(parse_order({**BASE, "id": 102})).parsed()
    assert first["Message-ID"] == again["Message-ID"] == "<order-101@orderflow.localhost>"
    assert other["Message-ID"] == "<order-102@orderflow.localhost>"


@pytest.mark.parametrize(
    "mail_from", ["", "no-address", "a@b.com, c@d.com", "x <a@b.com>\r\nBcc: e@f.com"]
)
def test_bad_mail_from_is_a_config_error(mail_from: str) -> None:
    with pytest.raises(ConfigError, match="MAIL_FROM"):
        Renderer(mail_from)


# -- the address check's fast path ----------------------------------------------------

_ADDRESS_CHARS = "aZ09._+-@!#'\"é ()[]:\\"


def _full_check(value: str) -> tuple[str, str | None] | str:
    try:
        validated = validate_email(value, check_deliverability=False)
    except EmailNotValidError as exc:
        return str(exc)
    return validated.normalized, validated.ascii_email


def _fast_check(value: str) -> tuple[str, str | None] | str:
    try:
        return validate_address(value)
    except EmailNotValidError as exc:
        return str(exc)


@pytest.mark.parametrize(
    "value",
    [
        "alice@example.com",
        "Alice.Smith+tag@Example.COM",
        "a-b_c@sub.example.co.uk",
        "customer0000123@example.com",
        "x" * 64 + "@example.com",
        "x" * 65 + "@example.com",  # local part too long
        "a..b@example.com",
        ".a@example.com",
        "a.@example.com",
        "a@localhost",  # no dot: not a public domain
        "a@example.invalid",  # special-use domain
        "a@-example.com",
        "a@example..com",
        "a@123.456",
        "a@" + "d" * 250 + ".com",  # too long
        "ünï@exämple.com",
        "alice@exämple.com",
        '"quoted"@example.com',
        "a@[127.0.0.1]",
        "@example.com",
        "alice@",
        "alice",
    ],
)
def test_fast_address_check_agrees_with_email_validator(value: str) -> None:
    assert _fast_check(value) == _full_check(value)


@given(
    st.text(alphabet=_ADDRESS_CHARS, max_size=20),
    st.sampled_from(["example.com", "Example.ORG", "a-b.co", "localhost", "x.invalid", "é.com"]),
)
def test_fast_address_check_agrees_with_email_validator_on_any_address(
    local: str, domain: str
) -> None:
    value = f"{local}@{domain}"
    assert _fast_check(value) == _full_check(value)


def test_control_character_checks_match_unicode_categories() -> None:
    # The regular expressions stand for per-character unicodedata checks.
    for code in range(0x10000):
        ch = chr(code)
        category = unicodedata.category(ch)
        assert bool(mime._CONTROL.search(ch)) == (category in ("Cc", "Zl", "Zp")), hex(code)
        assert bool(domain.CONTROL_CHARACTERS.search(ch)) == (category in ("Cc", "Zl", "Zp"))
        assert bool(order_module._SPACE_OR_CONTROL.search(ch)) == (
            ch.isspace() or category == "Cc"
        ), hex(code)


def test_date_header_is_the_given_time_to_the_second() -> None:
    renderer = Renderer("orderflow <orders@orderflow.localhost>")
    order = parse_order(BASE)
    first = datetime(2026, 11, 27, 1, 2, 3, 400_000, tzinfo=UTC)
    for now, expected in [
        (first, "Fri, 27 Nov 2026 01:02:03 +0000"),
        (first.replace(microsecond=900_000), "Fri, 27 Nov 2026 01:02:03 +0000"),
        (first.replace(second=4), "Fri, 27 Nov 2026 01:02:04 +0000"),
    ]:
        assert renderer.render(order, now=now).parsed()["Date"] == expected


def test_date_header_from_the_clock_follows_it_second_by_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    renderer = Renderer("orderflow <orders@orderflow.localhost>")
    order = parse_order(BASE)
    start = datetime(2026, 11, 27, 1, 2, 3, tzinfo=UTC).timestamp()
    for offset, expected in [
        (0.4, "Fri, 27 Nov 2026 01:02:03 +0000"),
        (0.9, "Fri, 27 Nov 2026 01:02:03 +0000"),
        (1.0, "Fri, 27 Nov 2026 01:02:04 +0000"),
        (61.5, "Fri, 27 Nov 2026 01:03:04 +0000"),
    ]:
        monkeypatch.setattr(time, "time", lambda offset=offset: start + offset)
        assert renderer.render(order).parsed()["Date"] == expected


_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=12
).filter(str.strip)
_PRICE = st.decimals(min_value=0, max_value=10_000, places=2, allow_nan=False)


@given(
    name=st.none() | _TEXT,
    lines=st.lists(
        st.fixed_dictionaries(
            {"name": _TEXT, "quantity": st.integers(1, 50)},
            optional={"sku": _TEXT, "unit_price": _PRICE.map(str)},
        ),
        max_size=4,
    ),
    total=_PRICE.filter(lambda d: d > 0).map(str),
)
def test_the_templates_read_the_same_order_as_the_event_gives_it(
    name: str | None, lines: list[dict[str, Any]], total: str
) -> None:
    # The renderer hands the templates a view of the order, converted once; what they
    # show must be what they would show of the order event itself (Jinja's defaults).
    customer = {"email": "alice@example.com"} | ({"name": name} if name else {})
    priced = [line for line in lines if "unit_price" in line]
    if lines and len(priced) == len(lines):
        # v2 checks a priced order's total against its lines.
        total = str(sum((Decimal(ln["unit_price"]) * ln["quantity"] for ln in lines), Decimal(0)))
        if Decimal(total) <= 0:
            return
    order = parse_order(
        {"id": 7, "customer": customer, "currency": "EUR", "lines": lines, "total": total}, 2
    )
    message = Renderer("orderflow <orders@orderflow.localhost>").render(order).parsed()
    loader = jinja2.PackageLoader("orderflow.email", "templates")
    html = jinja2.Environment(loader=loader, autoescape=True, undefined=jinja2.StrictUndefined)
    text = jinja2.Environment(
        loader=loader,
        autoescape=False,  # noqa: S701 (plain text, as the renderer's)
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    for subtype, environment, template in (
        ("plain", text, "confirmation.txt.j2"),
        ("html", html, "confirmation.html.j2"),
    ):
        part = message.get_body((subtype,))
        assert part is not None
        expected = environment.get_template(template).render(order=order)
        assert part.get_content().replace("\r\n", "\n") == expected.replace("\r\n", "\n")


def _checked_amount(text: str) -> Decimal | None:
    """Every check of an amount given as text, none skipped (None: refused)."""
    try:
        amount = Decimal(text.strip())
    except ArithmeticError:
        return None
    exponent = amount.as_tuple().exponent
    if not amount.is_finite() or not isinstance(exponent, int):
        return None
    if exponent < -order_module.MAX_DECIMALS or abs(amount) >= order_module.MAX_TOTAL:
        return None
    return amount


@given(
    st.text(alphabet="0123456789.-+eE _", max_size=20)
    | st.from_regex(r" ?-?[0-9]{1,4}(\.[0-9]{1,6})? ?", fullmatch=True)
    | st.from_regex(r"-?[0-9]{11,13}(\.[0-9]{1,5})?", fullmatch=True)
)
def test_an_amount_in_its_usual_shape_is_checked_as_any_other(text: str) -> None:
    try:
        amount: Decimal | None = order_module._amount(text)
    except ValueError:
        amount = None
    expected = _checked_amount(text)
    assert amount == expected
    if expected is not None:
        assert str(amount) == str(expected)
