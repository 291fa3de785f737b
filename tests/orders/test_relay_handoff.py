"""The in-process handoff (SQLite): the rows an API commits go straight to its relay,
which publishes them without reading the outbox and removes them afterwards, several
at once; the outbox stays the source of truth."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import sqlalchemy as sa

from orderflow.bus import Message
from orderflow.config import Settings
from orderflow.orders import Database, OrderRequest, OrderStore, OutboxRelay, RelayConfig
from orderflow.orders import relay as relay_module
from orderflow.orders.outbox import OutboxRow
from tests.support import order_body, wait_until

from .conftest import running_api, stream_events

# Polls far apart: whatever is published within a test's waits came by the handoff (or
# the relay's one look at the outbox when it starts), not by a poll coming round.
IDLE_POLL = RelayConfig(min_poll_s=60.0, max_poll_s=60.0, lease_ttl_s=180.0)


def _request(n: int) -> OrderRequest:
    return OrderRequest.model_validate(order_body(n))


async def _xlen(client: aioredis.Redis) -> int:
    return int(await client.xlen("orders"))


async def test_committed_orders_are_published_without_reading_the_outbox_back(
    settings: Settings, aredis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_api(settings, run_relay=True, relay_config=IDLE_POLL) as api:
        runtime = api.runtime
        await runtime.relay.wait_started()
        assert (await api.post(order_body(0))).status_code == 201
        await wait_until(lambda: runtime.relay.stats.published == 1, what="the first order")
        reads: list[int] = []
        claim = runtime.store.claim

        def counted(limit: int) -> Any:
            reads.append(limit)
            return claim(limit)

        monkeypatch.setattr(runtime.store, "claim", counted)
        responses = [await api.post(order_body(n)) for n in range(1, 6)]
        assert [r.status_code for r in responses] == [201] * 5
        await wait_until(lambda: _length(aredis, 6), what="five more orders on the stream")
        events = await stream_events(aredis)
        assert [e["id"] for e in events[1:]] == [r.json()["id"] for r in responses]
        if runtime.db.is_sqlite:
            assert reads == []  # handed over: the outbox was not read
            # ... and removed from it once published, without another look at it.
            await wait_until(lambda: _outbox_is(api, 0), what="the outbox emptied")
            assert reads == []
        else:
            # PostgreSQL: relays of other processes may take the same rows; each
            # relay reads the outbox (row locks keep them apart).
            assert reads
            await wait_until(lambda: _outbox_is(api, 0), what="the outbox emptied")


async def test_rows_published_but_not_yet_removed_are_published_again_by_the_next_relay(
    tmp_path: Path, redis_url: str, aredis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A relay that dies after XADD and before the rows' removal: the outbox still holds
    # them, and whoever relays next publishes them again (at-least-once; the Email
    # Service's ledger keeps it to one email).
    from .conftest import make_settings

    settings = make_settings(f"sqlite:///{tmp_path}/orders.db", redis_url, tmp_path)
    config = RelayConfig(min_poll_s=60.0, max_poll_s=60.0, lease_ttl_s=180.0, settle_s=60.0)
    looks: list[int] = []
    async with running_api(settings, run_relay=True, relay_config=config) as api:
        store = api.runtime.store
        claim = store.claim

        def counted(limit: int) -> Any:
            looks.append(limit)
            return claim(limit)

        monkeypatch.setattr(store, "claim", counted)
        # Once the relay's first look at the (empty) outbox is done, orders are handed.
        await wait_until(lambda: bool(looks), what="the relay's first look")
        assert (await api.post(order_body(1))).status_code == 201
        await wait_until(lambda: _length(aredis, 1), what="the order on the stream")
        assert await _outbox_is(api, 1)  # published, not removed yet (settle_s)

        def unreachable(*_: Any) -> None:
            raise sa.exc.OperationalError("DELETE", {}, Exception("database is locked"))

        # The removal at shutdown fails, as a process killed at this point never tries.
        monkeypatch.setattr(store, "complete", unreachable)
    monkeypatch.undo()
    async with running_api(settings, run_relay=True, relay_config=config) as api:
        await wait_until(lambda: _length(aredis, 2), what="the order published again")
        await wait_until(lambda: _outbox_is(api, 0), what="the outbox emptied")
    first, again = await stream_events(aredis)
    assert first == again
    assert looks == [IDLE_POLL.batch_size]


async def test_a_look_at_the_outbox_takes_handed_rows_with_it_and_publishes_them_once(
    tmp_path: Path, aredis: aioredis.Redis
) -> None:
    db = Database(f"sqlite:///{tmp_path}/orders.db")
    db.migrate()
    store = OrderStore(db, stream="orders")
    relay = OutboxRelay(store, aredis, config=IDLE_POLL)
    try:
        added: list[OutboxRow] = []
        await db.run(store.create_many, [(_request(n), None) for n in range(3)], added=added)
        assert [row.order_id for row in added] == [1, 2, 3]
        # The rows handed over are the rows stored, as a look at the outbox reads them.
        assert added == (await db.run(store.claim, 10)).rows
        # Handed over before the relay's first look at the outbox, which finds them too.
        relay.hand_over(added)
        task = asyncio.create_task(relay.run())
        await wait_until(lambda: relay.stats.published >= 3, what="the three orders")
        await wait_until(lambda: _backlog_empty(store), what="the outbox emptied")
        relay.stop()
        await task
        assert await _xlen(aredis) == 3
        assert relay.stats.published == 3
    finally:
        db.close()


@pytest.mark.parametrize(
    "error",
    [ConnectionError("Redis went away"), RuntimeError("a bug")],
    ids=["transient", "unexpected"],
)
async def test_a_failed_publish_leaves_handed_rows_to_the_outbox_in_their_order(
    tmp_path: Path, aredis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    db = Database(f"sqlite:///{tmp_path}/orders.db")
    db.migrate()
    store = OrderStore(db, stream="orders")
    relay = OutboxRelay(store, aredis, config=replace(IDLE_POLL, retry_max_s=0.05))
    publish = relay._publisher.publish_many
    failures = [error]

    async def flaky(stream: str, messages: list[Any]) -> Any:
        if failures:
            raise failures.pop()
        return await publish(stream, messages)

    monkeypatch.setattr(relay._publisher, "publish_many", flaky)
    looks: list[int] = []
    claim = store.claim

    def counted(limit: int) -> Any:
        looks.append(limit)
        return claim(limit)

    monkeypatch.setattr(store, "claim", counted)
    task = asyncio.create_task(relay.run())
    try:
        # Its first look at the (empty) outbox done, the relay waits for handoffs.
        await wait_until(lambda: bool(looks), what="the relay's first look")
        for n in range(4):
            # One commit at a time, each handed over: the first publish fails.
            added: list[OutboxRow] = []
            await db.run(store.create_many, [(_request(n), None)], added=added)
            relay.hand_over(added)
        await wait_until(lambda: _length(aredis, 4), what="every order after the failure")
        await wait_until(lambda: _backlog_empty(store), what="the outbox emptied")
        assert [e["id"] for e in await stream_events(aredis)] == [1, 2, 3, 4]
        assert relay.stats.errors == 1
        assert len(looks) == 2  # the first one, and the one after the failure
    finally:
        relay.stop()
        await task
        db.close()


async def test_the_rows_handed_over_carry_the_traces_stored_and_postgres_hands_none(
    database_url: str,
) -> None:
    db = Database(database_url)
    try:
        await db.run(db.migrate)
        store = OrderStore(db, stream="orders")
        events = [Message.event("order.note", {"n": n}, source="test") for n in range(3)]
        traced = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
        added: list[OutboxRow] = []

        def enqueue() -> None:
            with db.write() as conn:
                now = datetime.now(UTC)
                outbox = store.outbox
                outbox.enqueue(conn, [(7, e) for e in events], now, [traced, None, {}], added=added)
                # Tracing off: no traces at all.
                outbox.enqueue(conn, [(8, events[0])], now, added=added)

        await db.run(enqueue)
        batch = await db.run(store.claim, 10)
        store.abandon(batch)
        stored = batch.rows
        assert [row.trace for row in stored] == [traced, None, None, None]
        if db.is_sqlite:
            # Handed over as a look at the outbox reads them: with their traces.
            assert added == stored
        else:
            # Relays of other processes may take them: each finds them in the outbox.
            assert added == []
    finally:
        db.close()


async def test_the_rows_handed_over_are_counted_per_batch_published(
    tmp_path: Path, aredis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = Database(f"sqlite:///{tmp_path}/orders.db")
    db.migrate()
    store = OrderStore(db, stream="orders")
    relay = OutboxRelay(store, aredis, config=IDLE_POLL)
    looks: list[int] = []
    claim = store.claim

    def counted(limit: int) -> Any:
        looks.append(limit)
        return claim(limit)

    monkeypatch.setattr(store, "claim", counted)
    task = asyncio.create_task(relay.run())
    try:
        await wait_until(lambda: bool(looks), what="the relay's first look")
        for batch, published in (([0], 1), ([1, 2], 3)):
            added: list[OutboxRow] = []
            await db.run(store.create_many, [(_request(n), None) for n in batch], added=added)
            relay.hand_over(added)
            await wait_until(lambda n=published: _length(aredis, n), what="the batch published")
        assert (relay.stats.published, relay.stats.batches) == (3, 2)
        assert looks == [IDLE_POLL.batch_size]  # all of them handed over
    finally:
        relay.stop()
        await task
        db.close()


async def test_rows_handed_over_before_the_first_look_go_out_after_older_rows(
    tmp_path: Path, aredis: aioredis.Redis
) -> None:
    db = Database(f"sqlite:///{tmp_path}/orders.db")
    db.migrate()
    store = OrderStore(db, stream="orders")
    relay = OutboxRelay(store, aredis, config=IDLE_POLL)
    # An order another process committed (not handed over), then one of this one's.
    await db.run(store.create_many, [(_request(0), None)])
    added: list[OutboxRow] = []
    await db.run(store.create_many, [(_request(1), None)], added=added)
    relay.hand_over(added)
    task = asyncio.create_task(relay.run())
    try:
        await wait_until(lambda: _length(aredis, 2), what="both orders")
        assert [e["id"] for e in await stream_events(aredis)] == [1, 2]
    finally:
        relay.stop()
        await task
        db.close()


async def test_a_failed_removal_is_tried_again_and_its_rows_are_not_published_again(
    tmp_path: Path, aredis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = Database(f"sqlite:///{tmp_path}/orders.db")
    db.migrate()
    store = OrderStore(db, stream="orders")
    relay = OutboxRelay(store, aredis, config=replace(IDLE_POLL, retry_max_s=0.05))
    looks: list[int] = []
    claim, complete = store.claim, store.complete
    failures = [sa.exc.OperationalError("DELETE", {}, Exception("database is locked"))]

    def counted(limit: int) -> Any:
        looks.append(limit)
        return claim(limit)

    def flaky(batch: Any) -> None:
        if failures:
            raise failures.pop()
        complete(batch)

    monkeypatch.setattr(store, "claim", counted)
    monkeypatch.setattr(store, "complete", flaky)
    task = asyncio.create_task(relay.run())
    try:
        await wait_until(lambda: bool(looks), what="the relay's first look")
        added: list[OutboxRow] = []
        await db.run(store.create_many, [(_request(0), None)], added=added)
        relay.hand_over(added)
        await wait_until(lambda: relay.stats.errors == 1, what="the failed removal")
        await wait_until(lambda: _backlog_empty(store), what="the outbox emptied")
        # Removed before the look that follows a failure: not published again.
        assert len(looks) == 2
        assert await _xlen(aredis) == 1
        assert relay.stats.published == 1
    finally:
        relay.stop()
        await task
        db.close()


class _Script:
    """``asyncio`` and ``time`` for the relay module: a clock held by the test, and a
    ``wait_for`` that records each wait of the relay's loop (its timeout, and what the
    outbox and the stream held then) and runs the test's next step instead of waiting:
    a step moves the clock and returns True if it woke the relay (else the wait timed
    out)."""

    def __init__(self, relay: OutboxRelay, aredis: aioredis.Redis, looks: list[int]) -> None:
        self.relay = relay
        self.aredis = aredis
        self.looks = looks
        self.clock = 0.0  # an arbitrary reference, as time.monotonic's
        self.steps: list[Callable[[], Awaitable[bool]]] = []
        self.seen: list[tuple[float, int, int, int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    def monotonic(self) -> float:
        return self.clock

    def time(self) -> float:
        return time.time()

    async def wait_for(self, awaitable: Any, timeout: float) -> None:
        awaitable.close()
        store = self.relay.store
        backlog = await store.db.run(store.backlog)
        self.seen.append((timeout, len(self.looks), backlog, await _xlen(self.aredis)))
        if not self.steps:
            self.relay.stop()
        elif await self.steps.pop(0)():
            return
        raise TimeoutError


async def test_the_loop_publishes_handed_rows_at_once_removes_them_settled_and_keeps_its_polls(
    tmp_path: Path, aredis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = Database(f"sqlite:///{tmp_path}/orders.db")
    db.migrate()
    store = OrderStore(db, stream="orders")
    config = RelayConfig(min_poll_s=1.0, max_poll_s=8.0, lease_ttl_s=60.0, settle_s=0.25)
    relay = OutboxRelay(store, aredis, config=config)
    looks: list[int] = []
    claim = store.claim

    def counted(limit: int) -> Any:
        looks.append(limit)
        return claim(limit)

    monkeypatch.setattr(store, "claim", counted)
    script = _Script(relay, aredis, looks)
    orders = iter(range(100))

    async def commit(count: int, *, hand: bool) -> None:
        added: list[OutboxRow] = []
        requests = [(_request(next(orders)), None) for _ in range(count)]
        await db.run(store.create_many, requests, added=added)
        if hand:
            relay.hand_over(added)

    async def at(clock: float, count: int = 0, *, hand: bool = True, notify: bool = False) -> bool:
        script.clock = clock
        if count:
            await commit(count, hand=hand)
        if notify:
            relay.notify()
        return bool(count or notify)  # woken, or the wait timed out

    script.steps = [
        # 1. Woken at 1.0 by two rows handed over.
        lambda: at(1.0, 2),
        # 2. The wait for them to settle (0.25) times out.
        lambda: at(1.25),
        # 3. The rest of the poll interval (0.75) times out.
        lambda: at(2.0),
        # 4. A row handed over and a notify (the reconciler) at 3.0: the look at the
        #    outbox finds only the handed row, which does not count as work found.
        lambda: at(3.0, 1, notify=True),
        # 5. A row no one handed over, and a notify, at 4.0: work found.
        lambda: at(4.0, 1, hand=False, notify=True),
        # 6. A row handed over at 4.5, and (7.) a notify while it settles.
        lambda: at(4.5, 1),
        lambda: at(4.625, notify=True),
        # 8. A row handed over at 5.0; then the relay stops while it settles.
        lambda: at(5.0, 1),
    ]
    monkeypatch.setattr(relay_module, "asyncio", script)
    monkeypatch.setattr(relay_module, "time", script)
    try:
        await relay.run()
        backlog = await db.run(store.backlog)
    finally:
        db.close()
    # Each wait of the loop: its timeout, looks at the outbox so far, rows in the outbox,
    # entries on the stream.
    assert script.seen == [
        # The first look at 0 (empty): the poll doubles from min_poll_s, to 2.0.
        (2.0, 1, 0, 0),
        # The two rows published at once, without a look; the wait is the settling.
        (0.25, 1, 2, 2),
        # Settled: removed (one transaction), then the rest of the poll interval.
        (0.75, 1, 0, 2),
        # At 2.0 the poll interval is over: a look (nothing found), the poll 4.0.
        (4.0, 2, 0, 2),
        # The notify's look publishes the handed row with it: nothing else found, 8.0.
        (8.0, 3, 0, 3),
        # The look after the second notify found a row: min_poll_s again.
        (1.0, 4, 0, 4),
        # The row handed at 4.5 published at once, waiting to settle ...
        (0.25, 4, 1, 5),
        # ... removed before the notify's look, which does not publish it again.
        (2.0, 5, 0, 5),
        # The row handed at 5.0 published at once; waiting to settle when stopped.
        (0.25, 5, 1, 6),
    ]
    assert backlog == 0  # ... and removed when the relay stopped
    assert (relay.stats.published, relay.stats.batches) == (6, 5)


async def test_handed_rows_go_out_a_batch_at_a_time_and_a_batch_published_is_removed_at_once(
    tmp_path: Path, aredis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = Database(f"sqlite:///{tmp_path}/orders.db")
    db.migrate()
    store = OrderStore(db, stream="orders")
    config = RelayConfig(
        batch_size=2, min_poll_s=1.0, max_poll_s=8.0, lease_ttl_s=60.0, settle_s=0.25
    )
    relay = OutboxRelay(store, aredis, config=config)
    looks: list[int] = []
    claim = store.claim

    def counted(limit: int) -> Any:
        looks.append(limit)
        return claim(limit)

    monkeypatch.setattr(store, "claim", counted)
    script = _Script(relay, aredis, looks)

    orders = iter(range(100))

    async def handed(clock: float, *, notify: bool = False) -> bool:
        script.clock = clock
        added: list[OutboxRow] = []
        requests = [(_request(next(orders)), None) for _ in range(3)]
        await db.run(store.create_many, requests, added=added)
        relay.hand_over(added)
        if notify:
            relay.notify()
        return True

    # Three rows handed over at 1.0; three more at 1.25 with a notify (the reconciler);
    # then the relay stops at its next wait.
    script.steps = [lambda: handed(1.0), lambda: handed(1.25, notify=True)]
    monkeypatch.setattr(relay_module, "asyncio", script)
    monkeypatch.setattr(relay_module, "time", script)
    try:
        await relay.run()
        backlog = await db.run(store.backlog)
    finally:
        db.close()
    assert script.seen == [
        (2.0, 1, 0, 0),
        # Two batches without a wait in between; the first, a whole batch, removed at
        # once; the second waits to settle.
        (0.25, 1, 1, 3),
        # The notify's look: two batches of handed rows, neither counted as work found
        # (the poll doubles).
        (4.0, 3, 0, 6),
    ]
    assert backlog == 0
    assert (relay.stats.published, relay.stats.batches) == (6, 4)
    assert [e["id"] for e in await stream_events(aredis)] == [1, 2, 3, 4, 5, 6]


async def _length(client: aioredis.Redis, n: int) -> bool:
    return await _xlen(client) >= n


async def _backlog_empty(store: OrderStore) -> bool:
    return await store.db.run(store.backlog) == 0


async def _outbox_is(api: Any, n: int) -> bool:
    return bool((await api.counts())["outbox"] == n)
