"""The console in a real browser (Playwright driving Debian's Chromium) on the real stack.

``orderflow up`` runs in a temporary data dir (embedded Redis, the API with its
console, one email worker, the SMTP sink); the tests use the console as a person
would and save a screenshot of each page to ``test-artifacts/console/``.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from orderflow.embedded.redis_server import free_port
from tests.support import clean_env, poll_until
from tests.support.apt import IN_CI, apt_install

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "console"

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    if IN_CI:
        raise
    pytest.skip("playwright is not installed (pip install playwright)", allow_module_level=True)


@pytest.fixture(scope="module")
def chromium() -> Path:
    """Debian's Chromium, installed with apt-get when missing and we are root."""
    return apt_install("chromium", CHROMIUM)


@dataclass
class Stack:
    """``orderflow up`` running in a temporary data dir."""

    url: str
    data_dir: Path
    process: subprocess.Popen[bytes]

    def redis(self) -> redis.Redis:
        """A client on the stack's embedded Redis."""
        return redis.Redis.from_url((self.data_dir / "redis.url").read_text().strip())


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return int(response.status) == 200
    except OSError:
        return False


@contextlib.contextmanager
def running_up(data_dir: Path, **env: str) -> Iterator[Stack]:
    """``orderflow up`` with one email worker in ``data_dir`` (``env`` added), until exit."""
    port = free_port()
    environment = clean_env(ORDERFLOW_DATA_DIR=str(data_dir), ORDERFLOW_REDIS_APPENDFSYNC="no")
    environment.update(env)
    log = open(data_dir / "up.log", "wb")  # noqa: SIM115 - closed at teardown
    process = subprocess.Popen(
        [sys.executable, "-m", "orderflow", "up", "--port", str(port), "--workers", "1"],
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        poll_until(lambda: _healthy(url) or process.poll() is not None, 60, what="orderflow up")
        if process.poll() is not None:
            raise AssertionError((data_dir / "up.log").read_text())
        yield Stack(url, data_dir, process)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@contextlib.contextmanager
def launched_chromium(chromium: Path) -> Iterator[Browser]:
    """Headless Chromium with background networking off."""
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(chromium), headless=True, args=CHROMIUM_ARGS
        )
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The whole system, as ``orderflow up`` runs it, with one email worker."""
    with running_up(tmp_path_factory.mktemp("console-stack")) as running:
        yield running


@pytest.fixture(scope="module")
def browser(chromium: Path) -> Iterator[Browser]:
    """Headless Chromium with background networking off."""
    with launched_chromium(chromium) as launched:
        yield launched


@pytest.fixture
def page(browser: Browser, stack: Stack) -> Iterator[Page]:
    """A fresh page on the console; fails the test on a script error or a CSP violation."""
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
    opened.on("dialog", lambda dialog: problems.append(f"dialog: {dialog.message}"))
    yield opened
    context.close()
    assert problems == []


def shot(page: Page, name: str) -> None:
    """Save a full-page screenshot as a test artifact."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_order_placed_in_the_page_turns_sent_live_and_its_email_opens(page: Page) -> None:
    page.goto("/")
    page.fill("#email", "carol@example.com")
    page.fill("#total", "42.50")
    page.fill("#items", "2 <b>teapot</b>\nmug")
    page.click("#order-form button[type=submit]")
    expect(page.locator("#placed-notice")).to_contain_text("placed")
    order_id = page.locator("#orders-body").get_attribute("data-placed")
    assert order_id
    page.evaluate("window.__notReloaded = true")
    row = page.locator(f'#orders-body tr[data-order-id="{order_id}"]')
    expect(row.locator(".email")).to_have_text("carol@example.com")
    expect(row.locator(".items")).to_have_text("2 × <b>teapot</b>, 1 × mug")
    assert row.locator(".items b").count() == 0

    # The status turns from pending to sent through live updates, not a reload.
    expect(row.locator(".status")).to_have_text("sent", timeout=20_000)
    assert page.evaluate("window.__notReloaded") is True
    expect(page.locator("#live-status")).to_have_text("live")
    shot(page, "orders")

    row.locator("a.mail-link").click()
    expect(page.locator("#to")).to_contain_text("carol@example.com")
    expect(page.locator("#subject")).to_contain_text(order_id)
    frame = page.locator("iframe.mail-html")
    assert frame.get_attribute("sandbox") == ""
    expect(page.frame_locator("iframe.mail-html").locator("body")).to_contain_text("teapot")
    expect(page.locator("#mail-text")).to_contain_text("<b>teapot</b>")
    shot(page, "message")

    page.goto("/inbox")
    expect(page.locator("table.inbox td.to").first).to_contain_text("carol@example.com")
    shot(page, "inbox")


