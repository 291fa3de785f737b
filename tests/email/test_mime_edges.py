"""The MIME writer at its edges: exact limits, the words of each refusal, line ends,
and the boundary retry (each test kills mutants the header-safety tests let live: see
docs/MUTATION.md)."""

from __future__ import annotations

import email
import email.policy
import secrets
from email.message import EmailMessage
from itertools import count

import pytest

from orderflow.email import mime
from orderflow.email.mime import (
    MAX_LINE,
    HeaderValueError,
    build_alternative,
    encode_display_name,
    format_address,
)


def _parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    assert not message.defects
    return message


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda: encode_display_name("a\nb"), "header display name must be one line without"),
        (lambda: format_address(None, "a@b.c\r\n"), "header address must be one line without"),
        (lambda: format_address(None, "a b@c.d"), "'a b@c.d' is not a plain address"),
        (lambda: build_alternative([("Subject", "a\x00")], "", ""), "header Subject must be"),
        (lambda: build_alternative([("X y", "v")], "", ""), "invalid header name 'X y'"),
        (
            lambda: build_alternative([("Subject", "a\r\n \x01")], "", ""),
            "header Subject must be one line",
        ),
        (
            lambda: build_alternative([("Subject", "a\r\n b")], "", ""),
            "header Subject is folded where it may not be",
        ),
    ],
)
def test_each_refusal_names_the_header_and_the_fault(call: object, error: str) -> None:
    with pytest.raises(HeaderValueError, match=f"^{error}"):
        call()  # type: ignore[operator]


def test_only_a_whole_encoded_word_may_be_folded() -> None:
    # Ends like an encoded-word but does not start like one.
    with pytest.raises(HeaderValueError, match="folded where it may not be"):
        build_alternative([("Subject", "a\r\n b?=")], "", "")


def test_an_ascii_name_that_looks_like_an_encoded_word_is_encoded() -> None:
    value = encode_display_name("a =?b")
    assert value.startswith("=?utf-8?b?")
    assert "=?b" not in value


def test_an_encoded_word_holds_up_to_its_byte_limit() -> None:
    exact = "é" * 22 + "a"  # 45 bytes of UTF-8: one word
    assert len(exact.encode()) == mime._WORD_BYTES
    assert "\r\n" not in encode_display_name(exact)
    assert encode_display_name(exact + "b").count("\r\n ") == 1


def test_any_other_letter_is_fine_in_an_address() -> None:
    assert format_address(None, "Xavier@example.com") == "Xavier@example.com"


def test_every_line_end_of_a_body_becomes_crlf() -> None:
    data = build_alternative([("Subject", "s")], "a\r\nb\rc\nd", "<p>\r</p>")
    plain, html = _parse(data).iter_parts()
    assert plain["Content-Transfer-Encoding"] == "7bit"
    assert plain.get_content() == "a\r\nb\r\nc\r\nd"
    assert html.get_content() == "<p>\r\n</p>"
    assert b"\r\na\r\nb\r\nc\r\nd\r\n" in data


def test_a_line_of_exactly_the_limit_stays_7bit() -> None:
    line = "x" * MAX_LINE
    plain, _ = _parse(build_alternative([("Subject", "s")], line, "h")).iter_parts()
    assert plain["Content-Transfer-Encoding"] == "7bit"
    assert plain.get_content() == line


def test_the_message_is_whole_and_ends_with_a_line_end() -> None:
    data = build_alternative([("Subject", "s")], "t", "<p>h</p>")
    assert data.endswith(b"--\r\n")
    plain, html = _parse(data).iter_parts()
    assert (plain.get_content_type(), html.get_content_type()) == ("text/plain", "text/html")
    assert (plain.get_content(), html.get_content()) == ("t", "<p>h</p>")


def test_a_boundary_found_in_a_body_is_drawn_again(monkeypatch: pytest.MonkeyPatch) -> None:
    draws = count()
    monkeypatch.setattr(secrets, "token_hex", lambda n: f"{next(draws):0{2 * n}d}")
    taken = "=_orderflow_" + "0" * 24
    for text, html in ((f"--{taken}", "h"), ("t", f"--{taken}")):
        draws = count()
        data = build_alternative([("Subject", "s")], text, html)
        assert f'boundary="=_orderflow_{1:024d}"'.encode() in data
        plain, part = _parse(data).iter_parts()
        assert (plain.get_content(), part.get_content()) == (text, html)
