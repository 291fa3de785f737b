"""Live updates: snapshots of the system, ticked over Redis Pub/Sub, served as SSE.

A ticker in each API process publishes a snapshot (recent orders with their email
status, the streams' figures, dead-letter and inbox counts) on the console channel
every ``tick_s`` while someone listens (``PUBSUB NUMSUB``), and at once when the
console placed an order. One process at a time ticks (a short Redis lease), so
several API workers do not multiply the work. Every Server-Sent Events stream
subscribes to the channel and forwards what it hears. This is Pub/Sub's right job:
a lost tick is harmless, the next one (or the snapshot a reconnecting stream gets
first) carries the whole state again.

An SSE response ends after ``stream_max_s`` and the browser reconnects: uvicorn waits
for open responses before it shuts down, so a stream that never ended would hold up
every Ctrl-C while a console is open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as aioredis
import sqlalchemy as sa
from redis.exceptions import RedisError

from orderflow.bus.admin import (
    OperationError,
    count_dead_letters,
    last_dead_letter_id,
    stream_info,
)
from orderflow.config import Settings
from orderflow.console.inbox import count_inbox
from orderflow.orders.runtime import OrderRuntime, StoredOrder

log = logging.getLogger(__name__)

#: Orders shown on the Orders page and carried by each tick.
RECENT_ORDERS = 50


@dataclass(slots=True)
class LiveOptions:
    """Timing of live updates (tests shorten them)."""

    tick_s: float = 1.0
    stream_max_s: float = 5.0
    heartbeat_s: float = 15.0
    #: Browsers wait this long before reconnecting a stream that ended.
    retry_ms: int = 500


def order_json(order: StoredOrder) -> dict[str, Any]:
    """An order as the console shows it (the API's JSON)."""
    return order.to_json()


@dataclass(slots=True)
class _RateSample:
    at: float
    added: int


@dataclass(slots=True)
class RateTracker:
    """Entries per second of each stream, from two snapshots at least a second apart."""

    samples: dict[str, list[_RateSample]] = field(default_factory=dict)
    window_s: float = 10.0

    def observe(self, stream: str, added: int | None, now: float | None = None) -> float | None:
        """Record ``added`` (entries ever added) now; the rate over the window, or None."""
        if added is None:
            return None
        now = time.monotonic() if now is None else now
        history = self.samples.setdefault(stream, [])
        history.append(_RateSample(now, added))
        while len(history) > 2 and now - history[1].at >= self.window_s:
            history.pop(0)
        first = history[0]
        elapsed = now - first.at
        if elapsed < 0.5 or added < first.added:
            return None
        return round((added - first.added) / elapsed, 2)


class LiveFeed:
    """Builds snapshots, runs the ticker and serves the SSE streams of one app."""

    def __init__(self, settings: Settings, options: LiveOptions | None = None) -> None:
        self.settings = settings
        self.options = options or LiveOptions()
        self.rates = RateTracker()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._holder = uuid.uuid4().hex
        self.ticks = 0

    @property
    def channel(self) -> str:
        """The Pub/Sub channel ticks travel on."""
        return self.settings.console_channel

    @property
    def streams(self) -> list[str]:
        """The source streams the console watches."""
        return [self.settings.stream, self.settings.email_events_stream]

    def wake(self) -> None:
        """Tick at once (an order was placed, a dead letter moved)."""
        self._wake.set()

    def stop(self) -> None:
        """Stop the ticker and end open streams."""
        self._stopping.set()
        self._wake.set()

    async def snapshot(self, runtime: OrderRuntime) -> dict[str, Any]:
        """The whole live state; a part that cannot be read says why instead."""
        snap: dict[str, Any] = {"at": time.time()}
        try:
            found = await runtime.recent_orders(RECENT_ORDERS)
            snap["orders"] = [order_json(order) for order in found]
        except sa.exc.SQLAlchemyError as exc:
            snap["orders_error"] = f"database unavailable: {type(exc).__name__}"
        redis = runtime.redis
        try:
            infos = await stream_info(redis, self.streams)
            flow = []
            for info in infos:
                data = info.to_json()
                data["rate_per_s"] = self.rates.observe(info.name, info.entries_added)
                flow.append(data)
            snap["flow"] = flow
            dead: dict[str, Any] = {}
            for name in self.streams:
                dead[name] = {
                    "count": await count_dead_letters(redis, name),
                    "newest": await last_dead_letter_id(redis, name) or "",
                }
            snap["dead_letters"] = dead
        except (RedisError, OSError, OperationError) as exc:
            snap["redis_error"] = f"Redis unavailable: {type(exc).__name__}"
        count, newest = await asyncio.to_thread(count_inbox, self.settings.mail_dir)
        snap["inbox"] = {"count": count, "newest": newest}
        return snap

    async def publish(self, runtime: OrderRuntime) -> bool:
        """Publish one snapshot on the channel; False when Redis refused."""
        try:
            payload = orjson.dumps(await self.snapshot(runtime))
            await runtime.redis.publish(self.channel, payload)
        except (RedisError, OSError) as exc:
            log.debug("console tick not published: %s", exc)
            return False
        self.ticks += 1
        return True

    async def _listeners(self, redis: aioredis.Redis) -> int:
        reply: Any = await redis.pubsub_numsub(self.channel)
        return int(reply[0][1]) if reply else 0

    async def _lead(self, redis: aioredis.Redis) -> bool:
        # One ticker across the API processes: a lease that lapses if its holder dies.
        key = f"{self.channel}:ticker"
        ttl_ms = max(1000, int(self.options.tick_s * 3000))
        if await redis.set(key, self._holder, nx=True, px=ttl_ms):
            return True
        holder = await redis.get(key)
        if holder is not None and _text(holder) == self._holder:
            await redis.pexpire(key, ttl_ms)
            return True
        return False

    async def run(self, runtime: OrderRuntime) -> None:
        """Tick until ``stop()``: a snapshot each ``tick_s`` while anyone listens."""
        while not self._stopping.is_set():
            woken = self._wake.is_set()
            self._wake.clear()
            try:
                if await self._listeners(runtime.redis) and (
                    woken or await self._lead(runtime.redis)
                ):
                    await self.publish(runtime)
            except (RedisError, OSError) as exc:
                log.debug("console ticker: Redis unavailable (%s)", exc)
            except Exception:
                log.exception("console ticker failed; it goes on")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.options.tick_s)

    async def events(self, runtime: OrderRuntime) -> AsyncIterator[bytes]:
        """An SSE stream: a fresh snapshot, then every tick heard, until ``stream_max_s``."""
        options = self.options
        yield f"retry: {options.retry_ms}\n\n".encode()
        yield sse("snapshot", orjson.dumps(await self.snapshot(runtime)))
        deadline = time.monotonic() + options.stream_max_s
        pubsub = runtime.redis.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            last_sent = time.monotonic()
            while not self._stopping.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                message = await pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=min(1.0, left)
                )
                if message is not None and message.get("type") == "message":
                    yield sse("snapshot", message["data"])
                    last_sent = time.monotonic()
                elif time.monotonic() - last_sent >= options.heartbeat_s:
                    yield b": keep-alive\n\n"
                    last_sent = time.monotonic()
        except (RedisError, OSError) as exc:
            yield sse("problem", orjson.dumps({"message": f"Redis unavailable: {exc}"}))
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.unsubscribe(self.channel)
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]


def sse(event: str, data: bytes | str) -> bytes:
    """One Server-Sent Event; each line of ``data`` gets its own ``data:`` field."""
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    lines = text.splitlines() or [""]
    body = "".join(f"data: {line}\n" for line in lines)
    return f"event: {event}\n{body}\n".encode()


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value
