"""The outbox relay: prompt, ordered, surviving Redis outages, safe with several relays."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
import sqlalchemy as sa

from orderflow.bus import PubSubSubscriber, connect
from orderflow.bus.message import Message
from orderflow.config import Settings
from orderflow.embedded.redis_server import RedisServer
from orderflow.orders import Database, OrderRequest, OrderStore, OutboxRelay, RelayConfig
from orderflow.orders import relay as relay_module
from orderflow.orders.outbox import NOTIFY_CHANNEL
from tests.support import order_body, wait_until

from .conftest import make_settings, running_api, stream_events

# An idle poll far longer than any wait below: an event published within the wait was
# published because the relay was woken, not because a poll came round.
IDLE_POLL = RelayConfig(min_poll_s=60.0, max_poll_s=60.0, lease_ttl_s=180.0)


async def test_relay_publishes_promptly_after_a_commit(settings: Settings, aredis: Any) -> None:
    async with running_api(settings, run_relay=True, relay_config=IDLE_POLL) as api:
        relay = api.runtime.relay
        await relay.wait_started()
        # The first order may be found by the relay's first pass; once it is out, the
        # relay waits 60 s, and only the in-process wake-up can publish the second.
        assert (await api.post(order_body(1))).status_code == 201
        await wait_until(lambda: relay.stats.published == 1, what="the first order out")
        assert (await api.post(order_body(2))).status_code == 201
        await wait_until(lambda: _length_is(aredis, 2), timeout=10, what="a wake-up")


@pytest.mark.slow
@pytest.mark.chaos
async def test_orders_accepted_while_redis_is_down_are_published_in_order_after(
    database_url: str, redis_server: RedisServer, tmp_path: Any
) -> None:
    settings = make_settings(database_url, redis_server.url, tmp_path)
    config = RelayConfig(retry_max_s=0.3)
    async with running_api(settings, run_relay=True, relay_config=config) as api:
        first = await api.post(order_body(0))
        assert first.status_code == 201
        await wait_until(lambda: api.runtime.relay.stats.published == 1)
        redis_server.stop()

        created = []
        for n in range(1, 31):
            response = await api.post(order_body(n))
            assert response.status_code == 201
            created.append(response.json()["id"])
        await wait_until(lambda: api.runtime.relay.stats.errors > 0)
        assert (await api.counts())["outbox"] == 30

        redis_server.start()
        client = connect(redis_server.url)  # a fresh client: the old sockets died
        try:
            await wait_until(lambda: _length_is(client, 31), timeout=15)
            events = await stream_events(client)
        finally:
            await client.aclose()
        assert [event["id"] for event in events] == [first.json()["id"], *created]
        await wait_until(lambda: _outbox_empty(api.runtime.store))


async def _length_is(client: Any, n: int) -> bool:
    return bool(await client.xlen("orders") >= n)


async def _outbox_empty(store: OrderStore) -> bool:
    return await store.db.run(store.backlog) == 0


def _fill(db: Database, count: int) -> list[int]:
    store = OrderStore(db, stream="orders")
    return [store.create(OrderRequest.model_validate(order_body(n))).order.id for n in range(count)]


async def test_two_relays_on_sqlite_take_turns_by_lease(tmp_path: Any, aredis: Any) -> None:
    db = Database(f"sqlite:///{tmp_path}/orders.db")
    try:
        await db.run(db.migrate)
        ids = await db.run(_fill, db, 300)
        config = RelayConfig(batch_size=20)
        relays = [
            OutboxRelay(OrderStore(db, stream="orders"), aredis, config=config, name=name)
            for name in ("a", "b")
        ]
        counts = await asyncio.gather(*(relay.publish_pending() for relay in relays))

        # One holds the lease and publishes all, in order; the other stands by.
        assert sorted(counts) == [0, 300]
        assert [e["id"] for e in await stream_events(aredis)] == ids
        leader = relays[0] if counts[0] else relays[1]
        standby = relays[1] if counts[0] else relays[0]
        assert not standby.is_leader
        await leader.close()  # gives the lease up: the other may take over at once
        await db.run(_fill, db, 1)
        assert await standby.publish_pending() == 1
        await standby.close()
    finally:
        db.close()


@pytest.mark.postgres
async def test_two_relays_on_postgres_lose_nothing(postgres_url: str, aredis: Any) -> None:
    db = Database(postgres_url)
    try:
        await db.run(db.migrate)
        ids = await db.run(_fill, db, 400)
        config = RelayConfig(batch_size=10)
        relays = [
            OutboxRelay(OrderStore(db, stream="orders"), aredis, config=config, name=name)
            for name in ("a", "b")
        ]
        tasks = [asyncio.create_task(relay.run()) for relay in relays]
        try:
            await wait_until(lambda: _outbox_empty(relays[0].store), timeout=20)
        finally:
            for relay in relays:
                relay.stop()
            await asyncio.gather(*tasks)
        published = [e["id"] for e in await stream_events(aredis)]
        # Every event published, none twice: the batches were disjoint.
        assert sorted(published) == sorted(ids)
        assert sum(relay.stats.published for relay in relays) == 400
        assert all(relay.stats.batches > 0 for relay in relays), [r.stats for r in relays]
    finally:
        db.close()


async def test_pubsub_mode_also_publishes_the_order_on_the_channel(
    database_url: str, redis_url: str, tmp_path: Any, aredis: Any
) -> None:
    settings = make_settings(database_url, redis_url, tmp_path, transport="pubsub")
    received: list[Message] = []
    subscriber = PubSubSubscriber(aredis, "orders", _append(received))
    listening = asyncio.create_task(subscriber.run())
    try:
        await subscriber.wait_subscribed()
        async with running_api(settings, run_relay=True) as api:
            response = await api.post(order_body(id=101))
            assert response.status_code == 201
            await wait_until(lambda: received)
    finally:
        subscriber.stop()
        await listening
    assert dict(received[0].data) == {
        "id": 101,
        "email": "buyer1@example.com",
        "total": "100.00",
        "currency": "USD",
        "items": [],
        "created_at": response.json()["created_at"],
    }
    assert await aredis.xlen("orders") == 1  # the stream still gets it too


def _append(into: list[Message]) -> Any:
    async def handler(message: Message) -> None:
        into.append(message)

    return handler


@pytest.mark.postgres
async def test_relay_on_postgres_wakes_on_commits_of_other_processes(
    postgres_url: str, aredis: Any
) -> None:
    relay_db, writer_db = Database(postgres_url), Database(postgres_url)
    try:
        await relay_db.run(relay_db.migrate)
        await writer_db.run(_fill, writer_db, 1)
        relay = OutboxRelay(OrderStore(relay_db, stream="orders"), aredis, config=IDLE_POLL)
        task = asyncio.create_task(relay.run())
        try:
            # The first pass publishes the row already there; then the relay waits 60 s.
            await wait_until(lambda: relay.stats.published == 1, what="the first row out")
            await wait_until(
                lambda: writer_db.run(_listening, writer_db), what="the relay's LISTEN"
            )
            await writer_db.run(_fill, writer_db, 1)  # as another process would
            await wait_until(lambda: _length_is(aredis, 2), timeout=10, what="a NOTIFY wake-up")
        finally:
            relay.stop()
            await task
    finally:
        relay_db.close()
        writer_db.close()


def _listening(db: Database) -> bool:
    """True once a session of this database LISTENs on the outbox channel (as far as
    PostgreSQL shows it: the last statement of an idle session)."""
    with db.read() as conn:
        count = conn.execute(
            sa.text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query = :listen"
            ),
            {"listen": f"LISTEN {NOTIFY_CHANNEL}"},
        ).scalar_one()
    return bool(count)


async def _run_then_look(relay: OutboxRelay) -> list[asyncio.Task[Any]]:
    """Run ``relay``; then, before anything else runs, its listener tasks still going."""
    await relay.run()
    return _listener_tasks()


def _listener_tasks() -> list[asyncio.Task[Any]]:
    """The relay's LISTEN tasks not finished yet."""
    return [t for t in asyncio.all_tasks() if t.get_name() == "orderflow-relay-listen"]