def test_markup_in_an_order_renders_as_text(page: Page) -> None:
    markup = "<img src=x onerror=\"document.title='pwned'\"><script>document.title='pwned'</script>"
    created = page.request.post(
        "/orders",
        data={"email": "o'brien+x@example.com", "total": "1", "items": [{"name": markup}]},
    )
    assert created.status == 201
    order_id = created.json()["id"]
    page.goto("/")
    row = page.locator(f'#orders-body tr[data-order-id="{order_id}"]')
    expect(row.locator(".items")).to_have_text(f"1 × {markup}")
    expect(row.locator(".email")).to_have_text("o'brien+x@example.com")
    # Again after the live script rebuilt the rows from a snapshot.
    expect(page.locator("#live-status")).to_have_text("live")
    expect(row.locator(".items")).to_have_text(f"1 × {markup}")
    assert page.locator("#orders-body img, #orders-body script").count() == 0
    assert page.title() != "pwned"


def test_poison_entry_appears_under_dead_letters_and_replays(page: Page, stack: Stack) -> None:
    client = stack.redis()
    page.goto("/dead-letters")
    expect(page.locator("#live-status")).to_have_text("live")
    page.evaluate("window.__notReloaded = true")
    poison = client.xadd("orders", {"data": "not json <script>alert(1)</script>"}).decode()

    # The table re-renders live: the dead letter appears without a reload.
    letter = page.locator('section.dlq[data-stream="orders"] tbody tr').filter(has_text=poison)
    expect(letter.locator(".reason")).not_to_have_text("—", timeout=15_000)
    assert page.evaluate("window.__notReloaded") is True
    expect(page.locator("#live-notice")).to_be_hidden()
    expect(letter.locator(".payload summary")).to_have_text("not json <script>alert(1)</script>")
    shot(page, "dead-letters")

    letter.get_by_role("button", name="Replay").click()
    expect(page.locator("h1")).to_contain_text("Replay 1 dead letter(s) of orders?")
    shot(page, "dead-letters-confirm")
    page.click("#confirm-button")
    expect(page.locator("#action-notice")).to_have_text(
        "Replayed 1 dead letter(s) to their stream."
    )
    page.evaluate("window.__notReloaded = true")
    replayed = [
        entry_id.decode()
        for entry_id, fields in client.xrange("orders", f"({poison}", "+")
        if fields.get(b"data") == b"not json <script>alert(1)</script>"
    ]
    assert len(replayed) == 1
    # Another dead letter arrives: the table re-renders live, and the notice of what the
    # operator just did stays.
    later = client.xadd("orders", {"data": "not json either"}).decode()
    row = page.locator('section.dlq[data-stream="orders"] tbody tr').filter(has_text=later)
    expect(row.locator(".reason")).not_to_have_text("—", timeout=15_000)
    assert page.evaluate("window.__notReloaded") is True
    expect(page.locator("#action-notice")).to_have_text(
        "Replayed 1 dead letter(s) to their stream."
    )
    client.close()


def test_flow_page_shows_streams_groups_and_consumers_live(page: Page) -> None:
    page.goto("/flow")
    expect(page.locator("#live-status")).to_have_text("live")
    orders = page.locator('section.stream[data-stream="orders"]')
    expect(orders.locator("dd.length")).not_to_have_text("0")
    group = orders.locator('tr[data-group="email-service"]')
    expect(group.locator(".consumer")).to_have_count(1)
    events = page.locator('section.stream[data-stream="email-events"]')
    expect(events.locator('tr[data-group="order-service"]')).to_have_count(1)
    shot(page, "flow")


