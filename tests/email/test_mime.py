"""The MIME writer: whatever a valid order holds, the parsed email has exactly our headers."""

from __future__ import annotations

import email
import email.policy
from email.header import decode_header, make_header
from email.message import EmailMessage
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orderflow.email import InvalidOrder, Renderer, parse_order
from orderflow.email.mime import (
    HeaderValueError,
    build_alternative,
    encode_display_name,
    format_address,
)

RENDERER = Renderer("Shöp ünïcode <orders@shop.example>")
HEADERS = {
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "X-Orderflow-Order-Id",
    "MIME-Version",
    "Content-Type",
}


def _parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


# Any text at all, including CR, LF, header-like and MIME-boundary-like strings.
hostile = st.text(st.characters(codec="utf-8"), min_size=1, max_size=200) | st.sampled_from(
    [
        "Bcc: evil@attacker.example",
        "\r\nBcc: evil@attacker.example",
        "x\nTo: evil@attacker.example",
        '"a" <evil@attacker.example>, b',
        "--=_orderflow_",
        "=?utf-8?b?QmNjOiBldmls?=",
        "\u2028Bcc: evil",
    ]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=hostile, item=hostile, sku=hostile)
def test_no_field_adds_a_header_or_recipient(name: str, item: str, sku: str) -> None:
    data: dict[str, Any] = {
        "id": 101,
        "email": "alice@example.com",
        "total": "9.99",
        "name": name,
        "items": [{"name": item, "sku": sku, "quantity": 1, "price": "9.99"}],
    }
    try:
        order = parse_order(data)
    except InvalidOrder:
        return  # refused at the door: nothing is sent
    rendered = RENDERER.render(order)
    assert rendered.recipient == "alice@example.com"
    message = _parse(rendered.data)
    assert set(message.keys()) == HEADERS
    assert not message.defects
    (to,) = message["To"].addresses
    assert to.addr_spec == "alice@example.com"
    quoted = order.name is not None and order.name.isascii() and "=?" not in order.name
    if order.name and (quoted or len(order.name.encode()) <= 45):  # one word at most
        assert to.display_name == order.name
    assert message.get_content_type() == "multipart/alternative"
    parts = list(message.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    text = parts[0].get_content()
    assert order.items[0].label in text


def test_long_unicode_display_names_fold_and_decode() -> None:
    name = "Zoë Ünïcode-Ñame " * 11  # well over one encoded-word
    value = encode_display_name(name.strip())
    assert "\r\n " in value
    assert all(len(line) < 78 for line in value.split("\r\n"))
    # RFC 2047 decoding joins adjacent encoded-words (the stdlib's address parser
    # puts a space between them, a known limitation, so decode the phrase directly).
    assert str(make_header(decode_header(value.replace("\r\n", "")))) == name.strip()
    data = build_alternative([("To", f"{value} <z@example.com>")], "hi", "<p>hi</p>")
    (to,) = _parse(data)["To"].addresses
    assert to.addr_spec == "z@example.com"


def test_ascii_display_names_are_quoted() -> None:
    assert format_address('Bob "the" \\ Builder', "b@example.com") == (
        '"Bob \\"the\\" \\\\ Builder" <b@example.com>'
    )
    assert format_address(None, "b@example.com") == "b@example.com"


@pytest.mark.parametrize(
    "headers",
    [
        [("Subject", "hi\r\nBcc: evil@attacker.example")],
        [("Subject", "hi\nBcc: evil@attacker.example")],
        [("Subject", "hi\r\n Bcc: evil@attacker.example")],
        [("Subject", "nul\x00")],
        [("Bad Name", "x")],
        [("Bcc:", "x")],
    ],
)
def test_the_writer_refuses_unsafe_headers(headers: list[tuple[str, str]]) -> None:
    with pytest.raises(HeaderValueError):
        build_alternative(headers, "t", "h")


@pytest.mark.parametrize(
    "address", ["a@b.com\r\nBcc: c@d.com", "a@b.com, c@d.com", "<a@b.com>", "a b@c.com", "ab.com"]
)
def test_format_address_refuses_anything_but_one_address(address: str) -> None:
    with pytest.raises(HeaderValueError):
        format_address("x", address)


def test_bodies_are_7bit_or_base64_and_lines_are_bounded() -> None:
    long_line = "x" * 1200
    data = build_alternative([("Subject", "s")], long_line, "<p>naïve</p>")
    message = _parse(data)
    text, html = message.iter_parts()
    assert text["Content-Transfer-Encoding"] == "base64"
    assert html["Content-Transfer-Encoding"] == "base64"
    assert text.get_content().rstrip("\r\n") == long_line
    assert "naïve" in html.get_content()
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    plain = _parse(build_alternative([("Subject", "s")], "hello", "<p>hi</p>"))
    assert [p["Content-Transfer-Encoding"] for p in plain.iter_parts()] == ["7bit", "7bit"]
