"""Server-side tests of the console: pages, escaping, CSRF, validation at the field."""

from __future__ import annotations

import mailbox
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from orderflow.config import Settings
from orderflow.console.forms import Form, parse_items, validate_order_form

from .conftest import Console

MARKUP = '<img src=x onerror="alert(1)"><script>alert(2)</script>'


def deliver(settings: Settings, subject: str, *, html: str | None = None, to: str = "a@b.c") -> str:
    """Put a message into the console's Maildir; returns its key."""
    message = EmailMessage()
    message["From"] = "orderflow <orders@orderflow.localhost>"
    message["To"] = to
    message["Subject"] = subject
    message["Message-ID"] = "<test-1@orderflow.localhost>"
    message.set_content("Thanks for <your> order & more")
    if html is not None:
        message.add_alternative(html, subtype="html")
    box = mailbox.Maildir(settings.mail_dir, create=True)
    return str(box.add(message.as_bytes()))


def assert_secure(headers: Any, *, framing: str = "DENY") -> None:
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp
    assert "'unsafe-inline'" not in csp or "sandbox" in csp
    assert headers["x-frame-options"] == framing
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("path", ["/", "/flow", "/dead-letters", "/inbox"])
async def test_each_page_renders_with_secure_headers(console: Console, path: str) -> None:
    response = await console.client.get(path)

    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")
    assert_secure(response.headers)
    assert "/console/static/console.js" in response.text
    # Inline script would be refused by the CSP: the pages must have none.
    assert "<script>" not in response.text
    assert "onclick" not in response.text


async def test_static_files_are_served_from_the_package(console: Console) -> None:
    script = await console.client.get("/console/static/console.js")
    style = await console.client.get("/console/static/console.css")
    missing = await console.client.get("/console/static/..%2Fsecurity.py")

    assert script.status_code == 200
    assert "EventSource" in script.text
    assert script.headers["content-type"].startswith("text/javascript")
    assert "innerHTML" not in script.text.replace("never innerHTML", "")
    assert style.status_code == 200
    assert style.headers["content-type"].startswith("text/css")
    assert missing.status_code == 404


async def test_order_with_markup_renders_as_text(console: Console) -> None:
    created = await console.client.post(
        "/orders",
        json={"email": "a&b@example.com", "total": "5.00", "items": [{"name": MARKUP}]},
    )
    assert created.status_code == 201, created.text

    page = (await console.client.get("/")).text

    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in page
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in page
    assert "<img src=x" not in page
    assert "<script>alert" not in page
    assert "a&amp;b@example.com" in page


async def test_place_order_through_the_form(console: Console) -> None:
    token = await console.csrf()
    form = {
        "csrf_token": token,
        "idempotency_key": "form-1",
        "email": "alice@example.com",
        "total": "12.50",
        "currency": "eur",
        "items": "2 mug\nteapot\n",
    }
    response = await console.post_form("/console/orders", form)

    assert response.status_code == 303, response.text
    order_id = response.headers["location"].removeprefix("/?placed=")
    order = (await console.client.get(f"/orders/{order_id}")).json()
    assert order["email"] == "alice@example.com"
    assert order["total"] == "12.50"
    assert order["currency"] == "EUR"
    assert order["items"] == [{"name": "mug", "quantity": 2}, {"name": "teapot", "quantity": 1}]
    assert await console.runtime.store.db.run(console.runtime.store.backlog) == 1

    # The same form sent twice (a double click) is the same order.
    again = await console.post_form("/console/orders", form)
    assert again.headers["location"] == response.headers["location"]
    assert await console.runtime.store.db.run(console.runtime.store.backlog) == 1
    page = (await console.client.get(response.headers["location"])).text
    assert f"Order #{order_id} placed" in page


async def test_validation_errors_are_shown_at_their_field(console: Console) -> None:
    token = await console.csrf()
    response = await console.post_form(
        "/console/orders",
        {
            "csrf_token": token,
            "email": "not-an-email",
            "total": "-3",
            "currency": "XYZ",
            "items": "0 mug",
        },
    )

    assert response.status_code == 422
    page = response.text
    assert 'id="error-email"' in page
    assert "not a valid email address" in page
    assert 'id="error-total"' in page
    assert 'id="error-currency"' in page
    assert "ISO 4217" in page
    assert 'id="error-items"' in page
    assert "line 1: quantity" in page
    assert 'value="not-an-email"' in page  # what was typed is kept
    assert await console.runtime.store.db.run(console.runtime.store.backlog) == 0