def _listener_pids(db: Database) -> list[int]:
    """The server processes of the sessions LISTENing on the outbox channel."""
    with db.read() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT pid FROM pg_stat_activity"
                " WHERE datname = current_database() AND query = :listen"
            ),
            {"listen": f"LISTEN {NOTIFY_CHANNEL}"},
        ).all()
    return [row.pid for row in rows]


def _terminate(db: Database, pids: list[int]) -> None:
    with db.read() as conn:
        for pid in pids:
            conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})


@pytest.mark.postgres
async def test_relay_listens_again_after_its_listen_connection_is_cut(
    postgres_url: str, aredis: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="orderflow.orders.relay")
    relay_db, writer_db = Database(postgres_url), Database(postgres_url)
    try:
        await relay_db.run(relay_db.migrate)
        await writer_db.run(_fill, writer_db, 1)
        relay = OutboxRelay(OrderStore(relay_db, stream="orders"), aredis, config=IDLE_POLL)
        task = asyncio.create_task(_run_then_look(relay))
        try:
            # The first pass publishes the row already there; then the relay waits 60 s.
            await wait_until(lambda: relay.stats.published == 1, what="the first row out")
            first = await wait_until(
                lambda: writer_db.run(_listener_pids, writer_db), what="the relay's LISTEN"
            )
            await writer_db.run(_terminate, writer_db, first)

            async def listening_again() -> bool:
                pids = await writer_db.run(_listener_pids, writer_db)
                return bool(pids) and not set(pids) & set(first)

            await wait_until(listening_again, what="a new LISTEN session")
            failed = [
                m for m in caplog.messages if m.startswith("relay LISTEN connection failed: ")
            ]
            assert len(failed) == 1
            # Only a NOTIFY can wake the relay before its 60 s poll.
            await writer_db.run(_fill, writer_db, 1)
            await wait_until(lambda: _length_is(aredis, 2), what="a NOTIFY wake-up")
            # The listener runs as a task of its own, named for task dumps ...
            assert len(_listener_tasks()) == 1
        finally:
            relay.stop()
            left = await task
        # ... and is over (not merely cancelled) when run() returns.
        assert left == []
    finally:
        relay_db.close()
        writer_db.close()


