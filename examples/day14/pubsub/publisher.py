"""Order Service, Pub/Sub version: publishes each order on channel 'orders' (fire and forget)."""

from __future__ import annotations

import asyncio
import os

from orderflow.bus import Message, PubSubPublisher, connect

URL = os.environ.get("ORDERFLOW_REDIS_URL", "redis://localhost:6379/0")
TOPIC = "orders"


async def create_order(publisher: PubSubPublisher, order_id: int, user_email: str) -> None:
    """Save (mocked) and publish one order, as the lab's publisher does."""
    order = {"id": order_id, "email": user_email, "total": 100}
    print(f"💾 Order #{order_id} saved to DB.")
    receivers = await publisher.publish(TOPIC, Message(data=order))
    print(f"📢 Event published to '{TOPIC}' ({receivers} subscriber(s) listening)")


async def main() -> None:
    """Simulate traffic: orders 101 and 102."""
    redis = connect(URL)
    publisher = PubSubPublisher(redis)
    await create_order(publisher, 101, "alice@example.com")
    await asyncio.sleep(1)
    await create_order(publisher, 102, "bob@example.com")
    await redis.aclose()


if __name__ == "__main__":
    asyncio.run(main())
