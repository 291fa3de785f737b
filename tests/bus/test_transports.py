"""One behavioural suite, run against both transports; each declares what it guarantees.

The lab's challenge is the second test: with the subscriber down, a Pub/Sub message is
lost while a Streams entry is delivered once the subscriber is back.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import pytest
import redis.asyncio as aioredis

from orderflow.bus import (
    Delivery,
    Guarantees,
    Message,
    PubSubPublisher,
    PubSubSubscriber,
    StreamPublisher,
    StreamWorker,
    WorkerConfig,
)
from tests.support import wait_until

TOPIC = "orders"


class Consumer(Protocol):
    received: list[Message]

    async def start(self) -> None: ...
    async def stop(self) -> None: ...


class Transport(Protocol):
    guarantees: Guarantees

    async def publish(self, message: Message) -> None: ...
    async def publish_raw(self, payload: bytes) -> None: ...
    def consumer(self, fail_first: int = 0) -> Consumer: ...


class StreamsConsumer:
    def __init__(self, redis: aioredis.Redis, name: str, fail_first: int) -> None:
        self.received: list[Message] = []
        self._failures_left = fail_first
        config = WorkerConfig(
            stream=TOPIC, group="email-service", consumer=name, block_ms=50, retry_base_ms=20
        )
        self._worker = StreamWorker(redis, config, self._handle)
        self._task: asyncio.Task[object] | None = None

    async def _handle(self, delivery: Delivery) -> None:
        if self._failures_left > 0:
            self._failures_left -= 1
            raise RuntimeError("transient failure")
        self.received.append(delivery.message)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._worker.run())
        await self._worker.wait_started()

    async def stop(self) -> None:
        self._worker.stop()
        assert self._task is not None
        await self._task


class StreamsTransport:
    guarantees = StreamPublisher.guarantees

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._publisher = StreamPublisher(redis)
        self._names = 0

    async def publish(self, message: Message) -> None:
        await self._publisher.publish(TOPIC, message)

    async def publish_raw(self, payload: bytes) -> None:
        await self._redis.xadd(TOPIC, {"data": payload})

    def consumer(self, fail_first: int = 0) -> Consumer:
        self._names += 1
        return StreamsConsumer(self._redis, f"consumer-{self._names}", fail_first)


class PubSubConsumer:
    def __init__(self, redis: aioredis.Redis, fail_first: int) -> None:
        self.received: list[Message] = []
        self._failures_left = fail_first
        self._subscriber = PubSubSubscriber(redis, TOPIC, self._handle)
        self._task: asyncio.Task[None] | None = None

    async def _handle(self, message: Message) -> None:
        if self._failures_left > 0:
            self._failures_left -= 1
            raise RuntimeError("transient failure")
        self.received.append(message)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._subscriber.run())
        await self._subscriber.wait_subscribed()

    async def stop(self) -> None:
        self._subscriber.stop()
        assert self._task is not None
        await self._task


class PubSubTransport:
    guarantees = PubSubPublisher.guarantees

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._publisher = PubSubPublisher(redis)

    async def publish(self, message: Message) -> None:
        await self._publisher.publish(TOPIC, message)

    async def publish_raw(self, payload: bytes) -> None:
        await self._redis.publish(TOPIC, payload)

    def consumer(self, fail_first: int = 0) -> Consumer:
        return PubSubConsumer(self._redis, fail_first)


@pytest.fixture(params=["streams", "pubsub"])
async def transport(request: pytest.FixtureRequest, aredis: aioredis.Redis) -> Transport:
    return StreamsTransport(aredis) if request.param == "streams" else PubSubTransport(aredis)


def order(n: int) -> Message:
    return Message(data={"id": n, "email": f"user{n}@example.com", "total": "100.00"})


async def test_a_running_consumer_receives_every_message_in_order(transport: Transport) -> None:
    consumer = transport.consumer()
    await consumer.start()
    for n in range(1, 21):
        await transport.publish(order(n))
    await wait_until(lambda: len(consumer.received) == 20, what="20 messages")
    await consumer.stop()
    ids = [m.data["id"] for m in consumer.received]
    assert ids == list(range(1, 21)) if transport.guarantees.ordered else sorted(ids)


async def test_message_published_while_the_consumer_is_down(transport: Transport) -> None:
    """The lab's challenge: Pub/Sub loses it; Streams delivers it when the consumer is back."""
    first = transport.consumer()
    await first.start()
    await first.stop()  # the Email Service goes down

    await transport.publish(order(101))

    back = transport.consumer()
    await back.start()
    await transport.publish(order(102))  # a marker: everything before it has been handled
    await wait_until(lambda: any(m.data["id"] == 102 for m in back.received), what="marker")
    await back.stop()
    got = [m.data["id"] for m in back.received]
    if transport.guarantees.persistent:
        assert got == [101, 102]
    else:
        assert got == [102]


async def test_a_failing_handler(transport: Transport) -> None:
    consumer = transport.consumer(fail_first=1)
    await consumer.start()
    await transport.publish(order(1))
    await transport.publish(order(2))
    await wait_until(lambda: any(m.data["id"] == 2 for m in consumer.received), what="order 2")
    if transport.guarantees.redelivery:
        await wait_until(lambda: len(consumer.received) == 2, what="the redelivery")
    await consumer.stop()
    got = sorted(m.data["id"] for m in consumer.received)
    assert got == ([1, 2] if transport.guarantees.redelivery else [2])


async def test_malformed_input_never_stops_a_consumer(transport: Transport) -> None:
    consumer = transport.consumer()
    await consumer.start()
    for junk in (b"not json", b"[1,2,3]", b"\xff\xfe", b""):
        await transport.publish_raw(junk)
    await transport.publish(order(7))
    await wait_until(lambda: len(consumer.received) == 1, what="the good message")
    await consumer.stop()
    assert consumer.received[0].data["id"] == 7


async def test_two_consumers(transport: Transport) -> None:
    a, b = transport.consumer(), transport.consumer()
    await a.start()
    await b.start()
    for n in range(40):
        await transport.publish(order(n))
    expected = 40 if transport.guarantees.consumer_groups else 80
    await wait_until(lambda: len(a.received) + len(b.received) == expected, what="all")
    await a.stop()
    await b.stop()
    ids = [m.data["id"] for m in a.received + b.received]
    if transport.guarantees.consumer_groups:
        assert sorted(ids) == list(range(40))  # shared: each handled by exactly one
    else:
        assert sorted(ids) == sorted(list(range(40)) * 2)  # broadcast: each got all
