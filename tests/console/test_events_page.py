"""The Events page: the catalogue for people, counts per stream, versions in flight."""

from __future__ import annotations

import orjson
import redis.asyncio as aioredis

from orderflow.console.events import code_spans
from orderflow.contracts import MESSAGES

from .conftest import Console
from .test_pages import assert_secure

V2 = "urn:orderflow:schema:order.created:2"


async def test_events_page_shows_the_catalogue(console: Console) -> None:
    response = await console.client.get("/events")

    assert response.status_code == 200, response.text
    assert_secure(response.headers)
    assert "<script>" not in response.text
    assert 'href="/events" aria-current="page"' in response.text
    page = response.text
    for address in ("orders", "orders:dlq", "email-events", "{partition}"):
        assert f"<code>{address}</code>" in page
    for spec in MESSAGES:
        assert f'id="message-{spec.key}"' in page
    assert f"ce_dataschema: {V2}" in page
    # Schemas and examples, escaped as text.
    assert "&#34;unit_price&#34;" in page or "&quot;unit_price&quot;" in page
    assert "email-service</strong> receives from <code>orders</code>" in page
    assert "order-service</strong> sends to <code>orders</code>" in page
    # No asset from outside the package.
    assert "http://" not in page.replace('href="http://orders.test', "")
    assert "https://" not in page


async def test_events_page_counts_streams_and_versions_in_flight(
    console: Console, aredis: aioredis.Redis
) -> None:
    data = orjson.dumps({"id": 1, "email": "a@example.com", "total": 1})
    await aredis.xadd("orders", {"data": data})
    await aredis.xadd("orders", {"data": data})
    await aredis.xadd("orders", {"data": data, "ce_dataschema": V2})
    await aredis.xadd("orders", {"data": data, "ce_dataschema": "nonsense"})
    await aredis.xadd("orders:dlq", {"data": data, "dlq_reason": "x"})

    page = (await console.client.get("/events")).text

    assert '<span data-count-stream="orders">4</span>' in page
    assert '<span data-count-dead="orders">1</span>' in page
    assert '<li data-version="order.created v1">order.created v1: 2</li>' in page
    assert '<li data-version="order.created v2">order.created v2: 1</li>' in page
    assert "order.created unsupported: 1" in page


async def test_console_script_updates_the_counts_live(console: Console) -> None:
    script = (await console.client.get("/console/static/console.js")).text
    assert '"events"' in script
    assert "data-count-stream" in script or "countStream" in script


def test_code_spans_are_escaped_first() -> None:
    assert code_spans("stream `a<b>` & `c`") == (
        "stream <code>a&lt;b&gt;</code> &amp; <code>c</code>"
    )
