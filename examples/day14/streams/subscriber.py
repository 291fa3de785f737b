"""Email Service, Streams version: a consumer in group 'email-service' on stream 'orders'.

Orders published while it was down are delivered when it starts; an order whose
handling fails is retried; one that keeps failing goes to 'orders:dlq'.
"""

from __future__ import annotations

import asyncio
import os
import signal

from orderflow.bus import Delivery, StreamWorker, WorkerConfig, connect

URL = os.environ.get("ORDERFLOW_REDIS_URL", "redis://localhost:6379/0")


async def send_confirmation(delivery: Delivery) -> None:
    """The lab's Email Service: say what would be sent (then the entry is acknowledged)."""
    order = delivery.message.data
    print(f"✅ Received Event: Order #{order['id']} for {order['email']}")
    print(f"   -> Sending confirmation email to {order['email']}...", flush=True)


async def main() -> None:
    """Consume until Ctrl-C or SIGTERM, then finish in-flight work and exit."""
    redis = connect(URL)
    worker = StreamWorker(
        redis, WorkerConfig(stream="orders", group="email-service"), send_confirmation
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, worker.stop)
    task = asyncio.create_task(worker.run())
    await worker.wait_started()
    print("📧 Email Service listening on stream 'orders' (group 'email-service')...", flush=True)
    await task
    await redis.aclose()


if __name__ == "__main__":
    asyncio.run(main())
