"""The relay's settings, its idle back-off between passes, giving the SQLite lease up on
close, and the PRODUCER spans it records (each test kills mutants the end-to-end relay
tests let live: see docs/MUTATION.md)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
import sqlalchemy as sa
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from orderflow import tracing
from orderflow.bus import Message, Retention
from orderflow.bus import tracing as bus_tracing
from orderflow.bus.partitions import PartitionLayout, resolve_layout
from orderflow.orders import Database, OrderRequest, OrderStore, OutboxRelay, RelayConfig
from orderflow.orders import relay as relay_module
from tests.support import order_body
from tests.support.wait import TimedOutWaits


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Database]:
    db = Database(f"sqlite:///{tmp_path}/orders.db")
    db.migrate()
    yield db
    db.close()


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"batch_size": 0}, "RelayConfig.batch_size must be at least 1, got 0"),
        ({"min_poll_s": 0.0}, "RelayConfig needs 0 < min_poll_s <= max_poll_s"),
        ({"min_poll_s": 0.6, "max_poll_s": 0.5}, "RelayConfig needs 0 < min_poll_s <= max_poll_s"),
        ({"lease_ttl_s": 1.0}, "RelayConfig.lease_ttl_s must exceed twice max_poll_s"),
        ({"retry_max_s": 0.0}, "RelayConfig.retry_max_s must be positive"),
        ({"settle_s": -0.001}, "RelayConfig.settle_s must not be negative"),
    ],
)
def test_a_relay_config_out_of_bounds_is_refused_naming_the_setting(
    options: dict[str, Any], error: str
) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(error)}$"):
        RelayConfig(**options)


def test_a_relay_config_at_its_bounds_is_accepted() -> None:
    config = RelayConfig(batch_size=1, min_poll_s=0.5, max_poll_s=0.5, lease_ttl_s=1.01)
    assert (config.batch_size, config.min_poll_s, config.max_poll_s) == (1, 0.5, 0.5)
    assert RelayConfig(retry_max_s=0.01).retry_max_s == 0.01
    assert RelayConfig(settle_s=0.0).settle_s == 0.0


async def test_an_idle_relay_doubles_its_wait_up_to_max_poll_and_resets_after_work(
    database: Database, aredis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    relay = OutboxRelay(
        OrderStore(database, stream="orders"),
        aredis,
        config=RelayConfig(min_poll_s=0.02, max_poll_s=0.5),
    )
    # What each pass published: six idle passes, one with work, two idle ones.
    outcomes = [0, 0, 0, 0, 0, 0, 3, 0, 0]

    async def publish_pending() -> int:
        published = outcomes.pop(0)
        if not outcomes:
            relay.stop()
        return published

    waits = TimedOutWaits()
    monkeypatch.setattr(relay, "publish_pending", publish_pending)
    monkeypatch.setattr(relay_module, "asyncio", waits)
    await relay.run()
    assert waits.timeouts == pytest.approx([0.04, 0.08, 0.16, 0.32, 0.5, 0.5, 0.02, 0.04, 0.08])


def _counting_releases(store: OrderStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    released: list[str] = []
    release = store.release_lease

    def counting(holder: str) -> None:
        released.append(holder)
        release(holder)

    monkeypatch.setattr(store, "release_lease", counting)
    return released


async def test_close_gives_the_sqlite_lease_up_once_and_only_when_held(
    database: Database, aredis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = OrderStore(database, stream="orders")
    released = _counting_releases(store, monkeypatch)
    relay = OutboxRelay(store, aredis, name="a")
    await relay.close()  # never held: nothing to give up
    assert released == []
    assert await relay.publish_pending() == 0  # takes the lease
    assert relay.is_leader
    await relay.close()
    await relay.close()
    assert released == ["a"]
    assert not relay.is_leader
    assert store.acquire_lease("b", 15.0)  # free at once, not after the TTL


async def test_close_shrugs_off_a_database_error_while_giving_the_lease_up(
    database: Database, aredis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = OrderStore(database, stream="orders")
    relay = OutboxRelay(store, aredis, name="a")
    assert await relay.publish_pending() == 0

    def broken(holder: str) -> None:
        raise sa.exc.OperationalError("UPDATE relay_lease", {}, Exception("disk I/O error"))

    monkeypatch.setattr(store, "release_lease", broken)
    await relay.close()
    assert not relay.is_leader


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    """Tracing on in this process, into memory (a provider of the test's own)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(bus_tracing, "enabled", bus_tracing.enabled)
    monkeypatch.setattr(bus_tracing, "_tracer", None)
    monkeypatch.setattr(tracing, "enabled", True)
    bus_tracing.activate(provider.get_tracer("test"))
    return exporter


def _fill(db: Database, count: int) -> None:
    store = OrderStore(db, stream="orders")
    for n in range(count):
        store.create(OrderRequest.model_validate(order_body(n)))


async def test_each_event_is_published_with_its_own_ended_producer_span(
    database: Database, aredis: aioredis.Redis, spans: InMemorySpanExporter
) -> None:
    await database.run(_fill, database, 2)
    store = OrderStore(database, stream="orders")
    pending = await database.run(store.claim, 10)
    store.abandon(pending)
    relay = OutboxRelay(store, aredis)
    assert await relay.publish_pending() == 2
    finished = spans.get_finished_spans()
    assert [(s.name, s.kind) for s in finished] == [("send orders", SpanKind.PRODUCER)] * 2
    entries: list[tuple[bytes, dict[bytes, bytes]]] = await aredis.xrange("orders")  # type: ignore[assignment]
    parents = [fields[b"traceparent"].decode() for _, fields in entries]
    # Each entry carries its own span's context (and the fields it had before).
    assert parents == [
        f"00-{s.context.trace_id:032x}-{s.context.span_id:016x}-{s.context.trace_flags:02x}"
        for s in finished
    ]
    # ... and the message it had: its id and data.
    assert [fields[b"ce_id"].decode() for _, fields in entries] == [
        row.message.id for row in pending.rows
    ]
    assert all(b"data" in fields for _, fields in entries)


async def test_a_failed_publish_ends_every_span_with_the_error(
    database: Database, aredis: aioredis.Redis, spans: InMemorySpanExporter
) -> None:
    await database.run(_fill, database, 2)
    await aredis.set("orders", "not a stream")  # XADD answers WRONGTYPE
    relay = OutboxRelay(OrderStore(database, stream="orders"), aredis)
    with pytest.raises(Exception, match="WRONGTYPE"):
        await relay.publish_pending()
    finished = spans.get_finished_spans()
    assert len(finished) == 2
    for span in finished:
        (event,) = span.events
        assert event.name == "exception"
        assert event.attributes is not None
        assert "WRONGTYPE" in str(event.attributes["exception.message"])
    assert await database.run(OrderStore(database, stream="orders").backlog) == 2


async def test_a_traced_event_without_an_order_goes_to_its_own_ids_partition(
    database: Database, aredis: aioredis.Redis, spans: InMemorySpanExporter
) -> None:
    store = OrderStore(database, stream="orders")
    events = [Message.event("order.note", {"n": n}, source="test") for n in range(4)]

    def enqueue() -> None:
        with database.write() as conn:
            store.outbox.enqueue(conn, [(None, event) for event in events], datetime.now(UTC))

    await database.run(enqueue)
    relay = OutboxRelay(store, aredis, partitions=4)
    assert await relay.publish_pending() == 4
    layout = PartitionLayout("orders", 4)
    for event in events:
        entries = await aredis.xrange(layout.for_key(event.id))
        assert event.id.encode() in [fields[b"ce_id"] for _, fields in entries]


async def test_a_producer_span_continues_its_requests_trace_and_names_the_message(
    database: Database, aredis: aioredis.Redis, spans: InMemorySpanExporter
) -> None:
    store = OrderStore(database, stream="orders")
    event = Message.event("order.note", {}, source="test")
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    request = {"traceparent": f"00-{trace_id}-{parent_id}-01"}

    def enqueue() -> None:
        with database.write() as conn:
            store.outbox.enqueue(conn, [(None, event)], datetime.now(UTC), [request])

    await database.run(enqueue)
    assert await OutboxRelay(store, aredis).publish_pending() == 1
    (span,) = spans.get_finished_spans()
    assert f"{span.context.trace_id:032x}" == trace_id
    assert span.parent is not None
    assert f"{span.parent.span_id:016x}" == parent_id
    assert span.attributes is not None
    assert span.attributes["messaging.message.id"] == event.id


def _orders(db: Database) -> list[tuple[int, bool, int]]:
    with db.read() as conn:
        rows = conn.execute(
            sa.text("SELECT id, last_published_at, publish_count FROM orders ORDER BY id")
        ).all()
    return [(row.id, row.last_published_at is not None, row.publish_count) for row in rows]


async def test_publishing_stamps_each_order_once_with_its_publish_time(
    database_url: str, aredis: aioredis.Redis
) -> None:
    db = Database(database_url)
    try:
        await db.run(db.migrate)
        await db.run(_fill, db, 3)
        assert [stamped for _, stamped, _ in await db.run(_orders, db)] == [False] * 3
        store = OrderStore(db, stream="orders")
        assert await OutboxRelay(store, aredis).publish_pending() == 3
        assert [(stamped, count) for _, stamped, count in await db.run(_orders, db)] == [
            (True, 1)
        ] * 3
    finally:
        db.close()


async def test_completing_a_batch_twice_changes_nothing_the_second_time(
    database_url: str,
) -> None:
    db = Database(database_url)
    try:
        await db.run(db.migrate)
        await db.run(_fill, db, 2)
        store = OrderStore(db, stream="orders")
        batch = await db.run(store.claim, 10)
        await db.run(store.complete, batch)
        await db.run(store.complete, batch)
        store.abandon(batch)
        assert [count for _, _, count in await db.run(_orders, db)] == [1, 1]
        assert await db.run(store.backlog) == 0
    finally:
        db.close()


async def test_a_failed_completion_is_raised_and_leaves_the_batch_pending(
    database: Database, aredis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    await database.run(_fill, database, 1)
    store = OrderStore(database, stream="orders")

    def broken(batch: Any) -> None:
        raise sa.exc.OperationalError("DELETE FROM outbox", {}, Exception("disk I/O error"))

    monkeypatch.setattr(store, "complete", broken)
    with pytest.raises(sa.exc.OperationalError, match="disk I/O error"):
        await OutboxRelay(store, aredis).publish_pending()
    assert await database.run(store.backlog) == 1


async def test_each_orders_events_go_to_its_order_ids_partition_in_batches(
    database: Database, aredis: aioredis.Redis
) -> None:
    ids = await database.run(_fill_ids, database, 5)
    relay = OutboxRelay(
        OrderStore(database, stream="orders"),
        aredis,
        config=RelayConfig(batch_size=2),
        partitions=4,
    )
    assert await relay.publish_pending() == 5
    assert (relay.stats.published, relay.stats.batches) == (5, 3)
    layout = PartitionLayout("orders", 4)
    for order_id in ids:
        entries = await aredis.xrange(layout.for_key(order_id))
        assert order_id in [orjson.loads(fields[b"data"])["id"] for _, fields in entries]


async def test_rows_of_different_streams_each_go_to_their_own_stream_in_order(
    database: Database, aredis: aioredis.Redis
) -> None:
    orders, other = OrderStore(database, stream="orders"), OrderStore(database, stream="other")
    events = [Message.event("order.note", {"n": n}, source="test") for n in range(4)]

    def enqueue() -> None:
        with database.write() as conn:
            for n, event in enumerate(events):
                store = orders if n in (0, 1, 3) else other
                store.outbox.enqueue(conn, [(None, event)], datetime.now(UTC))

    await database.run(enqueue)
    assert await OutboxRelay(orders, aredis).publish_pending() == 4

    async def ids(stream: str) -> list[str]:
        return [f[b"ce_id"].decode() for _, f in await aredis.xrange(stream)]

    assert await ids("orders") == [events[0].id, events[1].id, events[3].id]
    assert await ids("other") == [events[2].id]


async def test_the_partition_count_is_read_from_redis_at_most_once_a_second(
    database: Database, aredis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(relay_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    asked: list[tuple[str, int | None]] = []
    resolve = resolve_layout

    async def counting(redis: Any, stream: str, requested: int | None = None) -> Any:
        asked.append((stream, requested))
        return await resolve(redis, stream, requested)

    monkeypatch.setattr(relay_module, "resolve_layout", counting)
    relay = OutboxRelay(OrderStore(database, stream="orders"), aredis, partitions=2)
    layout = await relay._layout("orders")
    assert layout.names == PartitionLayout("orders", 2).names
    clock[0] = 1000.999
    assert await relay._layout("orders") is layout
    assert await relay._layout("other") is not None
    clock[0] = 1001.0  # a second later: read again
    await relay._layout("orders")
    assert asked == [("orders", 2), ("other", 2), ("orders", 2)]


@pytest.mark.postgres
async def test_a_second_relay_on_postgres_skips_the_rows_another_holds_without_waiting(
    postgres_url: str,
) -> None:
    db = Database(postgres_url)
    try:
        await db.run(db.migrate)
        await db.run(_fill, db, 2)
        store = OrderStore(db, stream="orders")
        first = await db.run(store.claim, 1)
        try:
            second = await asyncio.wait_for(db.run(store.claim, 1), 5)
            assert [r.id for r in second.rows] != [r.id for r in first.rows]
            assert len(second.rows) == 1
            store.abandon(second)
        finally:
            store.abandon(first)
    finally:
        db.close()


def _fill_ids(db: Database, count: int) -> list[int]:
    store = OrderStore(db, stream="orders")
    return [store.create(OrderRequest.model_validate(order_body(n))).order.id for n in range(count)]


@pytest.mark.parametrize("partitions", [1, 2])
async def test_the_relay_trims_what_it_publishes_to_its_retention(
    database: Database, aredis: aioredis.Redis, partitions: int
) -> None:
    await database.run(_fill, database, 30)
    retention = Retention(maxlen=5, trim_every=1, approximate=False)
    relay = OutboxRelay(
        OrderStore(database, stream="orders"), aredis, retention=retention, partitions=partitions
    )
    assert await relay.publish_pending() == 30
    layout = PartitionLayout("orders", partitions)
    streams = ["orders"] if partitions == 1 else layout.names
    # No group reads them: nothing holds the trim back, each stream keeps its newest 5.
    assert [await aredis.xlen(s) for s in streams] == [5] * len(streams)