def test_inbox_table_re_renders_live(page: Page) -> None:
    page.goto("/inbox")
    expect(page.locator("#live-status")).to_have_text("live")
    page.evaluate("window.__notReloaded = true")
    created = page.request.post(
        "/orders", data={"email": "dora@example.com", "total": "3", "items": [{"name": "cup"}]}
    )
    assert created.status == 201

    expect(page.locator("table.inbox td.to").filter(has_text="dora@example.com")).to_have_count(
        1, timeout=20_000
    )
    assert page.evaluate("window.__notReloaded") is True
    expect(page.locator("#live-notice")).to_be_hidden()


def test_flow_charts_update_when_entries_arrive(page: Page, stack: Stack) -> None:
    page.goto("/flow")
    expect(page.locator("#live-status")).to_have_text("live")
    orders = page.locator('section.stream[data-stream="orders"]')
    rate = orders.locator('figure[data-chart="rate"] polyline')
    lag = orders.locator('figure[data-chart="lag"] polyline[data-series="email-service"]')
    expect(lag).to_have_count(1)
    expect(orders.locator('figure[data-chart="pending"] polyline')).to_have_count(1)
    # A point per snapshot: the chart grows while the page is open.
    expect(rate).not_to_have_attribute("data-samples", "0")
    samples = int(rate.get_attribute("data-samples") or 0)
    expect(rate).not_to_have_attribute("data-samples", str(samples), timeout=10_000)

    client = stack.redis()
    for _ in range(100):
        # Entries the email workers acknowledge without work (another event type).
        client.xadd("orders", {"ce_type": "not.ours", "data": "{}"})
    client.close()
    # The rate line rises with them (100 entries within its 10 s window: over 5/s; the
    # orders placed by the other tests were a handful).
    poll_until(
        lambda: float(rate.get_attribute("data-last") or 0) > 5, 15, what="the rate chart rising"
    )
    points = (rate.get_attribute("points") or "").split()
    assert len(points) >= 2
    shot(page, "flow-charts")


def test_a_state_change_without_the_csrf_token_is_refused(page: Page) -> None:
    page.goto("/")
    before = page.locator("#orders-body tr").count()
    page.evaluate("document.querySelector('input[name=csrf_token]').remove()")
    page.fill("#email", "mallory@example.com")
    page.fill("#total", "9.99")
    with page.expect_response("**/console/orders") as answer:
        page.click("#order-form button[type=submit]")
    assert answer.value.status == 403
    expect(page.locator("#refusal-title")).to_have_text("Refused: the CSRF check failed")
    shot(page, "csrf-refused")

    forged = page.request.post(
        "/dead-letters/action",
        form={"stream": "orders", "action": "purge-all", "confirmed": "yes", "up_to": "0-1"},
    )
    assert forged.status == 403
    page.goto("/")
    assert page.locator("#orders-body tr").count() == before
    expect(page.locator("#orders-body")).not_to_contain_text("mallory@example.com")


def test_validation_errors_are_shown_at_the_field(page: Page) -> None:
    page.goto("/")
    page.fill("#email", "nobody")
    page.fill("#total", "12.345")
    page.click("#order-form button[type=submit]")
    expect(page.locator("#error-email")).to_contain_text("not a valid email address")
    expect(page.locator("#error-total")).to_contain_text("2 decimals")
    expect(page.locator("#email")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#email")).to_have_value("nobody")
    shot(page, "orders-invalid")


def test_events_page_renders_the_catalogue_and_counts_live(page: Page, stack: Stack) -> None:
    page.goto("/events")
    expect(page.locator("#live-status")).to_have_text("live")
    v2 = page.locator("#message-orderCreatedV2")
    expect(v2).to_contain_text("ce_dataschema: urn:orderflow:schema:order.created:2")
    expect(v2.locator("pre").first).to_contain_text('"unit_price"')
    body = {
        "customer": {"email": "dora@example.com", "name": "Dora"},
        "lines": [{"name": "Map", "quantity": 2, "unit_price": "3.50"}],
        "total": "7.00",
    }
    client = stack.redis()
    before = client.xlen("orders")
    assert page.request.post("/orders", data=body).status == 201
    poll_until(lambda: client.xlen("orders") > before, 20, what="the order on the stream")
    length = client.xlen("orders")
    client.close()
    # The count follows the stream without a reload (the console's live ticks).
    for count in page.locator('[data-count-stream="orders"]').all():
        expect(count).to_have_text(str(length))
    shot(page, "events")
