"""Order Service, Streams version: appends each order to stream 'orders' (XADD)."""

from __future__ import annotations

import asyncio
import os

from orderflow.bus import Message, StreamPublisher, connect

URL = os.environ.get("ORDERFLOW_REDIS_URL", "redis://localhost:6379/0")
STREAM = "orders"


async def create_order(publisher: StreamPublisher, order_id: int, user_email: str) -> None:
    """Save (mocked) and publish one order as an ``order.created`` event."""
    order = {"id": order_id, "email": user_email, "total": "100.00"}
    print(f"💾 Order #{order_id} saved to DB.")
    event = Message.event("order.created", order, source="orderflow/examples")
    entry_id = await publisher.publish(STREAM, event)
    print(f"📢 Event {entry_id} appended to stream '{STREAM}'", flush=True)


async def main() -> None:
    """Simulate traffic: orders 101 and 102."""
    redis = connect(URL)
    publisher = StreamPublisher(redis)
    await create_order(publisher, 101, "alice@example.com")
    await asyncio.sleep(1)
    await create_order(publisher, 102, "bob@example.com")
    await redis.aclose()


if __name__ == "__main__":
    asyncio.run(main())
