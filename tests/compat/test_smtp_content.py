"""The DATA content of a pipelined transaction, against the plain regular expressions."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from orderflow._compat.aiosmtplib import wire_content


def _reference(data: bytes) -> bytes:
    # What the transaction did before the shortcut: both substitutions, always.
    content = re.sub(rb"\r\n|\n|\r(?!\n)", b"\r\n", data)
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    return re.sub(rb"(?m)^\.", b"..", content) + b".\r\n"


@given(st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"\r\n.", b".\r\n"])))
def test_wire_content_is_the_substitutions_on_any_line_ends_and_dots(
    pieces: list[bytes],
) -> None:
    data = b"".join(pieces)
    assert wire_content(data) == _reference(data)


def test_a_rendered_email_goes_as_it_is() -> None:
    data = b"Subject: x\r\n\r\nline\r\n"
    assert wire_content(data) == data + b".\r\n"
    assert wire_content(b".hidden\r\nx\r\n.y") == b"..hidden\r\nx\r\n..y\r\n.\r\n"
    assert wire_content(b"a\rb\nc") == b"a\r\nb\r\nc\r\n.\r\n"
