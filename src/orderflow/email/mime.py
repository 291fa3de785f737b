"""A small, strict writer of multipart/alternative emails, straight to wire bytes.

The standard library's ``EmailMessage`` with the SMTP policy costs about 5 ms of CPU
per confirmation (header parsing and folding), which would cap a worker near 200
emails/s. Confirmation emails have a fixed shape, so this writer produces the same
RFC 5322 / MIME bytes directly, and keeps the property that matters: no value can
start a header line. Every header value passes :func:`_header_value`, which refuses
CR, LF and other control characters outright; display names are quoted or RFC 2047
encoded; bodies are 7bit when they are short-lined ASCII and base64 otherwise, so body
text can never be read as headers or as a MIME boundary.
"""

from __future__ import annotations

import base64
import re
import secrets
from collections.abc import Sequence

CRLF = "\r\n"
#: RFC 5322 limit on a line, without its CRLF.
MAX_LINE = 998
#: Bytes of UTF-8 per RFC 2047 encoded-word, so each word stays under 75 characters.
_WORD_BYTES = 45


class HeaderValueError(ValueError):
    """A header value that could break the message's structure."""


#: Unicode's Cc (C0 and C1 controls, CR and LF among them), Zl and Zp characters.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _header_value(name: str, value: str) -> str:
    if _CONTROL.search(value):
        raise HeaderValueError(f"header {name} must be one line without control characters")
    return value


def encode_display_name(name: str) -> str:
    """A display name as a quoted string, or RFC 2047 encoded-words when not ASCII."""
    _header_value("display name", name)
    # "=?" could be read as the start of an encoded-word, even inside quotes, and show
    # the reader other text than the name: such names are encoded themselves.
    if name.isascii() and "=?" not in name:
        return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    words: list[str] = []
    chunk = ""
    for ch in name:
        # Split on character boundaries so every word decodes on its own.
        if len((chunk + ch).encode("utf-8")) > _WORD_BYTES:
            words.append(chunk)
            chunk = ""
        chunk += ch
    if chunk:
        words.append(chunk)
    encoded = [f"=?utf-8?b?{base64.b64encode(w.encode('utf-8')).decode('ascii')}?=" for w in words]
    # Folding whitespace between encoded-words is not part of the decoded name.
    return (CRLF + " ").join(encoded)


def format_address(display_name: str | None, addr_spec: str) -> str:
    """``"Name" <local@domain>`` (or the bare address), safe as a header value."""
    _header_value("address", addr_spec)
    if any(ch in addr_spec for ch in ' <>(),;:"[]\\') or addr_spec.count("@") != 1:
        raise HeaderValueError(f"{addr_spec!r} is not a plain address")
    if not display_name:
        return addr_spec
    return f"{encode_display_name(display_name)} <{addr_spec}>"


def _body_part(subtype: str, text: str) -> list[str]:
    """The lines of one text/* part, CRLF line ends, 7bit if it can be, else base64."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if text.isascii() and max(map(len, lines)) <= MAX_LINE:
        return [
            f"Content-Type: text/{subtype}; charset=utf-8",
            "Content-Transfer-Encoding: 7bit",
            "",
            *lines,
        ]
    encoded = base64.encodebytes(CRLF.join(lines).encode("utf-8")).decode("ascii")
    return [
        f"Content-Type: text/{subtype}; charset=utf-8",
        "Content-Transfer-Encoding: base64",
        "",
        *encoded.splitlines(),
    ]


def build_alternative(headers: Sequence[tuple[str, str]], text: str, html: str) -> bytes:
    """A multipart/alternative message: ``headers`` (checked), a text and an HTML part.

    Header values must be ASCII except where RFC 6532 allows UTF-8 (an address that
    needs SMTPUTF8); the caller then sends with SMTPUTF8.
    """
    boundary = "=_orderflow_" + secrets.token_hex(12)
    out: list[str] = []
    for name, value in headers:
        if not name.isascii() or not name.replace("-", "").isalnum():
            raise HeaderValueError(f"invalid header name {name!r}")
        # Only RFC 2047 encoded-words (from encode_display_name) may be folded.
        first, *continued = value.split(CRLF + " ")
        _header_value(name, first)
        for piece in continued:
            _header_value(name, piece)
            if not (piece.startswith("=?utf-8?b?") and ("?=" in piece)):
                raise HeaderValueError(f"header {name} is folded where it may not be")
        out.append(f"{name}: {value}")
    out += [
        "MIME-Version: 1.0",
        f'Content-Type: multipart/alternative; boundary="{boundary}"',
        "",
    ]
    if boundary in text or boundary in html:  # pragma: no cover - 96 random bits
        return build_alternative(headers, text, html)
    for subtype, body in (("plain", text), ("html", html)):
        out.append("--" + boundary)
        out += _body_part(subtype, body)
    out.append(f"--{boundary}--")
    out.append("")
    return CRLF.join(out).encode("utf-8")