def test_order_form_uses_the_api_validation() -> None:
    form = Form({"email": ["Bob@EXAMPLE.com"], "total": ["100"], "items": ["3 x cup"]})
    result = validate_order_form(form)
    assert result.request is not None
    assert result.request.email == "Bob@example.com"
    assert str(result.request.total) == "100.00"
    assert parse_items("  \n2 × plate\nspoon\n10 * fork") == [
        {"name": "plate", "quantity": 2},
        {"name": "spoon", "quantity": 1},
        {"name": "fork", "quantity": 10},
    ]
    empty = validate_order_form(Form({}))
    assert set(empty.errors) == {"email", "total"}


@pytest.mark.parametrize(
    ("cookie", "field", "origin", "why"),
    [
        (True, None, None, "carries no CSRF token"),
        (False, "x" * 43, None, "cookie is missing"),
        (True, "y" * 43, None, "does not match"),
        (True, "same", "http://evil.example", "another origin"),
        (True, "same", "cross-site", "another site"),
    ],
)
async def test_state_changes_without_the_csrf_token_are_refused(
    console: Console,
    aredis: aioredis.Redis,
    cookie: bool,
    field: str | None,
    origin: str | None,
    why: str,
) -> None:
    token = await console.csrf()
    if not cookie:
        console.client.cookies.clear()
    data: dict[str, Any] = {"email": "eve@example.com", "total": "1"}
    if field is not None:
        data["csrf_token"] = token if field == "same" else field
    headers = {}
    if origin == "cross-site":
        headers["sec-fetch-site"] = origin
    elif origin:
        headers["origin"] = origin
    await aredis.xadd("orders:dlq", {"data": "junk", "dlq_reason": "bad"})

    placed = await console.post_form("/console/orders", data, headers=headers)
    purged = await console.post_form(
        "/dead-letters/action",
        {**data, "stream": "orders", "action": "purge-all", "confirmed": "yes", "up_to": "9-9"},
        headers=headers,
    )

    assert why in placed.text
    for response in (placed, purged):
        assert response.status_code == 403
        assert "CSRF check failed" in response.text
    assert await console.runtime.store.db.run(console.runtime.store.backlog) == 0
    assert await aredis.xlen("orders:dlq") == 1


async def test_get_never_changes_state(console: Console) -> None:
    for path in ("/console/orders", "/dead-letters/action"):
        response = await console.client.get(path)
        assert response.status_code == 405


async def test_dead_letters_show_reason_and_escaped_payload(
    console: Console, aredis: aioredis.Redis
) -> None:
    await aredis.xadd(
        "orders:dlq",
        {
            "data": orjson.dumps({"id": 1, "email": MARKUP}),
            "dlq_reason": "invalid order: <b>email</b>",
            "dlq_deliveries": "3",
            "dlq_group": "email-service",
            "dlq_stream": "orders",
        },
    )

    page = (await console.client.get("/dead-letters")).text

    assert "invalid order: &lt;b&gt;email&lt;/b&gt;" in page
    assert "<script>alert" not in page
    assert "&lt;script&gt;" in page
    assert ">3<" in page
    assert "1 dead letter(s)" in page


