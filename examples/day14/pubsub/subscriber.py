"""Email Service, Pub/Sub version: prints each order received on channel 'orders'."""

from __future__ import annotations

import asyncio
import os
import signal

from orderflow.bus import Message, PubSubSubscriber, connect

URL = os.environ.get("ORDERFLOW_REDIS_URL", "redis://localhost:6379/0")
TOPIC = "orders"


async def send_confirmation(message: Message) -> None:
    """The lab's Email Service: say what would be sent."""
    order = message.data
    print(f"✅ Received Event: Order #{order['id']} for {order['email']}")
    print(f"   -> Sending confirmation email to {order['email']}...", flush=True)


async def main() -> None:
    """Listen until Ctrl-C or SIGTERM."""
    redis = connect(URL)
    subscriber = PubSubSubscriber(redis, TOPIC, send_confirmation)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, subscriber.stop)
    task = asyncio.create_task(subscriber.run())
    await subscriber.wait_subscribed()
    print(f"📧 Email Service listening on '{TOPIC}'...", flush=True)
    await task
    await redis.aclose()


if __name__ == "__main__":
    asyncio.run(main())