class _ListenBackoff:
    """``asyncio`` for the relay module, in which the LISTEN loop's back-off waits (on
    the relay's stop event) are recorded and skipped instead of slept; once ``hold_after``
    of them were recorded, the last one waits for ``resume`` first. Other waits are
    asyncio's own."""

    def __init__(self, relay: OutboxRelay, hold_after: int) -> None:
        self.timeouts: list[float] = []
        self.held = asyncio.Event()
        self.resume = asyncio.Event()
        self._stopping = relay._stopping
        self._hold_after = hold_after

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    async def wait_for(self, awaitable: Any, timeout: float) -> Any:
        frame = getattr(awaitable, "cr_frame", None)
        if frame is None or frame.f_locals.get("self") is not self._stopping:
            return await asyncio.wait_for(awaitable, timeout)
        awaitable.close()
        self.timeouts.append(timeout)
        if len(self.timeouts) == self._hold_after:
            self.held.set()
            await self.resume.wait()
        raise TimeoutError


def _allow_connections(admin_url: str, url: str, allow: bool) -> None:
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            name = url.rsplit("/", 1)[1]
            conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {allow}'))
    finally:
        admin.dispose()


def _warm(db: Database, connections: int) -> None:
    """Open ``connections`` pooled connections and give them back (kept by the pool)."""
    with contextlib.ExitStack() as stack:
        for _ in range(connections):
            stack.enter_context(db.read())


@pytest.mark.postgres
async def test_relay_retries_listen_doubling_to_5_s_and_starts_again_after_a_success(
    postgres_admin_url: str,
    postgres_url: str,
    aredis: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("DEBUG", logger="orderflow.orders.relay")
    relay_db, writer_db = Database(postgres_url), Database(postgres_url)
    try:
        await relay_db.run(relay_db.migrate)
        await writer_db.run(_fill, writer_db, 1)
        # The relay's queries use pooled connections; a new one (LISTEN's) is refused.
        _warm(relay_db, 3)
        _warm(writer_db, 2)
        _allow_connections(postgres_admin_url, postgres_url, False)
        relay = OutboxRelay(OrderStore(relay_db, stream="orders"), aredis, config=IDLE_POLL)
        waits = _ListenBackoff(relay, hold_after=8)
        monkeypatch.setattr(relay_module, "asyncio", waits)
        task = asyncio.create_task(relay.run())
        try:
            await wait_until(lambda: relay.stats.published == 1, what="the first row out")
            await asyncio.wait_for(waits.held.wait(), 10)
            _allow_connections(postgres_admin_url, postgres_url, True)
            waits.resume.set()
            first = await wait_until(
                lambda: writer_db.run(_listener_pids, writer_db), what="the relay's LISTEN"
            )
            # A success starts the count again: the next failure waits the shortest.
            await writer_db.run(_terminate, writer_db, first)
            await wait_until(lambda: len(waits.timeouts) == 9, what="the failure after it")
            assert waits.timeouts == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0, 0.2])
            failed = [m for m in caplog.messages if m.startswith("relay LISTEN connection failed")]
            assert len(failed) == 9
            assert all("is not currently accepting connections" in m for m in failed[:8])
            assert "server closed the connection" in failed[8]
            await wait_until(
                lambda: writer_db.run(_listener_pids, writer_db), what="LISTEN once more"
            )
            await writer_db.run(_fill, writer_db, 1)
            await wait_until(lambda: _length_is(aredis, 2), what="a NOTIFY wake-up")
        finally:
            relay.stop()
            await task
            _allow_connections(postgres_admin_url, postgres_url, True)
    finally:
        relay_db.close()
        writer_db.close()


async def test_relay_listens_with_the_databases_password(
    aredis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The test server trusts every local connection, so a password left out of the
    # LISTEN connection would go unseen there: the URL it connects with is recorded.
    import psycopg

    db = Database("postgresql+psycopg://orderflow:s3cret@127.0.0.1:5432/orders")
    relay = OutboxRelay(OrderStore(db, stream="orders"), aredis)
    urls: list[str] = []

    async def connect(url: str, **_: Any) -> Any:
        urls.append(url)
        relay.stop()
        raise OSError("not connecting")

    monkeypatch.setattr(psycopg.AsyncConnection, "connect", connect)
    await relay._listen()
    assert urls == ["postgresql://orderflow:s3cret@127.0.0.1:5432/orders"]
    db.close()
