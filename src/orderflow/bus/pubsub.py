"""The lab's transport: Redis Pub/Sub, fire and forget (at-most-once, by nature).

A message on the wire is the bare JSON object of the payload, exactly as the lab's
publisher sends it, so the lab's own scripts interoperate with this transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, cast

import redis.asyncio as aioredis

from orderflow.bus.errors import TRANSIENT
from orderflow.bus.guarantees import PUBSUB, Guarantees
from orderflow.bus.message import DecodeError, Message, decode_data, dumps

log = logging.getLogger(__name__)

PubSubHandler = Callable[[Message], Awaitable[None]]


class PubSubPublisher:
    """Publishes messages' payloads to a channel; subscribers that are down miss them."""

    guarantees: Guarantees = PUBSUB

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis

    async def publish(self, channel: str, message: Message) -> int:
        """Publish one message; returns how many subscribers received it (maybe 0)."""
        return int(await self._redis.publish(channel, dumps(message.data)))

    async def publish_many(self, channel: str, messages: list[Message]) -> list[int]:
        """Publish messages in order in one pipelined round trip."""
        pipe = self._redis.pipeline(transaction=False)
        for message in messages:
            pipe.publish(channel, dumps(message.data))
        return [int(n) for n in await pipe.execute()]


class PubSubSubscriber:
    """Receives a channel's messages while subscribed; never crashes on bad input."""

    def __init__(self, redis: aioredis.Redis, channel: str, handler: PubSubHandler) -> None:
        self._redis = redis
        self.channel = channel
        self._handler = handler
        self._stopping = asyncio.Event()
        self._subscribed = asyncio.Event()
        self.received = 0
        self.rejected = 0

    def stop(self) -> None:
        """Stop listening."""
        self._stopping.set()

    async def wait_subscribed(self) -> None:
        """Return once the subscription is active (messages from now on are received)."""
        await self._subscribed.wait()

    async def run(self) -> None:
        """Listen until ``stop()``, resubscribing after Redis goes away."""
        attempt = 0
        while not self._stopping.is_set():
            try:
                await self._listen()
                attempt = 0
            except TRANSIENT as exc:
                self._subscribed.clear()
                attempt += 1
                delay = min(5.0, 0.05 * 2**attempt)
                log.warning("Pub/Sub connection lost (%s); resubscribing in %.2fs", exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)

    async def _listen(self) -> None:
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.channel)
            self._subscribed.set()
            while not self._stopping.is_set():
                raw = await pubsub.get_message(timeout=0.2)
                if raw is None or raw.get("type") != "message":
                    continue
                await self._deliver(raw["data"])
        finally:
            self._subscribed.clear()
            with contextlib.suppress(*TRANSIENT):
                await cast(Any, pubsub).aclose()

    async def _deliver(self, payload: bytes) -> None:
        try:
            message = Message(data=decode_data(payload), id=f"pubsub-{uuid.uuid4()}")
        except DecodeError as exc:
            self.rejected += 1
            log.warning("ignoring malformed message on channel %s: %s", self.channel, exc)
            return
        self.received += 1
        try:
            await self._handler(message)
        except Exception:
            # At-most-once: there is nowhere to put it back; say so and go on.
            log.exception("handler failed on a message of channel %s; it is lost", self.channel)