async def test_replay_and_purge_ask_for_confirmation_first(
    console: Console, aredis: aioredis.Redis
) -> None:
    first = (await aredis.xadd("orders:dlq", {"data": "junk-1", "dlq_stream": "orders"})).decode()
    await aredis.xadd("orders:dlq", {"data": "junk-2", "dlq_stream": "orders"})
    token = await console.csrf()

    asked = await console.post_form(
        "/dead-letters/action",
        {"csrf_token": token, "stream": "orders", "action": "replay", "ids": [first]},
    )
    assert asked.status_code == 200
    assert "Replay 1 dead letter(s) of orders?" in asked.text
    assert await aredis.xlen("orders:dlq") == 2
    assert await aredis.xlen("orders") == 0

    done = await console.post_form(
        "/dead-letters/action",
        {
            "csrf_token": token,
            "stream": "orders",
            "action": "replay",
            "ids": [first],
            "confirmed": "yes",
        },
    )
    assert done.status_code == 303
    assert await aredis.xlen("orders:dlq") == 1
    ((_, fields),) = await aredis.xrange("orders")
    assert fields == {b"data": b"junk-1"}
    notice = (await console.client.get(done.headers["location"])).text
    assert "Replayed 1 dead letter(s)" in notice

    # Purge all: the confirmation names the newest one; a later arrival is kept.
    asked_all = await console.post_form(
        "/dead-letters/action", {"csrf_token": token, "stream": "orders", "action": "purge-all"}
    )
    assert "Purge all 1 dead letter(s) of orders?" in asked_all.text
    up_to = asked_all.text.split('name="up_to" value="', 1)[1].split('"', 1)[0]
    late = (await aredis.xadd("orders:dlq", {"data": "junk-3"})).decode()
    purged = await console.post_form(
        "/dead-letters/action",
        {
            "csrf_token": token,
            "stream": "orders",
            "action": "purge-all",
            "up_to": up_to,
            "confirmed": "yes",
        },
    )
    assert purged.status_code == 303
    assert [entry_id.decode() for entry_id, _ in await aredis.xrange("orders:dlq")] == [late]


async def test_bad_dead_letter_actions_are_refused(console: Console) -> None:
    token = await console.csrf()
    unknown = await console.post_form(
        "/dead-letters/action", {"csrf_token": token, "stream": "secrets", "action": "purge"}
    )
    bad_id = await console.post_form(
        "/dead-letters/action",
        {"csrf_token": token, "stream": "orders", "action": "purge", "ids": ["../x"]},
    )
    nothing = await console.post_form(
        "/dead-letters/action", {"csrf_token": token, "stream": "orders", "action": "purge"}
    )

    assert unknown.status_code == 400
    assert bad_id.status_code == 400
    assert "not a stream entry id" in bad_id.text
    assert nothing.status_code == 303
    assert "notice=none" in nothing.headers["location"]


async def test_inbox_lists_and_opens_mail_escaped(console: Console, settings: Settings) -> None:
    key = deliver(
        settings,
        "Order <b>#1</b>",
        html='<p>Hello</p><script>parent.document.title="pwned"</script>',
    )

    inbox = await console.client.get("/inbox")
    message = await console.client.get(f"/inbox/{key}")
    html = await console.client.get(f"/inbox/{key}/html")

    assert "Order &lt;b&gt;#1&lt;/b&gt;" in inbox.text
    assert key in inbox.text
    assert message.status_code == 200
    assert_secure(message.headers)
    assert "Thanks for &lt;your&gt; order &amp; more" in message.text
    assert (
        f'<iframe class="mail-html" sandbox="" referrerpolicy="no-referrer" src="/inbox/{key}/html"'
        in message.text
    )
    assert html.status_code == 200
    assert_secure(html.headers, framing="SAMEORIGIN")
    assert html.headers["content-security-policy"].startswith("sandbox;")
    assert "script-src" not in html.headers["content-security-policy"]
    found = await console.client.get(
        "/inbox/find", params={"message_id": "<test-1@orderflow.localhost>"}
    )
    assert found.status_code == 303
    assert found.headers["location"] == f"/inbox/{key}"


@pytest.mark.parametrize("key", ["..%2F..%2Fetc%2Fpasswd", ".hidden", "nope"])
async def test_inbox_keys_cannot_walk_the_disk(
    console: Console, settings: Settings, key: str
) -> None:
    deliver(settings, "hello")
    assert (await console.client.get(f"/inbox/{key}")).status_code == 404
    assert (await console.client.get(f"/inbox/{key}/html")).status_code == 404


async def test_inbox_without_a_maildir_says_so(console: Console, settings: Settings) -> None:
    assert not Path(settings.mail_dir).exists()
    page = await console.client.get("/inbox")
    assert page.status_code == 200
    assert "No Maildir here yet" in page.text
