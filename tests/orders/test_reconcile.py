"""Reconciliation republishes an order still pending after the configured time, only then."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from orderflow.orders import Reconciler
from orderflow.orders.schema import EMAIL_STATUS_SENT
from tests.support import order_body, wait_until

from .conftest import Api, make_settings, running_api, stream_events


async def test_republishes_only_after_the_configured_time(api: Api, aredis: Any) -> None:
    store = api.runtime.store
    reconciler = Reconciler(store, after_s=60)
    for order_id in (1, 2):
        assert (await api.post(order_body(order_id, id=order_id))).status_code == 201
    # Not yet published: nothing to reconcile, however long it waits in the outbox.
    assert await reconciler.reconcile_once(now=_later(3600)) == []

    assert await api.runtime.relay.publish_pending() == 2
    published_at = datetime.fromisoformat(
        (await api.client.get("/orders/1")).json()["last_published_at"]
    )
    await store.db.run(store.set_email_status, 2, EMAIL_STATUS_SENT, at=published_at)

    assert await reconciler.reconcile_once(now=published_at + timedelta(seconds=59)) == []
    assert await reconciler.reconcile_once(now=published_at + timedelta(seconds=61)) == [1]
    # Queued once: a second pass before the relay ran adds nothing.
    assert await reconciler.reconcile_once(now=published_at + timedelta(seconds=120)) == []

    assert await api.runtime.relay.publish_pending() == 1
    events = await stream_events(aredis)
    assert [e["id"] for e in events] == [1, 2, 1]
    assert events[2] == events[0]  # the same order again; a new event id
    entries = await aredis.xrange("orders")
    assert entries[0][1][b"ce_id"] != entries[2][1][b"ce_id"]
    order = (await api.client.get("/orders/1")).json()
    assert order["publish_count"] == 2


def _later(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


async def test_running_service_republishes_a_pending_order(
    database_url: str, redis_url: str, tmp_path: Any, aredis: Any
) -> None:
    settings = make_settings(database_url, redis_url, tmp_path, reconcile_after_s=0.4)
    async with running_api(settings, run_relay=True, run_reconciler=True) as api:
        assert (await api.post(order_body(id=5))).status_code == 201

        async def published_at() -> str | None:
            value = (await api.client.get("/orders/5")).json()["last_published_at"]
            return str(value) if value else None

        first = datetime.fromisoformat(await wait_until(published_at))

        async def republished() -> bool:
            return bool(await aredis.xlen("orders") >= 2)

        await wait_until(republished, timeout=5)
        order = (await api.client.get("/orders/5")).json()
        entries = await aredis.xrange("orders")
        second_time = datetime.fromisoformat(entries[1][1][b"ce_time"].decode())
        assert second_time - first >= timedelta(seconds=0.4)
        assert order["email_status"] == "pending"
