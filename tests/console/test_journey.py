"""The journey page: an order's path as a timeline, from what is stored."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson
import redis.asyncio as aioredis

from orderflow.bus.admin import DeadLetter
from orderflow.console.journey import Event, order_id_of, timeline
from orderflow.email.journey import DEAD_LETTERED, RETRIED, SENT, JourneyRecorder, Step
from orderflow.orders.journey import OutboxRow
from orderflow.orders.repository import StoredOrder

from .conftest import Console
from .test_pages import MARKUP, assert_secure

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def stored(**changes: object) -> StoredOrder:
    order = StoredOrder(
        id=42, email="a@b.c", total=Decimal("5.00"), currency="EUR", items=[], created_at=T0
    )
    return StoredOrder(**{**{f: getattr(order, f) for f in order.__slots__}, **changes})


def step(deliveries: int, outcome: str, *, entry: str = "1767323046000-0", **more: str) -> Step:
    at = (T0 + timedelta(seconds=deliveries)).isoformat()
    return Step(at, "worker-1", "orders", entry, deliveries, outcome, **more)


def kinds(events: list[Event]) -> list[str]:
    return [event.kind for event in events]


def test_a_retried_then_sent_order_reads_in_order() -> None:
    order = stored(email_status="sent", email_status_at=T0 + timedelta(seconds=9))
    steps = [
        step(1, RETRIED, reason="SendError: 451 try later"),
        step(2, SENT, message_id="<order-42@x>"),
    ]

    events = timeline(order, [], steps, [])

    assert kinds(events) == ["accepted", "committed", "published", "retried", "sent", "status-sent"]
    assert events[2].title == "Published as entry 1767323046000-0"
    assert "451" in events[3].detail
    assert "claimed after a crash" not in events[4].detail
    assert events[4].detail.endswith("Message-ID <order-42@x>")
    assert events[4].link == "/inbox/find?message_id=%3Corder-42%40x%3E"


def test_a_delivery_after_one_without_outcome_was_claimed_after_a_crash() -> None:
    events = timeline(stored(), [], [step(2, SENT, message_id="<m>")], [])

    (delivery,) = [e for e in events if e.kind == "sent"]
    assert delivery.detail.startswith("claimed after a crash")
    assert kinds(events)[-1] == "status-pending"


def test_waiting_outbox_rows_and_republishes_are_shown() -> None:
    waiting = [OutboxRow(7, "orders", "ev-1", T0)]
    order = stored(publish_count=2, last_published_at=T0 + timedelta(minutes=5))
    steps = [step(1, SENT, entry="1767323046000-0", message_id="<m>")]

    events = timeline(order, waiting, steps, [])

    assert "outbox" in kinds(events)
    published = [e for e in events if e.kind == "published"]
    assert [e.title for e in published] == [
        "Published as entry 1767323046000-0",
        "Published 2 time(s) in all, last at this time",
    ]


def test_dead_letters_name_their_order() -> None:
    def letter(data: str) -> DeadLetter:
        return DeadLetter(
            "9-0", "orders:dlq", "orders", "1-0", "g", "c", "r", 3, None, {"data": data}
        )

    assert order_id_of(letter(orjson.dumps({"id": 42}).decode())) == 42
    assert order_id_of(letter(orjson.dumps({"order_id": 7}).decode())) == 7
    assert order_id_of(letter("not json")) is None
    assert order_id_of(letter(orjson.dumps({"id": "42"}).decode())) is None
    assert order_id_of(letter("[1]")) is None


async def test_journey_page_shows_deliveries_and_dead_letters(
    console: Console, aredis: aioredis.Redis
) -> None:
    created = await console.client.post(
        "/orders", json={"email": "a@example.com", "total": "5.00", "items": [{"name": "mug"}]}
    )
    assert created.status_code == 201, created.text
    order_id = created.json()["id"]
    recorder = JourneyRecorder(aredis)
    recorder.note(
        order_id,
        consumer="worker-<b>1</b>",
        stream="orders",
        entry_id="1767323046000-0",
        deliveries=1,
        outcome=RETRIED,
        reason=MARKUP,
    )
    recorder.note(
        order_id,
        consumer="worker-2",
        stream="orders",
        entry_id="1767323046000-0",
        deliveries=2,
        outcome=DEAD_LETTERED,
        reason="550 no such user",
    )
    await recorder.close()
    await aredis.xadd(
        "orders:dlq",
        {
            "data": orjson.dumps({"id": order_id, "email": "a@example.com"}),
            "dlq_reason": "permanent failure: 550 no such user",
            "dlq_source_id": "1767323046000-0",
            "dlq_stream": "orders",
        },
    )

    response = await console.client.get(f"/journey/{order_id}")

    assert response.status_code == 200, response.text
    assert_secure(response.headers)
    page = response.text
    assert f"Order #{order_id}" in page
    assert 'data-kind="accepted"' in page
    # Not relayed in this test (no relay running): its outbox row is waiting.
    assert 'data-kind="outbox"' in page
    assert "Delivery 1 to worker-&lt;b&gt;1&lt;/b&gt;: failed, retried" in page
    assert "&lt;script&gt;" in page
    assert "<script>alert" not in page
    assert "Delivery 2 to worker-2: failed, dead-lettered" in page
    assert 'data-kind="dead-letter"' in page
    assert "Status recorded: pending" in page

    listing = (await console.client.get("/")).text
    assert f'href="/journey/{order_id}"' in listing
    letters = (await console.client.get("/dead-letters")).text
    assert f'href="/journey/{order_id}"' in letters


async def test_unknown_and_malformed_order_ids_are_refused(console: Console) -> None:
    missing = await console.client.get("/journey/999999")
    malformed = await console.client.get("/journey/abc")
    huge = await console.client.get("/journey/" + "9" * 30)

    assert missing.status_code == 404
    assert "There is no order #999999." in missing.text
    assert malformed.status_code == 400
    assert huge.status_code == 400
