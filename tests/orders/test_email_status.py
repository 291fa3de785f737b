"""Email status: email.sent / email.failed events on email-events reach GET /orders/{id}."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from orderflow.bus import Message, StreamPublisher, StreamWorker
from orderflow.config import Settings
from orderflow.orders import EmailStatusConsumer
from tests.support import order_body, wait_until

from .conftest import Api, running_api


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


async def _statuses(api: Api, *ids: int) -> dict[int, str]:
    return {i: (await api.client.get(f"/orders/{i}")).json()["email_status"] for i in ids}


async def test_a_batch_of_events_is_one_transaction_applied_in_order(api: Api, aredis: Any) -> None:
    for order_id in (21, 22, 23):
        assert (await api.post(order_body(id=order_id))).status_code == 201
    events = [
        email_event("failed", 21, reason="451"),
        email_event("sent", 21, at="2026-01-01T00:00:00+00:00"),  # sent after failed: sent
        email_event("sent", 22),
        email_event("failed", 22, reason="late"),  # failed after sent: still sent
        email_event("failed", 23, reason="550 no such user"),
        email_event("sent", 999),  # unknown order: acknowledged
    ]
    for event in events:
        await StreamPublisher(aredis).publish("email-events", event)
    # The batch is written when full: all six events, one transaction.
    consumer = EmailStatusConsumer(api.runtime.store, max_batch=len(events), linger_s=30)
    calls: list[int] = []
    store = api.runtime.store
    original = store.set_email_statuses

    def spy(updates: Any) -> list[str]:
        calls.append(len(updates))
        return original(updates)

    store.set_email_statuses = spy  # type: ignore[method-assign]
    worker = consumer.worker(aredis, api.runtime.settings, block_ms=10)
    await worker.run(burst=True)

    assert calls == [6]
    assert consumer.transactions == 1
    assert worker.stats.handled == 6
    assert await _statuses(api, 21, 22, 23) == {21: "sent", 22: "sent", 23: "failed"}
    assert (await api.client.get("/orders/22")).json()["email_reason"] is None
    assert (await aredis.xpending("email-events", "order-service"))["pending"] == 0


async def test_events_are_acknowledged_only_after_their_commit(api: Api, aredis: Any) -> None:
    for order_id in (31, 32):
        assert (await api.post(order_body(id=order_id))).status_code == 201
    store = api.runtime.store
    original = store.set_email_statuses
    entered = threading.Event()
    release = threading.Event()
    failures = [RuntimeError("disk I/O error")]

    def held(updates: Any) -> list[str]:
        entered.set()
        assert release.wait(30)
        if failures:
            raise failures.pop()
        return original(updates)

    store.set_email_statuses = held  # type: ignore[method-assign]
    for order_id in (31, 32):
        await StreamPublisher(aredis).publish("email-events", email_event("sent", order_id))
    consumer = EmailStatusConsumer(store, max_batch=2, linger_s=30)
    worker = consumer.worker(aredis, api.runtime.settings, block_ms=10, retry_base_ms=10)
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(entered.is_set, what="the batch's transaction to start")
        # Handed over but not committed: nothing is acknowledged.
        assert (await aredis.xpending("email-events", "order-service"))["pending"] == 2
        release.set()
        # The first transaction fails: retried through the bus, then stored and acked.
        await wait_until(
            lambda: _is_pending(aredis, 0), what="both events acknowledged after the commit"
        )
        assert await _statuses(api, 31, 32) == {31: "sent", 32: "sent"}
        assert worker.stats.retried == 2
    finally:
        release.set()
        worker.stop()
        await task


async def _is_pending(aredis: Any, count: int) -> bool:
    return bool((await aredis.xpending("email-events", "order-service"))["pending"] == count)


async def test_the_status_worker_takes_the_retry_settings(api: Api, aredis: Any) -> None:
    settings = api.runtime.settings.model_copy(update={"retry_base_ms": 7, "retry_max_ms": 90})
    worker = EmailStatusConsumer(api.runtime.store).worker(aredis, settings)
    assert (worker.config.retry_base_ms, worker.config.retry_max_ms) == (7, 90)
    assert worker.config.max_deliveries == settings.max_deliveries
