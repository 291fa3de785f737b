"""Email header injection, end to end: API → relay → Redis → worker → SMTP.

Through any field of the API or of an event: no extra header, no extra recipient.
"""

from __future__ import annotations

import email
import email.policy
import json
from collections.abc import Awaitable, Callable
from email.message import EmailMessage
from typing import Any

import httpx
import pytest

from tests.support import wait_until

# The chaos harness's whole-system stack (real processes); the only chaos import left.
from ..chaos.conftest import Stack, make_stack

__all__ = ["make_stack"]  # the fixture, shared with the chaos scenarios

pytestmark = [pytest.mark.slow]

EVIL = "evil@evil.test"

REFUSED_BODIES: list[tuple[str, dict[str, Any]]] = [
    ("email", {"email": f"a@example.com\r\nBcc: {EVIL}"}),
    ("email", {"email": f"a@example.com\nBcc: {EVIL}"}),
    ("email", {"email": f"a@example.com, {EVIL}"}),
    ("email", {"email": f"Alice <a@example.com>, <{EVIL}>"}),
    ("email", {"email": f'"a\r\nBcc: {EVIL}"@example.com'}),
    ("email", {"email": "a@example.com\x00"}),
    ("items.0.name", {"items": [{"name": f"Book\r\nBcc: {EVIL}"}]}),
    ("items.0.name", {"items": [{"name": f"Book\u2028Bcc: {EVIL}"}]}),
    ("items.0.name", {"items": [{"name": f"Book\x85Bcc: {EVIL}"}]}),
    ("currency", {"currency": f"USD\r\nBcc: {EVIL}"}),
    ("id", {"id": f"1\r\nBcc: {EVIL}"}),
    ("total", {"total": f"1\r\nBcc: {EVIL}"}),
]

TRICKY_NAMES = [
    f"Bcc: {EVIL}",
    "=?utf-8?b?QmNjOiBldmlsQGV2aWwudGVzdA==?=",
    "<script>alert(1)</script>",
    "Ünïcödé \u200b zero width",
    "x" * 200,
]

HOSTILE_EVENTS: list[dict[str, Any]] = [
    {"id": 900, "email": f"a@example.com\r\nBcc: {EVIL}", "total": 1},
    {"id": 901, "email": f"a@example.com, {EVIL}", "total": 1},
    {"id": 902, "email": f"A <a@example.com>\r\nCc: {EVIL}", "total": 1},
    {"id": 903, "email": "a@example.com", "total": 1, "name": f"x\r\nBcc: {EVIL}"},
    {"id": 904, "email": "a@example.com", "total": 1, "items": [f"Book\r\nBcc: {EVIL}"]},
    {"id": 905, "email": "a@example.com", "total": 1, "currency": "US\nD"},
    {"id": "906\r\nBcc: x@evil.test", "email": "a@example.com", "total": 1},
    {"id": 907, "email": "a@example.com", "total": "1\r\nBcc: evil@evil.test"},
    {"id": 908, "email": "a@example.com", "total": 1, "items": [{"name": "ok", "sku": "a\nb"}]},
]


def _parse(raw: bytes) -> EmailMessage:
    # UTF-8 headers (SMTPUTF8) are read as text, as a mail client would.
    message = email.message_from_string(raw.decode("utf-8"), policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def _assert_one_recipient(stack: Stack) -> None:
    for mail in stack.handler.mails:
        assert len(mail.rcpt_tos) == 1
        assert EVIL not in mail.rcpt_tos[0]
        message = _parse(mail.raw)
        names = [name.lower() for name in message]
        assert names.count("to") == 1
        assert "bcc" not in names
        assert "cc" not in names
        assert message["To"].addresses[0].addr_spec == mail.rcpt_tos[0]
        header_block = mail.raw.split(b"\r\n\r\n", 1)[0]
        assert EVIL.encode() not in header_block


async def test_injection_through_the_api_and_events_adds_no_header_or_recipient(
    make_stack: Callable[..., Awaitable[Stack]],
) -> None:
    stack = await make_stack()
    await stack.start_api()
    stack.start_worker()
    base = {"email": "buyer@example.com", "total": "10.00"}
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=10) as http:
        for field, override in REFUSED_BODIES:
            response = await http.post("/orders", json={**base, **override})
            assert response.status_code == 422, (field, response.text)
            assert field in {e["field"] for e in response.json()["errors"]}, response.text
        accepted = []
        for n, name in enumerate(TRICKY_NAMES, start=1):
            body = {**base, "id": n, "items": [{"name": name, "quantity": 1}]}
            response = await http.post("/orders", json=body)
            assert response.status_code == 201, response.text
            accepted.append(n)
        response = await http.post("/orders", json={**base, "id": 50, "email": "ünï@exämple.com"})
        assert response.status_code == 201
        accepted.append(50)
    for data in HOSTILE_EVENTS:
        await stack.redis_client.xadd("orders", {"data": json.dumps(data).encode()})

    await stack.settle(accepted, timeout=60)

    async def all_dead_lettered() -> bool:
        return await stack.dead_letters() == len(HOSTILE_EVENTS)

    await wait_until(all_dead_lettered, timeout=30)
    result = await stack.account(accepted)
    assert result.duplicates == {}
    assert result.unexpected == []
    assert len(stack.handler.mails) == len(accepted)
    _assert_one_recipient(stack)
    # The tricky names arrive as text in the body, not as headers.
    for mail in stack.handler.mails:
        if mail.order_id == 1:
            text = _parse(mail.raw).get_body(("plain",))
            assert text is not None
            assert f"Bcc: {EVIL}" in text.get_content()
