"""The journey page in Chromium, on the real stack with an SMTP server that misbehaves.

``orderflow up`` sends through an SMTP server run by the test: it answers 451 to the
first attempt at each order's email (then accepts it) and 550 to ``refuse@…``, so one
order is retried then sent and another is dead-lettered. Screenshots go to
``test-artifacts/console/``.
"""

from __future__ import annotations

import asyncio
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from orderflow.embedded.smtp_server import SmtpServer
from tests.support import order_id_of, poll_until

from .test_browser import Stack, chromium, launched_chromium, running_up, shot

try:
    from playwright.sync_api import Browser, Page, expect
except ImportError:  # pragma: no cover - test_browser skips the module the same way
    pytest.skip("playwright is not installed", allow_module_level=True)

pytestmark = pytest.mark.slow
__all__ = ["chromium"]  # the fixture, used here


@dataclass
class FlakySmtp:
    """Refuses ``refuse@…`` for good (550) and each order's first DATA for now (451)."""

    refused_once: set[int | None] = field(default_factory=set)
    accepted: list[int | None] = field(default_factory=list)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        """550 for refuse@…, else accept."""
        if address.startswith("refuse@"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        """451 the first time an order's email comes, 250 after that."""
        order = order_id_of(envelope.original_content or b"")
        if order not in self.refused_once:
            self.refused_once.add(order)
            return "451 4.3.0 try again later"
        self.accepted.append(order)
        return "250 OK"


@pytest.fixture(scope="module")
def flaky_smtp() -> Iterator[str]:
    """The misbehaving SMTP server on its own event loop thread; yields its URL."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = SmtpServer(FlakySmtp(), port=0)
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    try:
        yield server.url
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, flaky_smtp: str) -> Iterator[Stack]:
    """``orderflow up`` sending through the flaky server, retrying quickly."""
    data_dir = tmp_path_factory.mktemp("journey-stack")
    with running_up(data_dir, ORDERFLOW_SMTP_URL=flaky_smtp, ORDERFLOW_RETRY_BASE_MS="100") as up:
        yield up


@pytest.fixture(scope="module")
def browser(chromium: Path) -> Iterator[Browser]:
    """Headless Chromium with background networking off."""
    with launched_chromium(chromium) as launched:
        yield launched


@pytest.fixture
def page(browser: Browser, stack: Stack) -> Iterator[Page]:
    """A fresh page; fails the test on a script error or a CSP violation."""
    context = browser.new_context(base_url=stack.url, viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    problems: list[str] = []
    opened.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    opened.on(
        "console",
        lambda message: (
            problems.append(message.text)
            if message.type == "error" and "Content Security Policy" in message.text
            else None
        ),
    )
    yield opened
    context.close()
    assert problems == []


def place(stack: Stack, email: str) -> int:
    """POST an order to the API; its id."""
    body = orjson.dumps({"email": email, "total": "12.00", "items": [{"name": "teapot"}]})
    request = urllib.request.Request(
        f"{stack.url}/orders", data=body, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(orjson.loads(response.read())["id"])


def status(stack: Stack, order_id: int) -> str:
    """The order's email status, from the API's JSON."""
    with urllib.request.urlopen(f"{stack.url}/orders/{order_id}", timeout=10) as response:
        return str(orjson.loads(response.read())["email_status"])


def kinds(page: Page) -> list[str]:
    """The timeline's event kinds, in page order."""
    found = page.locator("#timeline li").evaluate_all("l => l.map(e => e.dataset.kind)")
    return [str(kind) for kind in found]


def test_a_retried_then_sent_order_and_a_dead_lettered_one(page: Page, stack: Stack) -> None:
    sent = place(stack, "bob@example.com")
    refused = place(stack, "refuse@example.com")
    poll_until(lambda: status(stack, sent) == "sent", 30, what=f"order {sent} sent")
    poll_until(lambda: status(stack, refused) == "failed", 30, what=f"order {refused} failed")

    # From the Orders table to the sent order's journey.
    page.goto("/")
    page.locator(f'#orders-body tr[data-order-id="{sent}"] a.journey-link').click()
    expect(page.locator("h1")).to_contain_text(f"Order #{sent}")

    poll_until(recorded_kind(page, "sent"), 15, what="the sent delivery in the journey")
    order = kinds(page)
    assert order[:3] == ["accepted", "committed", "published"]
    assert order.index("retried") < order.index("sent") < order.index("status-sent")
    timeline = page.locator("#timeline")
    expect(timeline.locator('[data-kind="retried"]')).to_contain_text("451")
    expect(timeline.locator('[data-kind="retried"]')).to_contain_text("Delivery 1")
    expect(timeline.locator('[data-kind="sent"]')).to_contain_text("Delivery 2")
    expect(timeline.locator('[data-kind="sent"]')).to_contain_text(f"<order-{sent}@")
    expect(timeline.locator('[data-kind="status-sent"]')).to_contain_text(f"<order-{sent}@")
    shot(page, "journey-retried-then-sent")

    # From its dead letter to the refused order's journey.
    page.goto("/dead-letters")
    link = page.locator(f'a.journey-link[href="/journey/{refused}"]')
    expect(link).to_have_count(1)
    link.click()
    expect(page.locator("h1")).to_contain_text(f"Order #{refused}")
    poll_until(recorded_kind(page, "dead-lettered"), 15, what="the dead-lettering recorded")
    expect(timeline.locator('[data-kind="dead-lettered"]')).to_contain_text("550")
    expect(timeline.locator('[data-kind="dead-letter"]')).to_contain_text("550")
    expect(timeline.locator('[data-kind="status-failed"]')).to_contain_text("550")
    assert "sent" not in kinds(page)
    shot(page, "journey-dead-lettered")


def recorded_kind(page: Page, kind: str) -> Any:
    """A poll_until predicate: reload the page, and is ``kind`` in its timeline?"""

    def check() -> bool:
        page.reload()
        return kind in kinds(page)

    return check
