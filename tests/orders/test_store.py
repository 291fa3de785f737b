"""The store's group commit: a batch behaves exactly like its requests one by one."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from orderflow.orders import OrderConflict, OrderRequest, OrderStore
from orderflow.orders.repository import CreateResult
from tests.support import order_body

from .conftest import Api, stream_events


def _request(n: int, **overrides: Any) -> OrderRequest:
    return OrderRequest.model_validate(order_body(n, **overrides))


async def test_a_batch_mixes_new_orders_replays_and_conflicts(
    api: Api, aredis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    store: OrderStore = api.runtime.store
    for n, order_id, key in [(1, 10, "old-key"), (2, 20, None), (3, 30, None), (5, 50, None)]:
        await store.db.run(store.create, _request(n, id=order_id), idempotency_key=key)
    await store.db.run(store.create, _request(6, id=60), idempotency_key="used-key")
    assert await api.runtime.relay.publish_pending() == 5
    bulk_calls = []
    bulk = store._create_bulk

    def spy(requests: Any, *rest: Any) -> Any:
        bulk_calls.append(len(requests))
        return bulk(requests, *rest)

    monkeypatch.setattr(store, "_create_bulk", spy)

    # Keys and ids all distinct within the batch: the set-wise path.
    batch = [
        (_request(3), "new-key"),  # new, assigned id
        (_request(1, id=10), "old-key"),  # replay by key
        (_request(2, id=20), None),  # replay by client id
        (_request(3, id=30, total="1.00"), None),  # same id, other body
        (_request(9), "used-key"),  # same key, other body
        (_request(4, id=40), "key-40"),  # new, chosen id
        (_request(5, id=50), "late-key"),  # replay by id, remembering a new key
    ]
    results = await store.db.run(store.create_many, batch)

    assert bulk_calls == [7]
    created = [r for r in results if isinstance(r, CreateResult) and r.created]
    replayed = [r for r in results if isinstance(r, CreateResult) and not r.created]
    assert [r.order.id for r in created] == [results[0].order.id, 40]
    assert [r.order.id for r in replayed] == [10, 20, 50]
    assert isinstance(results[3], OrderConflict)
    assert isinstance(results[4], OrderConflict)
    assert replayed[2].order.email == "buyer5@example.com"

    # Exactly the two new orders got events; the new keys replay from now on.
    assert await api.runtime.relay.publish_pending() == 2
    ids = [event["id"] for event in await stream_events(aredis)]
    assert ids[5:] == [created[0].order.id, 40]
    for request, key in [(_request(5, id=50), "late-key"), (_request(4, id=40), "key-40")]:
        again = await store.db.run(store.create, request, idempotency_key=key)
        assert not again.created


async def test_repeats_within_one_batch_are_one_order(api: Api) -> None:
    store: OrderStore = api.runtime.store
    batch = [
        (_request(1, id=10), "k"),
        (_request(1, id=10), "k"),
        (_request(1, id=10, total="2.00"), None),
        (_request(2), "k"),
    ]
    results = await store.db.run(store.create_many, batch)

    first, second, conflict_by_id, conflict_by_key = results
    assert isinstance(first, CreateResult)
    assert first.created
    assert isinstance(second, CreateResult)
    assert not second.created
    assert second.order == first.order
    assert isinstance(conflict_by_id, OrderConflict)
    assert isinstance(conflict_by_key, OrderConflict)
    assert await api.counts() == {"orders": 1, "outbox": 1, "idempotency_keys": 1}


async def test_a_repeated_key_replays_the_order_its_batch_assigned(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One path for every batch: a key repeated inside it replays the order the batch
    # itself inserts (its id assigned there), in the same single transaction.
    store: OrderStore = api.runtime.store
    bulk_calls = []
    bulk = store._create_bulk

    def spy(requests: Any, *rest: Any) -> Any:
        bulk_calls.append(len(requests))
        return bulk(requests, *rest)

    monkeypatch.setattr(store, "_create_bulk", spy)
    batch = [(_request(1), "k"), (_request(2), None), (_request(1), "k"), (_request(3), "k")]
    results = await store.db.run(store.create_many, batch)

    assert bulk_calls == [4]  # no retry one by one: nothing conflicted in the database
    first, other, again, conflict = results
    assert isinstance(first, CreateResult)
    assert first.created
    assert isinstance(other, CreateResult)
    assert other.created
    assert isinstance(again, CreateResult)
    assert not again.created
    assert again.order == first.order
    assert isinstance(conflict, OrderConflict)
    assert await api.counts() == {"orders": 2, "outbox": 2, "idempotency_keys": 1}


async def test_concurrent_distinct_requests_share_transactions(api: Api, aredis: Any) -> None:
    bodies = [order_body(n, id=1000 + n) if n % 2 else order_body(n) for n in range(60)]

    responses = await asyncio.gather(
        *(api.post(body, key=f"key-{n}") for n, body in enumerate(bodies))
    )

    assert {r.status_code for r in responses} == {201}
    assert len({r.json()["id"] for r in responses}) == 60
    writer = api.runtime.writer
    assert writer.orders == 60
    assert writer.transactions < 60  # grouped: fewer commits than orders

    replays = await asyncio.gather(
        *(api.post(body, key=f"key-{n}") for n, body in enumerate(bodies))
    )
    assert [r.json()["id"] for r in replays] == [r.json()["id"] for r in responses]
    assert all(r.headers["idempotent-replayed"] == "true" for r in replays)
    assert await api.counts() == {"orders": 60, "outbox": 60, "idempotency_keys": 60}
    assert await api.runtime.relay.publish_pending() == 60
    assert await aredis.xlen("orders") == 60


async def test_hot_path_work_runs_on_the_loop_thread_on_sqlite_only(api: Api) -> None:
    db = api.runtime.db
    loop_thread = threading.get_ident()

    assert (await db.run_quick(threading.get_ident) == loop_thread) == db.is_sqlite
    assert await db.run(threading.get_ident) != loop_thread
    with pytest.raises(ZeroDivisionError):
        await db.run_quick(lambda: 1 / 0)


async def test_the_writer_and_the_relay_use_the_hot_path(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = api.runtime.db
    quick: list[str] = []
    run_quick = db.run_quick

    async def recorded(fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        quick.append(fn.__name__)
        return await run_quick(fn, *args, **kwargs)

    monkeypatch.setattr(db, "run_quick", recorded)
    assert (await api.post(order_body(1))).status_code == 201
    assert await api.runtime.relay.publish_pending() == 1
    assert quick == ["create_many", "claim", "complete"]
