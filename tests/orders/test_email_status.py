"""Email status: email.sent / email.failed events on email-events reach GET /orders/{id}."""

from __future__ import annotations

from typing import Any

from orderflow.bus import Message, StreamPublisher, StreamWorker
from orderflow.config import Settings
from orderflow.orders import EmailStatusConsumer
from tests.support import wait_until

from .conftest import Api, order_body, running_api


def email_event(kind: str, order_id: Any, **extra: Any) -> Message:
    """An event as the Email Service publishes it."""
    data = {"order_id": order_id, "email": "buyer1@example.com", **extra}
    return Message.event(f"email.{kind}", data, source="orderflow/email")


async def test_email_sent_event_shows_on_the_order(settings: Settings, aredis: Any) -> None:
    async with running_api(settings, run_email_status=True) as api:
        created = await api.post(order_body(id=101))
        assert created.status_code == 201
        await StreamPublisher(aredis).publish(
            "email-events",
            email_event(
                "sent", 101, message_id="<order-101@orderflow>", at="2026-01-02T03:04:05+00:00"
            ),
        )

        async def status() -> str:
            return str((await api.client.get("/orders/101")).json()["email_status"])

        await wait_until(lambda: _is(status, "sent"))
        order = (await api.client.get("/orders/101")).json()
        assert order["email_status_at"] == "2026-01-02T03:04:05+00:00"
        assert order["email_message_id"] == "<order-101@orderflow>"


async def _is(status: Any, expected: str) -> bool:
    return bool(await status() == expected)


async def _drain(api: Api, aredis: Any, *events: Message) -> StreamWorker:
    for event in events:
        await StreamPublisher(aredis).publish("email-events", event)
    consumer = EmailStatusConsumer(api.runtime.store).worker(
        aredis, api.runtime.settings, block_ms=10
    )
    await consumer.run(burst=True)
    return consumer


async def test_failed_then_sent_ends_sent_and_sent_is_final(api: Api, aredis: Any) -> None:
    assert (await api.post(order_body(id=7))).status_code == 201

    await _drain(api, aredis, email_event("failed", 7, reason="SMTP 451 try later"))
    order = (await api.client.get("/orders/7")).json()
    assert order["email_status"] == "failed"
    assert order["email_reason"] == "SMTP 451 try later"

    await _drain(api, aredis, email_event("sent", 7, at="2026-01-01T00:00:00+00:00"))
    await _drain(api, aredis, email_event("failed", 7, reason="late duplicate"))
    order = (await api.client.get("/orders/7")).json()
    assert order["email_status"] == "sent"
    assert order["email_status_at"] == "2026-01-01T00:00:00+00:00"
    assert order["email_reason"] is None


async def test_bad_and_foreign_events_are_handled(api: Api, aredis: Any) -> None:
    assert (await api.post(order_body(id=8))).status_code == 201

    worker = await _drain(
        api,
        aredis,
        email_event("sent", "not-a-number"),  # poison: dead-lettered at once
        email_event("sent", 999),  # no such order: acknowledged and logged
        Message.event("email.opened", {"order_id": 8}, source="elsewhere"),  # not ours
        email_event("sent", "8"),  # an id as a string is still the order's
    )

    assert worker.stats.dead_lettered == 1
    assert await aredis.xlen("email-events:dlq") == 1
    assert (await api.client.get("/orders/8")).json()["email_status"] == "sent"
    pending = await aredis.xpending("email-events", "order-service")
    assert pending["pending"] == 0
